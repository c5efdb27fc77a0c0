"""ShadowWorkflow: copy a share of a model's requests to a version nobody is served by.

Loads the version, adds it to the model's route as a shadow (the gateways copy that share
of requests to it, measure its answers like any version's and never return them), mirrors
for the requested time or until stopped, then removes the shadow, lets its in-flight
copies finish and releases its engine — unless the version is serving by then (a switch
made it its target), in which case the engine is left to that switch.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from turnout import contracts as c
    from turnout.fleet import Holder, HolderKind
    from workflows import calls, fleet
    from workflows import options as call

# The shadow holds its version's engines (placed on the hosts with room) and lets go of
# them at the end, instead of stopping them unless a route serves them.
_PATCH_FLEET = "engine-fleet"


@workflow.defn(name=c.SHADOW_WORKFLOW)
class ShadowWorkflow:
    def __init__(self) -> None:
        self._status = c.ShadowStatus()
        self._stop_reason: str | None = None
        self._fleet = False

    @workflow.run
    async def run(self, input: c.ShadowInput) -> c.ShadowStatus:
        self._status = c.ShadowStatus(model_id=input.model_id, version=input.version,
                                      percent=input.percent, started_at=workflow.now())
        self._fleet = workflow.patched(_PATCH_FLEET)
        self._details(f"loading {input.version} to mirror {input.percent:g}% of "
                      f"{input.model_id}'s requests to it")
        mirrored = False
        outcome = "completed"
        try:
            await self._load(input)
            if self._stop_reason is None:
                await self._mirror(input, input.percent, "on")
                mirrored = True
                await self._wait(input)
            self._status.reason = self._stop_reason or "mirrored for the requested time"
        except ActivityError as exc:
            outcome, self._status.reason = "failed", str(exc.cause or exc)
        finally:
            self._status.phase = "stopping"
            self._details(f"stopping: {self._status.reason}")
            await self._release(input, mirrored)
            self._status.phase, self._status.finished_at = outcome, workflow.now()
            self._details(f"{outcome}: {self._status.reason}")
        return self._status

    async def _load(self, input: c.ShadowInput) -> None:
        queues = [input.engine_task_queue]
        if self._fleet:
            placed = await fleet.place_version(self._holder(input), input.replicas)
            queues = [slot.task_queue for slot in placed.replicas]
        loads = fleet.start_loads(input.model_id, input.version, queues)
        await workflow.wait_condition(
            lambda: all(load.done() for load in loads) or self._stop_reason is not None)
        for load in loads:
            if not load.done():
                load.cancel()
        for load in loads:
            with contextlib.suppress(asyncio.CancelledError):
                await load

    def _holder(self, input: c.ShadowInput) -> Holder:
        return Holder(model_id=input.model_id, version=input.version, kind=HolderKind.SHADOW,
                      holder_id=workflow.info().workflow_id)

    async def _mirror(self, input: c.ShadowInput, percent: float, key: str) -> None:
        info = workflow.info()
        await calls.execute(
            c.SET_MIRROR,
            c.SetMirrorInput(model_id=input.model_id, version=input.version, percent=percent,
                             change_key=f"{info.workflow_id}/{info.run_id}/mirror-{key}"),
            start_to_close_timeout=call.TRAFFIC_TIMEOUT,
            heartbeat_timeout=call.HEARTBEAT, retry_policy=call.TRAFFIC_RETRY,
            summary=f"mirror {percent:g}% to {input.version}" if percent
            else f"stop mirroring to {input.version}")

    async def _wait(self, input: c.ShadowInput) -> None:
        self._status.phase = "mirroring"
        if input.duration_s > 0:
            self._status.ends_at = workflow.now() + timedelta(seconds=input.duration_s)
        until = f" until {self._status.ends_at:%H:%M:%S}" if self._status.ends_at else ""
        self._details(f"mirroring {input.percent:g}% of {input.model_id}'s requests to "
                      f"{input.version}{until}")
        with contextlib.suppress(asyncio.TimeoutError):
            await workflow.wait_condition(
                lambda: self._stop_reason is not None,
                timeout=timedelta(seconds=input.duration_s) if input.duration_s > 0 else None,
                timeout_summary=f"mirror for {input.duration_s:g} s")

    async def _release(self, input: c.ShadowInput, mirrored: bool) -> None:
        """Remove the shadow, let its copies finish, stop its engine unless it serves."""
        if mirrored:
            await self._mirror(input, 0, "off")
        if self._fleet:
            await fleet.release_version(input.model_id, input.version, HolderKind.SHADOW,
                                        workflow.info().workflow_id)
            return
        snapshot: c.ModelSnapshot = await calls.execute(
            c.DESCRIBE_MODEL, c.DescribeModelInput(model_id=input.model_id,
                                                   target_version=input.version),
            summary=f"is {input.version} serving now",
            **call.STORE_CALL)  # type: ignore[arg-type]
        if input.version == snapshot.live_version or \
                input.version in snapshot.serving_versions:
            return
        await self._drain(input)
        await calls.execute(
            c.UNLOAD_VERSION, c.UnloadVersionInput(model_id=input.model_id,
                                                   version=input.version),
            task_queue=input.engine_task_queue, summary=f"unload {input.version}",
            start_to_close_timeout=call.UNLOAD_TIMEOUT, heartbeat_timeout=call.HEARTBEAT,
            retry_policy=call.HEALTH_RETRY)

    async def _drain(self, input: c.ShadowInput) -> None:
        await calls.execute(
            c.DRAIN_VERSION, c.DrainVersionInput(model_id=input.model_id,
                                                 version=input.version),
            summary=f"drain {input.version}",
            start_to_close_timeout=call.DRAIN_TIMEOUT, heartbeat_timeout=call.HEARTBEAT,
            retry_policy=call.HEALTH_RETRY)

    def _details(self, text: str) -> None:
        workflow.set_current_details(text)

    @workflow.signal(name=c.STOP_SHADOW)
    def stop(self, reason: str | None = None) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason or "stopped by an operator"

    @workflow.query(name=c.STATUS_QUERY)
    def status(self) -> c.ShadowStatus:
        return self._status

