"""PreloadWorkflow: load a version ahead of a switch, and keep it until released.

The guide's `cache.preload_model(key, priority=10)`. The version is held by a preload of
that priority, placed on the hosts with room (evicting only cached engines of a lower
priority), loaded without traffic and kept until the preload is released (`DELETE` or
the `release` signal); a later switch to it finds its engines loaded. A load of a higher
priority may evict it meanwhile; the preload then ends as `evicted`.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from turnout import contracts as c
    from turnout.fleet import Holder, HolderKind
    from workflows import calls, fleet
    from workflows import options as call


@workflow.defn(name=c.PRELOAD_WORKFLOW)
class PreloadWorkflow:
    def __init__(self) -> None:
        self._status = c.PreloadStatus()
        self._release: str | None = None
        self._evicted = False

    @workflow.run
    async def run(self, input: c.PreloadInput) -> c.PreloadStatus:
        s = self._status = c.PreloadStatus(model_id=input.model_id, version=input.version,
                                           priority=input.priority, started_at=workflow.now())
        self._details(f"loading `{input.version}` of `{input.model_id}` (priority "
                      f"{input.priority}) without traffic")
        holder = Holder(model_id=input.model_id, version=input.version,
                        kind=HolderKind.PRELOAD, holder_id=workflow.info().workflow_id,
                        priority=input.priority)
        try:
            placed = await fleet.place_version(holder, input.replicas)
            s.warm, s.hosts = placed.warm, [slot.host_id for slot in placed.replicas]
            await self._load(input, placed)
        except ActivityError as err:
            s.phase, s.reason = "failed", str(err.cause or err)
        else:
            if self._release is None:
                s.phase, s.ready_at = "ready", workflow.now()
                self._details(f"`{input.version}` of `{input.model_id}` is loaded on "
                              f"{', '.join(s.hosts) or 'its endpoint'}; a switch to it "
                              f"needs no cold start")
                await workflow.wait_condition(lambda: self._release is not None)
            s.phase, s.reason = "evicted" if self._evicted else "released", self._release
        await fleet.release_version(input.model_id, input.version, HolderKind.PRELOAD,
                                    holder.holder_id)
        s.finished_at = workflow.now()
        self._details(f"preload {s.phase}" + (f": {s.reason}" if s.reason else ""))
        return s

    async def _load(self, input: c.PreloadInput, placed: c.PlaceVersionResult) -> None:
        loads = [asyncio.ensure_future(calls.execute(
            c.LOAD_VERSION, c.LoadVersionInput(model_id=input.model_id, version=input.version),
            task_queue=slot.task_queue,
            start_to_close_timeout=call.LOAD_TIMEOUT, heartbeat_timeout=call.LOAD_HEARTBEAT,
            retry_policy=call.LOAD_RETRY,
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"load {input.version} on {slot.host_id}")) for slot in placed.replicas]
        await workflow.wait_condition(
            lambda: all(load.done() for load in loads) or self._release is not None)
        for load in loads:
            if not load.done():
                load.cancel()
        for load in loads:
            try:
                await load
            except asyncio.CancelledError:
                pass

    @workflow.signal(name=c.RELEASE_PRELOAD)
    def release(self, reason: str | None = None) -> None:
        if self._release is None:
            self._release = reason or "released by an operator"

    @workflow.signal(name=c.EVICTED_PRELOAD)
    def evicted(self, reason: str | None = None) -> None:
        if self._release is None:
            self._evicted = True
            self._release = reason or "evicted to make room"

    @workflow.query(name=c.STATUS_QUERY)
    def status(self) -> c.PreloadStatus:
        return self._status

    def _details(self, text: str) -> None:
        workflow.set_current_details(text)
