"""Timeouts and retry policies of the activities the workflows call, chosen once.

Every workflow that loads a version, shifts traffic, drains or unloads uses the same
options, so a shadow's load behaves like a switch's.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.workflow import unsafe

with unsafe.imports_passed_through():
    from turnout import contracts as c

# Store writes are small and idempotent: retry them patiently.
STORE_CALL = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1),
                                maximum_interval=timedelta(seconds=30), maximum_attempts=20),
}
# What must happen however long the store is away (marking the target live, an
# operation's final record): retried without limit, at most a minute apart.
STORE_UNTIL_DONE = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1),
                                maximum_interval=timedelta(seconds=60), maximum_attempts=0),
}
# Restoring a rollback's stable version that keeps failing: the wait before the next try
# doubles from the first to the last (each try itself retries as TRAFFIC_RETRY says).
RESTORE_BACKOFF_FIRST = timedelta(seconds=15)
RESTORE_BACKOFF_MAX = timedelta(minutes=5)
# Placing a load waits (with these retries, about 5 minutes) for an engine host to
# heartbeat, e.g. while the engine workers start; a load that fits nowhere fails at once.
PLACE_CALL = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1),
                                maximum_interval=timedelta(seconds=10), maximum_attempts=35,
                                non_retryable_error_types=[c.PLACEMENT_FAILED]),
}
# Loading a model can take many minutes on big weights; the heartbeat notices a dead worker.
LOAD_TIMEOUT = timedelta(minutes=30)
LOAD_HEARTBEAT = timedelta(seconds=60)
LOAD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=5), maximum_attempts=3,
                         non_retryable_error_types=[c.MODEL_LOAD_ERROR])
# Traffic changes wait for every gateway to confirm; a gateway restart can take a while.
TRAFFIC_TIMEOUT = timedelta(minutes=3)
TRAFFIC_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1),
                            maximum_interval=timedelta(seconds=20), maximum_attempts=10,
                            non_retryable_error_types=[c.INVALID_ROUTE])
HEALTH_TIMEOUT = timedelta(seconds=60)
HEALTH_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_attempts=3)
JUDGE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_attempts=5)
DRAIN_TIMEOUT = timedelta(minutes=10)
UNLOAD_TIMEOUT = timedelta(minutes=2)
HEARTBEAT = timedelta(seconds=30)
