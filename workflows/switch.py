"""SwitchWorkflow: one model switch, from loading the target to retiring the old version.

Reads as the business process; every side effect is an activity. The `status` query is
what the REST API, the SDK and the Web UI show.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from turnout import contracts as c
    from turnout.domain import (
        OperationStatus,
        Outcome,
        SwitchInput,
        SwitchStatus,
    )
    from turnout.strategies import PlanStep, plan_switch

# Store writes are small and idempotent: retry them patiently.
_STORE_CALL = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1),
                                maximum_interval=timedelta(seconds=30), maximum_attempts=20),
}
# Loading a model can take many minutes on big weights; the heartbeat notices a dead worker.
_LOAD_TIMEOUT = timedelta(minutes=30)
_LOAD_HEARTBEAT = timedelta(seconds=60)
_LOAD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=5), maximum_attempts=3,
                          non_retryable_error_types=["ModelLoadError"])
# Traffic changes wait for every gateway to confirm; a gateway restart can take a while.
_TRAFFIC_TIMEOUT = timedelta(minutes=3)
_TRAFFIC_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1),
                             maximum_interval=timedelta(seconds=20), maximum_attempts=10,
                             non_retryable_error_types=["InvalidRoute"])
_HEALTH_TIMEOUT = timedelta(seconds=60)
_HEALTH_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_attempts=3)
_DRAIN_TIMEOUT = timedelta(minutes=10)
_UNLOAD_TIMEOUT = timedelta(minutes=2)
_HEARTBEAT = timedelta(seconds=30)


@workflow.defn(name=c.SWITCH_WORKFLOW)
class SwitchWorkflow:
    def __init__(self) -> None:
        self._status: SwitchStatus | None = None
        self._input = SwitchInput()

    @workflow.query(name="status", description="Phase, progress, weights and outcome")
    def status(self) -> SwitchStatus | None:
        return self._status

    @workflow.run
    async def run(self, input: SwitchInput) -> SwitchStatus:
        self._input = input
        now = workflow.now()
        self._status = SwitchStatus(
            operation_id=input.operation_id, model_id=input.model_id,
            target_version=input.target_version, strategy=input.strategy,
            status=OperationStatus.RUNNING, phase="starting", started_at=now, updated_at=now)
        await self._record("switch_started")

        snapshot: c.ModelSnapshot = await workflow.execute_activity(
            c.DESCRIBE_MODEL,
            c.DescribeModelInput(model_id=input.model_id, target_version=input.target_version),
            result_type=c.ModelSnapshot, summary="read model", **_STORE_CALL)
        stable = snapshot.live_version if snapshot.live_version != input.target_version else None
        self._status.from_version = stable
        if stable:
            self._status.weights = {stable: 100.0}
        plan = plan_switch(input.strategy, input.strategy_config)
        self._status.total_steps = len(plan)

        try:
            await self._load_target()
        except ActivityError as err:
            return await self._finish(OperationStatus.FAILED, Outcome.LOAD_FAILED,
                                      f"loading {input.target_version} failed: {_cause(err)}")

        try:
            for index, step in enumerate(plan):
                await self._apply_step(index, step, stable)
            verdict = await self._check_target()
            if not verdict.healthy:
                await self._restore(stable)
                await self._release_target()
                return await self._finish(
                    OperationStatus.FAILED, Outcome.ROLLED_BACK,
                    f"{input.target_version} did not answer after the switch: {verdict.reason}")
        except ActivityError as err:
            reason = f"switch interrupted in phase {self._status.phase}: {_cause(err)}"
            workflow.logger.error(reason)
            await self._restore(stable)
            return await self._finish(OperationStatus.FAILED, Outcome.ERROR, reason)

        await self._set_phase("marking live", 0.95)
        await workflow.execute_activity(
            c.MARK_LIVE, c.MarkLiveInput(model_id=input.model_id, version=input.target_version,
                                         operation_id=input.operation_id),
            summary=f"mark {input.target_version} live", **_STORE_CALL)
        if stable:
            await self._retire(stable)
        return await self._finish(OperationStatus.COMPLETED, Outcome.PROMOTED, None)

    # ------------------------------------------------------------------ steps

    async def _load_target(self) -> None:
        await self._set_phase(f"loading {self._input.target_version}", 0.0)
        await workflow.execute_activity(
            c.LOAD_VERSION,
            c.LoadVersionInput(model_id=self._input.model_id, version=self._input.target_version),
            result_type=c.LoadVersionResult, task_queue=self._input.engine_task_queue,
            start_to_close_timeout=_LOAD_TIMEOUT, heartbeat_timeout=_LOAD_HEARTBEAT,
            retry_policy=_LOAD_RETRY, summary=f"load {self._input.target_version}")

    async def _apply_step(self, index: int, step: PlanStep, stable: str | None) -> None:
        target = self._input.target_version
        weights = {target: step.target_percent}
        if stable and step.target_percent < 100:
            weights[stable] = round(100 - step.target_percent, 2)
        await self._set_phase(f"shifting traffic to {step.target_percent:g}%", None)
        await self._set_traffic(weights, f"step-{index}",
                                summary=f"shift traffic to {step.target_percent:g}%")
        assert self._status is not None
        self._status.step = index + 1
        self._status.progress = round(0.1 + 0.8 * (index + 1) / self._status.total_steps, 4)
        if step.hold_seconds > 0:
            await self._set_phase(f"holding at {step.target_percent:g}%", None)
            await workflow.sleep(timedelta(seconds=step.hold_seconds),
                                 summary=f"hold {step.summary} for {step.hold_seconds:g}s")

    async def _check_target(self) -> c.HealthVerdict:
        await self._set_phase(f"checking {self._input.target_version}", None)
        return await workflow.execute_activity(
            c.CHECK_HEALTH,
            c.CheckHealthInput(model_id=self._input.model_id, version=self._input.target_version),
            result_type=c.HealthVerdict, start_to_close_timeout=_HEALTH_TIMEOUT,
            retry_policy=_HEALTH_RETRY, summary=f"check {self._input.target_version} answers")

    async def _retire(self, version: str) -> None:
        """Drain the old version at every gateway, then stop its engine."""
        await self._set_phase(f"draining {version}", None)
        drained: c.DrainVersionResult = await workflow.execute_activity(
            c.DRAIN_VERSION, c.DrainVersionInput(model_id=self._input.model_id, version=version),
            result_type=c.DrainVersionResult, start_to_close_timeout=_DRAIN_TIMEOUT,
            heartbeat_timeout=_HEARTBEAT, retry_policy=_HEALTH_RETRY,
            summary=f"drain {version}")
        if not drained.drained:
            workflow.logger.warning("drain of %s hit its deadline with %d requests in flight",
                                    version, drained.inflight_left)
        await self._set_phase(f"unloading {version}", None)
        await self._unload(version)

    async def _restore(self, stable: str | None) -> None:
        """Send all traffic back to the stable version (first thing on any failure)."""
        if not stable:
            await self._set_traffic({}, "restore", summary="remove traffic from target")
            return
        await self._set_phase(f"restoring traffic to {stable}", None)
        await self._set_traffic({stable: 100.0}, "restore", summary=f"restore 100% to {stable}")

    async def _release_target(self) -> None:
        await self._unload(self._input.target_version)

    async def _unload(self, version: str) -> None:
        await workflow.execute_activity(
            c.UNLOAD_VERSION, c.UnloadVersionInput(model_id=self._input.model_id, version=version),
            task_queue=self._input.engine_task_queue, start_to_close_timeout=_UNLOAD_TIMEOUT,
            heartbeat_timeout=_HEARTBEAT, retry_policy=_HEALTH_RETRY,
            summary=f"unload {version}")

    async def _set_traffic(self, weights: dict[str, float], key: str, *, summary: str) -> None:
        await workflow.execute_activity(
            c.SET_TRAFFIC,
            c.SetTrafficInput(model_id=self._input.model_id, weights=weights,
                              change_key=f"{self._input.operation_id}/{key}"),
            result_type=c.SetTrafficResult, start_to_close_timeout=_TRAFFIC_TIMEOUT,
            heartbeat_timeout=_HEARTBEAT, retry_policy=_TRAFFIC_RETRY, summary=summary)
        assert self._status is not None
        self._status.weights = dict(weights)

    # ------------------------------------------------------------------ bookkeeping

    async def _set_phase(self, phase: str, progress: float | None) -> None:
        assert self._status is not None
        self._status.phase = phase
        if progress is not None:
            self._status.progress = progress
        self._status.updated_at = workflow.now()
        weights = ", ".join(f"{v} {w:g}%" for v, w in self._status.weights.items()) or "none"
        workflow.set_current_details(
            f"**{self._input.strategy.value}** switch of `{self._input.model_id}` to "
            f"`{self._input.target_version}`: {phase} (traffic: {weights})")

    async def _finish(self, status: OperationStatus, outcome: Outcome,
                      reason: str | None) -> SwitchStatus:
        assert self._status is not None
        self._status.status = status
        self._status.outcome = outcome
        self._status.reason = reason
        if status is OperationStatus.COMPLETED:
            self._status.progress = 1.0
        await self._set_phase("completed" if status is OperationStatus.COMPLETED
                              else f"failed ({outcome.value})", None)
        self._status.finished_at = workflow.now()
        await self._record("switch_" + ("completed" if status is OperationStatus.COMPLETED
                                        else "failed"))
        return self._status

    async def _record(self, event: str) -> None:
        assert self._status is not None
        s = self._status
        await workflow.execute_activity(
            c.RECORD_OPERATION,
            c.RecordOperationInput(
                operation_id=s.operation_id, workflow_id=workflow.info().workflow_id,
                model_id=s.model_id, target_version=s.target_version, strategy=s.strategy.value,
                strategy_config=self._input.strategy_config, event=event, status=s.status,
                outcome=s.outcome, reason=s.reason, actor=self._input.requested_by,
                details={"from_version": s.from_version, "weights": s.weights}),
            summary=event.replace("_", " "), **_STORE_CALL)


def _cause(err: BaseException) -> str:
    """The innermost message of an activity failure: what actually went wrong."""
    while err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, ApplicationError):
        return err.message
    return str(err)
