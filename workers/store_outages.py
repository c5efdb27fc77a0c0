"""Activities that fail because the store did not answer fail as `STORE_UNAVAILABLE`.

Temporal names an activity's failure after its exception's class (`OperationalError`,
`ConnectionRefusedError`, ...), which cannot tell a database that is away from an engine
or gateway that refused a connection. A workflow waits out the first (a switch holds its
split until the store is back) and acts on the second, so the workers say which it is.
The failure stays retryable: the activity's own retries go on as before.
"""

from __future__ import annotations

from typing import Any

from temporalio.exceptions import ApplicationError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from turnout.contracts import STORE_UNAVAILABLE
from turnout.store import is_store_outage


class StoreOutages(Interceptor):
    """Worker interceptor: a store outage fails an activity with `STORE_UNAVAILABLE`."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next)


class _ActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except ApplicationError:
            raise
        except Exception as exc:
            if not is_store_outage(exc):
                raise
            raise ApplicationError(f"the store did not answer: {type(exc).__name__}: {exc}",
                                   type=STORE_UNAVAILABLE) from exc
