"""ReplaceEngineWorkflow: an engine died on its host; put things right.

Started by the host's engine worker when it sees a loaded engine's process gone (it has
already marked the engine failed, so gateways route around it within a second: to the
version's other replicas, else to the stable version). An engine that served, was a
rollout's candidate or a shadow is started again on its host and the model's route is
written again with its new address; a cached one (standby, preloaded) is dropped from the
cache. An `engine` alert fires at once and is resolved when the engine is replaced.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from turnout import contracts as c
    from turnout.domain import Alert, AlertSeverity
    from turnout.fleet import CACHED_ROLES, EngineRole
    from turnout.telemetry.health import AlertType
    from workflows import calls
    from workflows import options as call


@workflow.defn(name=c.REPLACE_ENGINE_WORKFLOW)
class ReplaceEngineWorkflow:
    @workflow.run
    async def run(self, input: c.ReplaceEngineInput) -> str:
        slot = input.slot
        cached = EngineRole(input.role) in CACHED_ROLES
        what = f"{slot.version} of {slot.model_id} on {slot.host_id}"
        await calls.execute(
            c.RAISE_ALERT,
            Alert(model_id=slot.model_id, version=slot.version, type=AlertType.ENGINE.value,
                  severity=AlertSeverity.WARNING if cached else AlertSeverity.CRITICAL,
                  title=f"the engine of {what} died",
                  message=f"{input.role} engine (pid {input.pid}) exited: {input.exit}; "
                          + ("dropped from the cache" if cached else "replacing it"),
                  figures={"host": slot.host_id, "pid": input.pid, "role": input.role}),
            summary="raise engine alert", **call.STORE_CALL)
        if cached:
            self._details(f"dropping the dead {input.role} engine of {what} from the cache")
            await self._unload(slot)
            outcome = f"dropped the dead {input.role} engine of {what}"
        else:
            self._details(f"starting the engine of {what} again")
            try:
                await calls.execute(
                    c.LOAD_VERSION, c.LoadVersionInput(model_id=slot.model_id,
                                                       version=slot.version),
                    task_queue=slot.task_queue,
                    start_to_close_timeout=call.LOAD_TIMEOUT,
                    heartbeat_timeout=call.LOAD_HEARTBEAT, retry_policy=call.LOAD_RETRY,
                    summary=f"start {slot.version} again on {slot.host_id}")
            except ActivityError as err:
                # The alert stays firing: the version serves on its other replicas (or
                # the gateways fail over to the stable version) until an operator acts.
                self._details(f"could not start {what} again: {err.cause or err}")
                await self._unload(slot)
                return f"could not replace the engine of {what}: {err.cause or err}"
            info = workflow.info()
            await calls.execute(
                c.REFRESH_ROUTE,
                c.RefreshRouteInput(model_id=slot.model_id,
                                    change_key=f"{info.workflow_id}/{info.run_id}/route"),
                start_to_close_timeout=call.TRAFFIC_TIMEOUT,
                heartbeat_timeout=call.HEARTBEAT, retry_policy=call.TRAFFIC_RETRY,
                summary=f"route to the new engine of {slot.version}")
            outcome = f"replaced the engine of {what}"
        await calls.execute(
            c.RESOLVE_ALERT,
            c.ResolveAlertInput(model_id=slot.model_id, version=slot.version,
                                type=AlertType.ENGINE.value),
            summary="resolve engine alert", **call.STORE_CALL)
        self._details(outcome)
        return outcome

    async def _unload(self, slot: c.EngineSlot) -> None:
        await calls.execute(
            c.UNLOAD_VERSION, c.UnloadVersionInput(model_id=slot.model_id,
                                                   version=slot.version),
            task_queue=slot.task_queue, start_to_close_timeout=call.UNLOAD_TIMEOUT,
            heartbeat_timeout=call.HEARTBEAT, retry_policy=call.HEALTH_RETRY,
            summary=f"forget the dead engine of {slot.version}")

    def _details(self, text: str) -> None:
        workflow.set_current_details(text)
