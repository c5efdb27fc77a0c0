"""What every workflow that needs engines does with the fleet: hold a version and place
its engines, stop engines on their hosts, let go of a version.

Workflow code (deterministic): each step is an activity — placement and holders on the
control worker, starting and stopping engines on each host's task queue.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from temporalio import workflow
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from turnout import contracts as c
    from turnout.fleet import Holder, HolderKind
    from workflows import calls
    from workflows import options as call


async def place_version(holder: Holder, replicas: int | None = None) -> c.PlaceVersionResult:
    """Hold `holder.version` and find hosts for its engines, making room first (evicting
    cached engines) where a host needs it. Raises `ActivityError` when no host can."""
    placed: c.PlaceVersionResult = await calls.execute(
        c.PLACE_VERSION,
        c.PlaceVersionInput(model_id=holder.model_id, version=holder.version,
                            replicas=replicas, holder=holder),
        summary=f"place {holder.version}",
        **call.PLACE_CALL)
    await stop_engines(placed.evict, "cached")
    return placed


def start_loads(model_id: str, version: str, queues: list[str]
                ) -> list[asyncio.Task[c.LoadVersionResult]]:
    """Load the version's engine on each host queue at once (a host that has it already
    answers at once). Cancelling one waits until its host has killed the half-started
    engine, so whatever follows finds nothing running."""
    return [asyncio.ensure_future(calls.execute(
        c.LOAD_VERSION, c.LoadVersionInput(model_id=model_id, version=version),
        task_queue=queue,
        start_to_close_timeout=call.LOAD_TIMEOUT, heartbeat_timeout=call.LOAD_HEARTBEAT,
        retry_policy=call.LOAD_RETRY, summary=f"load {version}",
        cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED))
        for queue in queues]


async def release_version(model_id: str, version: str, kind: HolderKind,
                          holder_id: str) -> None:
    """Let go of `version` for one holder; the engines nothing holds any more are drained
    (no request in flight to them at any gateway) and stopped."""
    released: c.ReleaseVersionResult = await calls.execute(
        c.RELEASE_VERSION,
        c.ReleaseVersionInput(model_id=model_id, version=version, kind=kind,
                              holder_id=holder_id),
        summary=f"release {version}", **call.STORE_CALL)
    if not released.stop:
        return
    await calls.execute(
        c.DRAIN_VERSION, c.DrainVersionInput(model_id=model_id, version=version),
        start_to_close_timeout=call.DRAIN_TIMEOUT,
        heartbeat_timeout=call.HEARTBEAT, retry_policy=call.HEALTH_RETRY,
        summary=f"drain {version}")
    await stop_engines(released.stop, "unheld")


async def stop_engines(slots: list[c.EngineSlot],
                       when: Literal["unheld", "cached"]) -> None:
    """Stop each engine on its host; `when` is checked again there, so an engine that was
    taken meanwhile (held again, or serving) is left running. A preload whose engine was
    evicted is told so, and ends."""
    await asyncio.gather(*(calls.execute(
        c.UNLOAD_VERSION,
        c.UnloadVersionInput(model_id=slot.model_id, version=slot.version, when=when),
        task_queue=slot.task_queue, start_to_close_timeout=call.UNLOAD_TIMEOUT,
        heartbeat_timeout=call.HEARTBEAT, retry_policy=call.HEALTH_RETRY,
        summary=f"{'evict' if when == 'cached' else 'unload'} {slot.version} on "
                f"{slot.host_id}") for slot in slots))
    if when != "cached":
        return
    for slot in slots:
        preload = workflow.get_external_workflow_handle(
            c.preload_workflow_id(slot.model_id, slot.version))
        try:
            await preload.signal(c.EVICTED_PRELOAD, f"evicted from {slot.host_id} to make "
                                                    f"room for {workflow.info().workflow_id}")
        except Exception:  # noqa: BLE001 - no preload of that version is running
            pass
