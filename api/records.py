"""What the API writes after an action has taken effect: a switch's operation record and
audit entry once its workflow has started, the audit entry of an applied control.

The action is under way whatever the store does then, so a store that does not answer
must not turn the answer into a failure (a 503 for a running switch, which a retry meets
as a 409). The write is retried in the background while the store is unavailable; the
switch's own activities record its operation and progress as soon as the store answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from turnout.domain import AuditEntry
from turnout.store import Store, is_unavailable

log = logging.getLogger("turnout.api.records")

# How long the API keeps trying a write the store does not answer.
RETRY_S = 600.0
_MAX_DELAY_S = 30.0

# `write(again)`: `again` is True on a retry, after a try that may have written part of it
# (or all of it, if the store committed and then did not answer in time).
Write = Callable[[bool], Awaitable[None]]

# The writes being retried, with the store each writes to.
_retrying: dict[asyncio.Task[None], Store] = {}


async def record(store: Store, write: Write, what: str, *, try_now: bool = True) -> bool:
    """Write now (unless `try_now` is False: the store just failed us), or else in the
    background; whether it was written now. `what` names it in the log."""
    if try_now:
        try:
            await write(False)
            return True
        except Exception as exc:
            if not is_unavailable(exc):
                log.error("could not write %s", what, exc_info=exc)
                return False
            log.warning("the store did not answer writing %s (%r); trying again in the "
                        "background", what, exc)
    else:
        log.warning("the store does not answer: writing %s in the background", what)
    task = asyncio.create_task(_retry(write, what), name=what)
    _retrying[task] = store
    task.add_done_callback(lambda done: _retrying.pop(done, None))
    return False


async def _retry(write: Write, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RETRY_S
    delay = 1.0
    while True:
        await asyncio.sleep(delay)
        try:
            await write(True)
        except Exception as exc:
            if is_unavailable(exc) and loop.time() + delay < deadline:
                delay = min(delay * 2, _MAX_DELAY_S)
                continue
            log.error("gave up writing %s (%r)", what, exc)
            return
        log.info("wrote %s once the store answered again", what)
        return


async def audit_once(store: Store, entry: AuditEntry, again: bool) -> None:
    """Write an entry there is one of per operation (`switch_requested`, say); a retry
    writes it only if the earlier try did not."""
    if again and entry.operation_id and \
            await store.has_audit(entry.action, entry.operation_id):
        return
    await store.audit(entry)


async def finish(store: Store, timeout_s: float) -> None:
    """At shutdown: let the writes retried for `store` end (for up to `timeout_s`), then
    cancel what is left, saying which."""
    tasks = [task for task, owner in _retrying.items() if owner is store]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        log.error("shutting down before %s was written", task.get_name())
        task.cancel()
