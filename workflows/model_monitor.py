"""MonitorWorkflow: one model's versions looked at every interval, for as long as it lives.

Each look is one local activity that assesses the model (gateway figures of the last
interval + the engine figures each engine host records in the store every interval,
against the thresholds), which raises, updates or resolves alerts and keeps the latest
look for `GET /health/models`. Local, because a look is short, runs on this worker and
repeats for every model all the time: as a regular activity it cost the server an activity
task and a workflow task per look, and with hundreds of models that load delayed the
rollouts' own steps (measured by `bench.concurrent_canaries`).

Runs started before that change (no `_PATCH_ONE_LOOK` marker) keep their old look: list
the model's hosts, measure its engines on each host's queue, then assess. The workflow continues
as new every `looks_per_run` looks (or when Temporal suggests it), so a monitor that runs
for months keeps a short history.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, FailureError

with workflow.unsafe.imports_passed_through():
    from turnout import contracts as c
    from turnout.config import engine_task_queue
    from workflows import calls

_HOSTS = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1),
                                maximum_interval=timedelta(seconds=10), maximum_attempts=5),
}
# An engine host that is down must not hold the look up: one try, bounded in queue time
# too (`MonitorInput.measure_timeout_s`), and its engines are simply left unmeasured.
_MEASURE_RETRY = RetryPolicy(maximum_attempts=1)
_PATCH_ONE_LOOK = "monitor-one-local-look"
_PATCH_SPREAD = "monitor-spread-looks"
# Assessing reads every gateway (each bounded by its own timeout) and writes the store.
_ASSESS = {
    "start_to_close_timeout": timedelta(seconds=60),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=2),
                                maximum_interval=timedelta(seconds=30), maximum_attempts=5),
}


# A look that fails (the store away for longer than its retries) is logged, counted, kept
# for `GET /health/models` when the store takes it, and tried again at the next interval,
# instead of ending the monitor; a run's first look judges the interval the previous run
# ended with (or the activity's own setting), not a default of 30 s.
_PATCH_OUTAGES = "monitor-survives-failed-looks"
# A stop signalled during a run's last pause ends the monitor; before it the run still
# continued as new, and the new run (which the signal never reached) monitored on.
_PATCH_STOP_LAST_PAUSE = "monitor-stop-in-the-last-pause"
# Under that patch a look is tried once and given up with its error: trying it again is
# the next look's job, an interval later.
_ASSESS_BOUNDED = {
    "start_to_close_timeout": timedelta(seconds=60),
    "retry_policy": RetryPolicy(maximum_attempts=1),
}
_RECORD_FAILURE = {
    "start_to_close_timeout": timedelta(seconds=10),
    "retry_policy": RetryPolicy(maximum_attempts=1),
}


@workflow.defn(name=c.MONITOR_WORKFLOW)
class MonitorWorkflow:
    def __init__(self) -> None:
        self._stopped = False
        self._looks = 0
        self._last = c.AssessHealthResult()
        self._failed_looks = 0
        self._last_failure: tuple[str, float] | None = None

    @workflow.run
    async def run(self, input: c.MonitorInput) -> str:
        survives = workflow.patched(_PATCH_OUTAGES)
        interval = self._last.interval_s
        if survives:
            # 0 asks the activity for its own interval (a fresh monitor's first look).
            interval = input.window_s
            self._failed_looks = input.failed_looks
            if input.interval_s > 0:  # the settings' interval, before any look says it
                self._last = c.AssessHealthResult(interval_s=input.interval_s)
        while not self._stopped:
            if survives:
                pause = await self._look_or_count(input, interval)
                if pause is None:
                    return f"stopped: {self._last.summary}"
                interval = pause
            else:
                self._last = await self._look(input, interval)
                self._looks += 1
                workflow.set_current_details(self._last.summary)
                if not self._last.keep_monitoring:
                    return f"stopped: {self._last.summary}"
                # The next window covers exactly the time since this look.
                interval = self._spread(self._last.interval_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(lambda: self._stopped,
                                              timeout=timedelta(seconds=interval),
                                              timeout_summary=f"next look in {interval:g} s")
            if self._stopped and workflow.patched(_PATCH_STOP_LAST_PAUSE):
                break
            if self._looks >= input.looks_per_run or \
                    workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(input.model_copy(update={
                    "window_s": interval, "failed_looks": self._failed_looks})
                    if survives else input)
        return "stopped by signal"

    async def _look_or_count(self, input: c.MonitorInput, window_s: float) -> float | None:
        """One look; a failed one is counted and recorded where the store takes it. The
        pause before the next look, or None when monitoring ends (switched off, model
        gone)."""
        self._looks += 1
        interval = self._last.interval_s  # the last good look's (or 30 s before any)
        try:
            self._last = await self._look(input, window_s)
        except FailureError as err:  # a local activity's failure comes as its cause
            self._failed_looks += 1
            reason = _reasons(err)
            self._last_failure = (reason, workflow.now().timestamp())
            summary = (f"{input.model_id}: look failed ({reason}); {self._failed_looks} "
                       f"failed so far, next try in {interval:g} s")
            workflow.logger.warning("%s", summary)
            workflow.set_current_details(summary)
            try:
                await calls.execute_local(
                    c.RECORD_FAILED_LOOK,
                    c.FailedLookInput(model_id=input.model_id, reason=reason,
                                      at=self._last_failure[1],
                                      failed_looks=self._failed_looks, interval_s=interval),
                    summary=f"record the failed look of {input.model_id}", **_RECORD_FAILURE)
            except FailureError:
                pass  # the store is still away: the next good look says it
            return interval
        workflow.set_current_details(self._last.summary)
        if not self._last.keep_monitoring:
            return None
        return self._spread(self._last.interval_s)

    def _spread(self, interval: float) -> float:
        """The pause before the next look. After a new monitor's first look it is a random
        share of the interval, so that monitors started together (every model, when a
        control worker starts) look at different moments rather than all at once: a burst
        of hundreds of looks held up the rollouts' steps by seconds."""
        if self._looks != 1 or workflow.info().continued_run_id is not None \
                or not workflow.patched(_PATCH_SPREAD):
            return interval
        return interval * max(0.1, workflow.random().random())

    async def _look(self, input: c.MonitorInput, window_s: float) -> c.AssessHealthResult:
        model_id = input.model_id
        if workflow.patched(_PATCH_ONE_LOOK):
            look = c.AssessHealthInput(model_id=model_id, window_s=window_s,
                                       measured_by_hosts=True)
            options: dict[str, Any] = dict(_ASSESS)
            if workflow.patched(_PATCH_OUTAGES):
                failure = self._last_failure
                look = look.model_copy(update={
                    "failed_looks": self._failed_looks,
                    "last_failure": failure[0] if failure else None,
                    "last_failure_at": failure[1] if failure else None})
                options = _ASSESS_BOUNDED
            return await calls.execute_local(c.ASSESS_HEALTH, look,
                                             summary=f"assess {model_id}", **options)
        hosts: list[str] = await calls.execute(
            c.LIST_ENGINE_HOSTS, c.ModelHostsInput(model_id=model_id),
            summary=f"find the hosts serving {model_id}", **_HOSTS)
        resources = []
        for host in hosts:
            try:
                resources.append(await calls.execute(
                    c.MEASURE_ENGINES, c.MeasureEnginesInput(model_id=model_id),
                    task_queue=engine_task_queue(host),
                    summary=f"measure engines on {host}", retry_policy=_MEASURE_RETRY,
                    schedule_to_close_timeout=timedelta(seconds=input.measure_timeout_s)))
            except ActivityError as exc:
                workflow.logger.warning("engines of %s on %s not measured: %s", model_id,
                                        host, exc.cause or exc)
        return await calls.execute(
            c.ASSESS_HEALTH,
            c.AssessHealthInput(model_id=model_id, window_s=window_s, resources=resources),
            summary=f"assess {model_id}", **_ASSESS)

    @workflow.signal(name=c.STOP_MONITOR)
    def stop(self) -> None:
        self._stopped = True

    @workflow.query
    def last_look(self) -> c.AssessHealthResult:
        return self._last


def _reasons(err: BaseException) -> str:
    """Every message of a failure's chain (a timed-out look says what its last try met)."""
    messages: list[str] = []
    current: BaseException | None = err
    while current is not None and len(messages) < 5:
        message = current.message if isinstance(current, FailureError) else str(current)
        if message and message not in messages:
            messages.append(message)
        current = current.cause if isinstance(current, FailureError) and current.cause \
            else current.__cause__
    return ": ".join(messages)[:1000] or type(err).__name__
