"""SwitchWorkflow: one model switch, from loading the target to retiring the old version.

Reads as the business process; every side effect is an activity. Operators steer it with
updates (rollback, pause, resume, promote, abort) whose handlers only record the request:
the main loop acts on it. The `status` query is what the REST API, the SDK and the Web UI
show.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
)
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from turnout import contracts as c
    from turnout.domain import (
        VERDICTS_KEPT,
        Alert,
        AlertSeverity,
        OperationStatus,
        Outcome,
        SwitchInput,
        SwitchStatus,
    )
    from turnout.fleet import Holder, HolderKind
    from turnout.strategies import (
        MAX_INCONCLUSIVE_EXTENSIONS,
        PlanStep,
        ab_decision,
        judged_thresholds,
        plan_switch,
        rolls_back,
    )
    from turnout.telemetry.verdicts import Verdict
    from workflows import calls, fleet
    from workflows import options as call

_MAX_EXTENSIONS = MAX_INCONCLUSIVE_EXTENSIONS
T = TypeVar("T")

# The patch that brought health judgment, operator controls and search attributes: runs
# started before it replay with the first behaviour.
_PATCH_CONTROLS = "health-judgment-and-controls"
# The patch that made rollbacks and aborts raise an alert record.
_PATCH_ALERTS = "rollback-alerts"
# The health judgment runs as a local activity: it only reads the gateways' windows, and a
# regular activity cost every step a round trip through the server (an activity task and
# one more workflow task) between the timer and the traffic shift it decides.
_PATCH_LOCAL_JUDGE = "judge-health-locally"
# Engines as a fleet: the switch holds its target, places its engines on the hosts with
# room, lets go of versions instead of stopping them, and leaves the replaced version
# standing by for an instant rollback.
_PATCH_FLEET = "engine-fleet"
# The target's first judged window leaves its engine's warm-up out (verdicts that an
# A/A test cannot fool).
_PATCH_WARMUP = "verdict-warmup"
# A manual A/B test whose target is worse than stable (and within every absolute limit)
# ends waiting for an operator, as the README says, instead of rolling back on its own.
_PATCH_AB_MANUAL = "ab-manual-decides"
# Rollback is never given up and every end is recorded: restoring the stable version
# retries until it succeeds (loading it again when its engine is gone, alerting after the
# first failed try); marking the target live and the final record retry as long as the
# store is away; a failure while cleaning up (retiring the replaced version, releasing
# the target, the rollback alert) is noted in the reason instead of failing the switch.
_PATCH_NEVER_GIVE_UP = "rollback-never-given-up"
# A pause freezes the switch wherever it comes (loading, shifting, judging), not only in
# the evaluation wait: the next route change waits for resume. Before it a switch paused
# outside the wait still applied its next step.
_PATCH_PAUSE_EVERYWHERE = "pause-holds-every-step"
# Every look of a step judges the step's window from its start, so the evidence of
# inconclusive looks adds up under light traffic (also after an operator resumes a step
# that waited); before it each extension judged a fresh window and a quiet canary could
# stay inconclusive however long it ran. The warm-up is left out of every look whose
# window starts where the first judged one did.
_PATCH_ACCUMULATE = "inconclusive-looks-accumulate"
# A store outage longer than an activity's retries no longer ends a switch: a judgment or
# a step's traffic shift that failed because the store did not answer (STORE_UNAVAILABLE)
# is tried again after a wait, the gateways serving the split they have meanwhile; an
# operator's rollback or abort still ends it. Before it the switch was interrupted and
# rolled back, though nothing was wrong with the target; and a judgment that failed for any
# reason failed the workflow itself (a local activity's failure is not an ActivityError),
# leaving the split as it was: now it interrupts the switch, which restores stable.
_PATCH_STORE_OUTAGE = "store-outage-waits"
# A rollback or abort while the target is being placed (waiting for an engine host, say)
# cancels the placement and is carried out at once; before it the request waited for the
# placement to end, up to its five minutes of retries, and the operator's call timed out.
_PATCH_ROLLBACK_WHILE_PLACING = "rollback-while-placing"
# The waits between tries while the store is away: doubling, at most a minute (a day-long
# outage adds some 1,500 timers to the history, within its limits).
_STORE_WAIT_FIRST = timedelta(seconds=5)
_STORE_WAIT_MAX = timedelta(seconds=60)

MODEL_ID = SearchAttributeKey.for_keyword("TurnoutModelId")
TARGET_VERSION = SearchAttributeKey.for_keyword("TurnoutTargetVersion")
STRATEGY = SearchAttributeKey.for_keyword("TurnoutStrategy")
PHASE = SearchAttributeKey.for_keyword("TurnoutPhase")
TRAFFIC_PERCENT = SearchAttributeKey.for_int("TurnoutTrafficPercent")

_ENDING = (c.ROLLBACK, c.ABORT, c.PROMOTE)
# Pauses, and resumes of a switch waiting after inconclusive looks, are all that can grow
# a switch's history without end (a plan is bounded: tests/workflow/test_history_limits.py).
# Past these, well short of Temporal's 51,200 events and 50 MB, they are refused: a paused
# switch may still be resumed, and any switch promoted, rolled back or aborted.
_CONTROL_HISTORY_EVENTS = 20_000
_CONTROL_HISTORY_BYTES = 20 * 1024 * 1024


class _Finished(Exception):
    """Raised inside the main loop once the switch has ended; carries the final status."""

    def __init__(self, status: SwitchStatus) -> None:
        self.status = status


@workflow.defn(name=c.SWITCH_WORKFLOW)
class SwitchWorkflow:
    def __init__(self) -> None:
        self._status: SwitchStatus | None = None
        self._input = SwitchInput()
        self._stable: str | None = None
        self._controls = False
        self._paused = False
        self._action: tuple[str, c.ControlRequest] | None = None
        self._applied: set[str] = set()
        self._finished = False
        self._decision_pending = False
        self._promoted_by: str | None = None
        self._shown_phase: str | None = None
        self._fleet = False
        self._step_in_progress: int | None = None
        self._judged = 0
        self._accumulate = False
        self._warmup_window: datetime | None = None  # where the first judged window began
        self._never_give_up = False
        self._cleanup_failures: list[str] = []
        self._pause_everywhere = False

    # ------------------------------------------------------------------ queries and updates

    @workflow.query(name=c.STATUS_QUERY, description="Phase, progress, weights, verdicts")
    def status(self) -> SwitchStatus | None:
        s = self._status
        if s is not None and s.status.terminal and not self._finished:
            # Its end is being recorded: a reader told "completed" now could find the
            # operation's record and audit entry not yet written.
            return s.model_copy(update={"status": OperationStatus.RUNNING})
        return s

    def trace_step(self) -> int | None:
        """The plan step in progress (1-based; None before the first), for the traces of
        its activities (`workers.tracing`)."""
        return self._step_in_progress

    @workflow.update(name=c.ROLLBACK,
                     description="Send all traffic back to the stable version, then release "
                                 "the target. Ends the switch as failed (rolled_back).")
    async def rollback(self, request: c.ControlRequest) -> SwitchStatus:
        return await self._request(c.ROLLBACK, request)

    @workflow.update(name=c.ABORT,
                     description="Stop where it is and return traffic to the stable version. "
                                 "Ends the switch as failed (aborted).")
    async def abort(self, request: c.ControlRequest) -> SwitchStatus:
        return await self._request(c.ABORT, request)

    @workflow.update(name=c.PROMOTE,
                     description="Jump to 100% on the target now and finish as a success.")
    async def promote(self, request: c.ControlRequest) -> SwitchStatus:
        return await self._request(c.PROMOTE, request)

    @workflow.update(name=c.PAUSE, description="Freeze weights and timers.")
    async def pause(self, request: c.ControlRequest) -> SwitchStatus:
        self._paused = True
        self._show(OperationStatus.PAUSED, f"paused by {request.requested_by or 'operator'}"
                   + (f": {request.reason}" if request.reason else ""))
        await self._record("paused", actor=request.requested_by, audit=False)
        return self._current()

    @workflow.update(name=c.RESUME, description="Continue a paused switch where it stopped.")
    async def resume(self, request: c.ControlRequest) -> SwitchStatus:
        self._paused = False
        self._show(OperationStatus.RUNNING, "resumed")
        await self._record("resumed", actor=request.requested_by, audit=False)
        return self._current()

    @rollback.validator
    def _may_rollback(self, request: c.ControlRequest) -> None:
        self._require_active(c.ROLLBACK)

    @abort.validator
    def _may_abort(self, request: c.ControlRequest) -> None:
        self._require_active(c.ABORT)

    @promote.validator
    def _may_promote(self, request: c.ControlRequest) -> None:
        self._require_active(c.PROMOTE)

    @pause.validator
    def _may_pause(self, request: c.ControlRequest) -> None:
        self._require_active(c.PAUSE)
        self._require_history_room(c.PAUSE)
        if self._paused:
            raise ApplicationError("the switch is already paused")

    @resume.validator
    def _may_resume(self, request: c.ControlRequest) -> None:
        self._require_active(c.RESUME)
        if self._phase() == "awaiting_decision":  # each round looks again: it adds up
            self._require_history_room(c.RESUME)  # (an operator's pause may always end)
        if not self._paused:
            raise ApplicationError("the switch is not paused")
        if self._decision_pending:
            raise ApplicationError("the A/B test has ended: promote or roll back")

    def _require_active(self, action: str) -> None:
        if not self._controls:
            raise ApplicationError("this switch predates operator controls")
        if self._finished or self._status is None:
            raise ApplicationError(f"cannot {action}: the switch has already ended")
        if self._action is not None:
            raise ApplicationError(f"cannot {action}: {self._action[0]} is already under way")

    def _require_history_room(self, action: str) -> None:
        info = workflow.info()
        events, size = info.get_current_history_length(), info.get_current_history_size()
        if events > _CONTROL_HISTORY_EVENTS or size > _CONTROL_HISTORY_BYTES:
            raise ApplicationError(
                f"cannot {action}: this switch's history is nearly full ({events} events, "
                f"{size / 1e6:.1f} MB); promote, roll back or abort it")

    async def _request(self, action: str, request: c.ControlRequest) -> SwitchStatus:
        """Record the request for the main loop; return once it has acted on it."""
        self._action = (action, request)
        await workflow.wait_condition(lambda: action in self._applied or self._finished)
        return self._current()

    # ------------------------------------------------------------------ the process

    @workflow.run
    async def run(self, input: SwitchInput) -> SwitchStatus:
        self._input = input
        self._controls = workflow.patched(_PATCH_CONTROLS)
        self._fleet = workflow.patched(_PATCH_FLEET)
        self._never_give_up = workflow.patched(_PATCH_NEVER_GIVE_UP)
        self._pause_everywhere = workflow.patched(_PATCH_PAUSE_EVERYWHERE)
        self._accumulate = workflow.patched(_PATCH_ACCUMULATE)
        now = workflow.now()
        self._status = SwitchStatus(
            operation_id=input.operation_id, model_id=input.model_id,
            target_version=input.target_version, strategy=input.strategy,
            status=OperationStatus.RUNNING, phase="starting", started_at=now, updated_at=now)
        if self._controls:
            workflow.upsert_search_attributes([
                MODEL_ID.value_set(input.model_id),
                TARGET_VERSION.value_set(input.target_version),
                STRATEGY.value_set(input.strategy.value)])
        try:
            snapshot = await self._start()
        except ActivityError as err:
            if not self._never_give_up:
                raise
            try:  # nothing was changed yet: only the record says how it ended
                await self._finish(OperationStatus.FAILED, Outcome.ERROR,
                                   f"reading {input.model_id} failed: {_cause(err)}")
            except _Finished as done:
                return done.status
        self._stable = snapshot.live_version \
            if snapshot.live_version != input.target_version else None
        self._status.from_version = self._stable
        if self._stable:
            self._status.weights = {self._stable: 100.0}
        # Recorded options: see turnout.strategies (a replay must plan what was accepted).
        plan = plan_switch(input.strategy, input.strategy_config, recorded=True)
        self._status.total_steps = len(plan)
        try:
            await self._switch(plan)
        except _Finished as done:
            return done.status
        raise AssertionError("a switch always ends in _finish")

    async def _start(self) -> c.ModelSnapshot:
        """Read the model and record that the switch started."""
        input = self._input
        describe = calls.execute(
            c.DESCRIBE_MODEL,
            c.DescribeModelInput(model_id=input.model_id, target_version=input.target_version),
            summary="read model", **call.STORE_CALL)
        if self._fleet and not self._never_give_up:
            _, snapshot = await asyncio.gather(self._record("switch_started"), describe)
            return snapshot
        if self._fleet:  # recorded while the model is read: an emergency rollback is waiting
            # Both ended before a failure is acted on: a record of the start landing after
            # the record of the end would show the switch running again.
            started, read = await asyncio.gather(self._record("switch_started"), describe,
                                                 return_exceptions=True)
            for result in (read, started):
                if isinstance(result, BaseException):
                    raise result
            assert isinstance(read, c.ModelSnapshot)
            return read
        await self._record("switch_started")
        return await describe

    async def _switch(self, plan: list[PlanStep]) -> None:
        try:
            await self._load_target()
        except ActivityError as err:
            reason = f"loading {self._input.target_version} failed: {_cause(err)}"
            if self._fleet:  # the replicas that did load are let go as well
                await self._cleanup(f"releasing {self._input.target_version}",
                                    self._let_go(self._input.target_version))
            await self._finish(OperationStatus.FAILED, Outcome.LOAD_FAILED, reason)
        try:
            for index, step in enumerate(plan):
                if await self._run_step(index, step) == c.PROMOTE:
                    break
            verdict = await self._check_target()
            if not verdict.healthy:
                await self._end_on_stable(
                    Outcome.ROLLED_BACK,
                    f"{self._input.target_version} did not answer after the switch: "
                    f"{verdict.reason}")
        except (ActivityError, ApplicationError) as err:
            # A judgment (a local activity) fails as its own error; before the patch it
            # failed the whole workflow, leaving the split where it was.
            if not isinstance(err, ActivityError) \
                    and not workflow.patched(_PATCH_STORE_OUTAGE):
                raise
            reason = f"switch interrupted in phase {self._phase()}: {_cause(err)}"
            workflow.logger.error(reason)
            await self._restore()
            await self._finish(OperationStatus.FAILED, Outcome.ERROR, reason)

        self._set_phase("marking_live", f"marking {self._input.target_version} live", 0.95)
        await calls.execute(
            c.MARK_LIVE, c.MarkLiveInput(model_id=self._input.model_id,
                                         version=self._input.target_version,
                                         operation_id=self._input.operation_id),
            summary=f"mark {self._input.target_version} live",
            **(call.STORE_UNTIL_DONE if self._never_give_up else call.STORE_CALL))
        if self._stable:  # the switch has happened: the rest is cleaning up
            await self._cleanup(f"retiring {self._stable}", self._retire(self._stable))
        await self._finish(OperationStatus.COMPLETED, Outcome.PROMOTED, self._promoted_by)

    async def _load_target(self) -> None:
        target = self._input.target_version
        self._set_phase("loading", f"loading {target}", 0.0)
        queues = [self._input.engine_task_queue]
        if self._fleet:
            holder = Holder(model_id=self._input.model_id, version=target,
                            kind=HolderKind.SWITCH, holder_id=self._input.operation_id)
            if self._controls and workflow.patched(_PATCH_ROLLBACK_WHILE_PLACING):
                placed = await self._unless_abandoned(
                    asyncio.ensure_future(fleet.place_version(holder, self._input.replicas)))
            else:
                placed = await fleet.place_version(holder, self._input.replicas)
            self._current().warm_start = placed.warm
            # Warm: every replica is a ready engine that answered just now; nothing to load.
            queues = [] if placed.warm else [slot.task_queue for slot in placed.replicas]
        loads = fleet.start_loads(self._input.model_id, target, queues)
        if self._controls:
            await workflow.wait_condition(
                lambda: all(load.done() for load in loads) or self._abandoning())
            if not all(load.done() for load in loads):
                for load in loads:
                    load.cancel()
                for load in loads:
                    try:
                        await load
                    except (ActivityError, asyncio.CancelledError):
                        pass
                await self._act_on_request()
        results = [await load for load in loads]
        if self._fleet and results:  # loaded engines woken or found running start warm too
            self._current().warm_start = all(r.already_running for r in results)

    async def _unless_abandoned(self, task: asyncio.Future[T]) -> T:
        """`task`'s result, or, when a rollback or abort comes first, `task` cancelled and
        the request carried out (which ends the switch)."""
        await workflow.wait_condition(lambda: task.done() or self._abandoning())
        if not task.done():
            task.cancel()
            try:
                await task
            except (ActivityError, asyncio.CancelledError):
                pass
            await self._act_on_request()
        return await task

    async def _run_step(self, index: int, step: PlanStep) -> str | None:
        """One step: shift traffic, hold (pausable), judge. Returns PROMOTE to skip ahead."""
        self._step_in_progress = index + 1
        await self._while_paused()
        if await self._act_on_request() == c.PROMOTE:
            return c.PROMOTE
        await self._shift(step.target_percent, f"step-{index}")
        assert self._status is not None
        self._status.step = index + 1
        self._status.progress = round(0.1 + 0.8 * (index + 1) / self._status.total_steps, 4)
        if step.hold_seconds <= 0:
            return None
        extensions = 0
        window_start = workflow.now()
        while True:
            if not self._accumulate:
                window_start = workflow.now()
            await self._hold(step)
            if await self._act_on_request() == c.PROMOTE:
                return c.PROMOTE
            if not (self._controls and step.judge):
                return None
            verdict = await self._judge(step, window_start)
            if verdict.outcome == "unhealthy" and (
                    not step.decide or not workflow.patched(_PATCH_AB_MANUAL)
                    or rolls_back(step, self._input.strategy, self._input.strategy_config,
                                  verdict)):
                await self._end_on_stable(Outcome.ROLLED_BACK,
                                          f"automatic rollback: {verdict.reason}")
            if step.decide:
                return await self._decide(verdict)
            if verdict.outcome == "healthy":
                return None
            extensions += 1
            if extensions > _MAX_EXTENSIONS:
                await self._wait_for_operator(
                    f"still inconclusive after {_MAX_EXTENSIONS} extensions "
                    f"({verdict.reason}); waiting for an operator to resume, promote or "
                    f"roll back")
                if await self._act_on_request() == c.PROMOTE:
                    return c.PROMOTE
                extensions = 0

    async def _hold(self, step: PlanStep) -> None:
        """Hold the current split for the step's period; pausing freezes the clock."""
        remaining = step.hold_seconds
        assert self._status is not None
        while remaining > 0 and not self._stopping():
            if self._paused:
                self._status.next_check_at = None
                await workflow.wait_condition(lambda: not self._paused or self._stopping())
                continue
            started = workflow.now()
            self._status.next_check_at = started + timedelta(seconds=remaining)
            self._set_phase("evaluating", f"{step.summary}, next check at "
                            f"{self._status.next_check_at:%H:%M:%S}")
            summary = f"evaluate {step.summary} for {_duration(remaining)}"
            if self._controls:
                try:
                    await workflow.wait_condition(lambda: self._paused or self._stopping(),
                                                  timeout=timedelta(seconds=remaining),
                                                  timeout_summary=summary)
                except TimeoutError:
                    break
                remaining -= (workflow.now() - started).total_seconds()
            else:
                await workflow.sleep(timedelta(seconds=remaining), summary=summary)
                break
        self._status.next_check_at = None

    async def _judge(self, step: PlanStep, window_start: datetime) -> Verdict:
        assert self._status is not None
        target = self._input.target_version
        self._set_phase("judging", f"judging {target} at {step.target_percent:g}%")
        thresholds = judged_thresholds(self._input.strategy, self._input.strategy_config,
                                       self._input.thresholds)
        if self._accumulate:
            if self._warmup_window is None:
                self._warmup_window = window_start
            warmup = window_start == self._warmup_window and workflow.patched(_PATCH_WARMUP)
        else:
            warmup = self._judged == 0 and workflow.patched(_PATCH_WARMUP)
        self._judged += 1
        judge = c.JudgeHealthInput(
            model_id=self._input.model_id, target_version=target, stable_version=self._stable,
            window_start=window_start.timestamp(), window_end=workflow.now().timestamp(),
            thresholds=thresholds, compare=step.decide, warmup=warmup)
        how = {"start_to_close_timeout": call.HEALTH_TIMEOUT,
               "retry_policy": call.JUDGE_RETRY,
               "summary": f"judge {target} at {step.target_percent:g}%"}
        local = workflow.patched(_PATCH_LOCAL_JUDGE)
        verdict: Verdict = await self._while_store_away(
            lambda: calls.execute_local(c.JUDGE_HEALTH, judge, **how) if local
            else calls.execute(c.JUDGE_HEALTH, judge, **how),
            f"judging {target} at {step.target_percent:g}%")
        self._status.last_verdict = verdict
        self._status.verdicts = [*self._status.verdicts[-(VERDICTS_KEPT - 1):], verdict]
        self._status.verdict_count += 1
        return verdict

    async def _decide(self, verdict: Verdict) -> str | None:
        """The end of an A/B test: promote automatically, or wait for an operator."""
        decision = ab_decision(self._input.strategy, self._input.strategy_config, verdict)
        if decision.promote:
            await self._while_paused()  # paused while judging: the operator decides first
            if self._stopping():
                return await self._act_on_request()
            self._action = (c.PROMOTE, c.ControlRequest(reason=decision.reason,
                                                        requested_by="turnout"))
            return await self._act_on_request()
        self._decision_pending = True
        await self._wait_for_operator(decision.reason, until_action=True)
        return await self._act_on_request()

    async def _while_paused(self) -> None:
        """Paused (`_PATCH_PAUSE_EVERYWHERE`): wait for resume, or for an operator's
        rollback, abort or promote, before the next route change."""
        if self._pause_everywhere and self._paused:
            await workflow.wait_condition(lambda: not self._paused or self._stopping())

    async def _wait_for_operator(self, why: str, *, until_action: bool = False) -> None:
        self._paused = True
        self._show(OperationStatus.PAUSED, why, phase="awaiting_decision")
        await workflow.wait_condition(
            lambda: self._stopping() or (not until_action and not self._paused))
        if not self._stopping():
            self._show(OperationStatus.RUNNING, "resumed")

    # ------------------------------------------------------------------ operator requests

    def _abandoning(self) -> bool:
        """A rollback or abort: worth cancelling a load for (a promote waits for it)."""
        return self._action is not None and self._action[0] in (c.ROLLBACK, c.ABORT)

    def _stopping(self) -> bool:
        return self._action is not None and self._action[0] in _ENDING

    async def _act_on_request(self) -> str | None:
        """Carry out a pending rollback, abort or promote. Rollback/abort end the switch."""
        if not self._stopping():
            return None
        assert self._action is not None
        action, request = self._action
        who = request.requested_by or "operator"
        why = f"{action} by {who}" + (f": {request.reason}" if request.reason else "")
        # The API audits the request itself (operator_<action>); this marks it carried out.
        await self._record(f"{action}_applied", reason=why, actor=request.requested_by)
        if action == c.ROLLBACK:
            await self._end_on_stable(Outcome.ROLLED_BACK, why)
        if action == c.ABORT:
            await self._end_on_stable(Outcome.ABORTED, why)
        self._paused = False
        await self._shift(100.0, "promote")
        self._applied.add(c.PROMOTE)
        self._promoted_by = why
        return c.PROMOTE

    # ------------------------------------------------------------------ traffic and engines

    async def _shift(self, percent: float, key: str) -> None:
        target = self._input.target_version
        weights = {target: percent}
        if self._stable and percent < 100:
            weights[self._stable] = round(100 - percent, 2)
        what = f"shifting traffic to {percent:g}% on {target}"
        self._set_phase("shifting", what)
        await self._while_store_away(
            lambda: self._set_traffic(weights, key, summary=f"shift traffic to {percent:g}%"),
            what)

    async def _while_store_away(self, call_: Callable[[], Awaitable[T]], what: str) -> T:
        """`call_()`, tried again after a wait while it fails because the store is away
        (patch store-outage-waits); an operator's rollback or abort asked for meanwhile
        ends the switch as it would at any other time. Any other failure is raised."""
        wait = _STORE_WAIT_FIRST
        while True:
            try:
                return await call_()
            except (ActivityError, ApplicationError) as err:
                if not (_store_away(err) and workflow.patched(_PATCH_STORE_OUTAGE)):
                    raise
                await self._act_on_request()
                phase = self._current().phase
                again = _duration(wait.total_seconds())
                self._set_phase(phase, f"{what}: the store did not answer "
                                       f"({_cause(err)}); trying again in {again}")
                workflow.logger.warning("%s: the store did not answer; trying again in %s",
                                        what, again)
                try:
                    await workflow.wait_condition(
                        self._stopping, timeout=wait,
                        timeout_summary=f"wait for the store, then try {what} again")
                except TimeoutError:
                    pass
                await self._act_on_request()
                self._set_phase(phase, what)
                wait = min(wait * 2, _STORE_WAIT_MAX)

    async def _end_on_stable(self, outcome: Outcome, reason: str) -> None:
        """Route everything back to the stable version first, then release the target."""
        self._set_phase("rolling_back", reason)
        await self._restore()
        assert self._action is None or self._action[0] in _ENDING
        self._applied.update((c.ROLLBACK, c.ABORT))
        if self._controls and workflow.patched(_PATCH_ALERTS):
            await self._cleanup("the rollback alert", self._alert(outcome, reason))
        await self._cleanup(f"releasing {self._input.target_version}",
                            self._let_go(self._input.target_version))
        await self._finish(OperationStatus.FAILED, outcome, reason)

    async def _alert(self, outcome: Outcome, reason: str) -> None:
        s = self._current()
        automatic = self._action is None
        verdict = s.last_verdict
        await self._raise_rollout_alert(
            AlertSeverity.CRITICAL if automatic else AlertSeverity.WARNING,
            f"{s.target_version} of {s.model_id} "
            f"{'rolled back automatically' if automatic else outcome.value}",
            reason, verdict.model_dump(mode="json") if verdict else {},
            summary="raise rollback alert")

    async def _raise_rollout_alert(self, severity: AlertSeverity, title: str, message: str,
                                   figures: dict[str, Any], *, summary: str) -> None:
        """The switch's one `rollout` alert (raised again: refreshed, not added)."""
        s = self._current()
        await calls.execute(
            c.RAISE_ALERT,
            Alert(model_id=s.model_id, version=s.target_version, type="rollout",
                  severity=severity, title=title, message=message,
                  operation_id=s.operation_id, figures=figures),
            summary=summary, **call.STORE_CALL)

    async def _check_target(self) -> c.HealthVerdict:
        target = self._input.target_version
        self._set_phase("checking", f"checking that {target} answers")
        return await calls.execute(
            c.CHECK_HEALTH, c.CheckHealthInput(model_id=self._input.model_id, version=target),
            start_to_close_timeout=call.HEALTH_TIMEOUT,
            retry_policy=call.HEALTH_RETRY, summary=f"check {target} answers")

    async def _retire(self, version: str) -> None:
        """Drain the old version at every gateway, then stop its engine."""
        self._set_phase("draining", f"draining {version}")
        drained: c.DrainVersionResult = await calls.execute(
            c.DRAIN_VERSION, c.DrainVersionInput(model_id=self._input.model_id, version=version),
            start_to_close_timeout=call.DRAIN_TIMEOUT,
            heartbeat_timeout=call.HEARTBEAT, retry_policy=call.HEALTH_RETRY,
            summary=f"drain {version}")
        if not drained.drained:
            workflow.logger.warning("drain of %s hit its deadline with %d requests in flight",
                                    version, drained.inflight_left)
        if not self._fleet:
            self._set_phase("unloading", f"unloading {version}")
            await self._unload(version)
            return
        retired: c.RetireVersionResult = await calls.execute(
            c.RETIRE_VERSION,
            c.RetireVersionInput(model_id=self._input.model_id, version=version,
                                 operation_id=self._input.operation_id),
            summary=f"retire {version}", **call.STORE_CALL)
        await fleet.stop_engines(retired.evict, "cached")
        if retired.standby_until is None:
            self._set_phase("unloading", f"unloading {version}")
            await fleet.stop_engines(retired.stop, "unheld")
            return
        self._set_phase("unloading", f"{version} stands by until "
                        f"{retired.standby_until:%H:%M:%S} UTC for an instant rollback")
        await workflow.start_child_workflow(
            c.STANDBY_WORKFLOW,
            c.StandbyInput(model_id=self._input.model_id, version=version,
                           holder_id=self._input.operation_id, until=retired.standby_until),
            id=f"standby-{self._input.model_id}-{version}-{self._input.operation_id}",
            task_queue=workflow.info().task_queue,
            parent_close_policy=ParentClosePolicy.ABANDON,
            static_summary=f"{version} of {self._input.model_id} stands by until "
                           f"{retired.standby_until:%H:%M:%S} UTC")

    async def _restore(self) -> None:
        """Send all traffic back to the stable version (first thing on any failure).

        Never given up (`_PATCH_NEVER_GIVE_UP`): a failed try is tried again after a
        growing wait, the stable version is loaded again when it has no ready engine, and
        after the first failed try a `rollout` alert says the rollback is not done."""
        weights = {self._stable: 100.0} if self._stable else {}
        summary = f"restore 100% to {self._stable}" if self._stable \
            else "remove traffic from target"
        if not self._never_give_up:
            await self._set_traffic(weights, "restore", summary=summary)
            return
        failures, reloaded, what = 0, False, ""
        while True:
            try:  # each try under a key of its own: the route is written again, anew
                await self._set_traffic(weights, "restore" if failures == 0
                                        else f"restore-{failures}", summary=summary)
                break
            except ActivityError as err:
                failures += 1
                what = f"restoring {self._stable or 'no traffic'} failed ({failures}x): " \
                       f"{_cause(err)}"
                workflow.logger.error("%s: %s", self._input.model_id, what)
                self._set_phase("rolling_back", f"{what}; trying again")
                if failures == 1:
                    await self._cleanup("the alert", self._raise_rollout_alert(
                        AlertSeverity.CRITICAL,
                        f"rollback of {self._input.model_id} to "
                        f"{self._stable or 'no traffic'} is failing", what, {},
                        summary="alert: restoring fails"), note=False)
                # Its engine is gone: load it again and try at once, but only once in a
                # row (a reload that did not make it routable waits like any failure).
                if self._stable and not reloaded and _error_type(err) == c.NO_READY_ENGINE:
                    reloaded = await self._cleanup(f"loading {self._stable} again",
                                                   self._reload(self._stable), note=False)
                    if reloaded:
                        continue
                reloaded = False
                wait = min(call.RESTORE_BACKOFF_FIRST * 2 ** (failures - 1),
                           call.RESTORE_BACKOFF_MAX)
                await workflow.sleep(wait, summary=f"wait {_duration(wait.total_seconds())} "
                                                   f"before restoring again")
        if failures:  # the failing alert says it is over (a rollback's own alert follows)
            await self._cleanup("the alert", self._raise_rollout_alert(
                AlertSeverity.WARNING,
                f"traffic of {self._input.model_id} restored to "
                f"{self._stable or 'no version'} after {failures} failed "
                f"{'try' if failures == 1 else 'tries'}", f"the last: {what}", {},
                summary="alert: restored"), note=False)

    async def _reload(self, version: str) -> None:
        """Load `version` again where it serves (its engines died): held by the route."""
        queues = [self._input.engine_task_queue]
        if self._fleet:
            placed = await fleet.place_version(
                Holder(model_id=self._input.model_id, version=version,
                       kind=HolderKind.SERVING, holder_id=self._input.model_id))
            queues = [] if placed.warm else [slot.task_queue for slot in placed.replicas]
        for load in fleet.start_loads(self._input.model_id, version, queues):
            await load

    async def _cleanup(self, what: str, step: Awaitable[None], *, note: bool = True) -> bool:
        """Run a step that must not fail the switch (`_PATCH_NEVER_GIVE_UP`): a failure is
        logged and, with `note`, named in the operation's final reason. Whether it ran."""
        if not self._never_give_up:
            await step
            return True
        try:
            await step
        except (ActivityError, ChildWorkflowError, WorkflowAlreadyStartedError) as err:
            workflow.logger.error("%s of %s failed: %s", what, self._input.operation_id,
                                  _cause(err))
            if note:
                self._cleanup_failures.append(f"{what} failed: {_cause(err)}")
            return False
        return True

    async def _let_go(self, version: str) -> None:
        """This switch no longer needs `version`: stop its engines unless something else
        holds them (a shadow, a preload, the live route)."""
        if not self._fleet:
            await self._unload(version)
            return
        await fleet.release_version(self._input.model_id, version, HolderKind.SWITCH,
                                    self._input.operation_id)

    async def _unload(self, version: str) -> None:
        await calls.execute(
            c.UNLOAD_VERSION, c.UnloadVersionInput(model_id=self._input.model_id, version=version),
            task_queue=self._input.engine_task_queue, start_to_close_timeout=call.UNLOAD_TIMEOUT,
            heartbeat_timeout=call.HEARTBEAT, retry_policy=call.HEALTH_RETRY,
            summary=f"unload {version}")

    async def _set_traffic(self, weights: dict[str, float], key: str, *, summary: str) -> None:
        await calls.execute(
            c.SET_TRAFFIC,
            c.SetTrafficInput(model_id=self._input.model_id, weights=weights,
                              change_key=f"{self._input.operation_id}/{key}"),
            start_to_close_timeout=call.TRAFFIC_TIMEOUT,
            heartbeat_timeout=call.HEARTBEAT, retry_policy=call.TRAFFIC_RETRY,
            summary=summary)
        assert self._status is not None
        self._status.weights = dict(weights)
        if self._controls:
            workflow.upsert_search_attributes([TRAFFIC_PERCENT.value_set(
                int(round(weights.get(self._input.target_version, 0))))])

    # ------------------------------------------------------------------ bookkeeping

    def _current(self) -> SwitchStatus:
        assert self._status is not None
        return self._status

    def _phase(self) -> str:
        return self._current().phase

    def _show(self, status: OperationStatus, message: str, *, phase: str | None = None) -> None:
        self._current().status = status
        self._set_phase(phase or ("paused" if status is OperationStatus.PAUSED
                                  else "evaluating"), message)

    def _set_phase(self, phase: str, message: str, progress: float | None = None) -> None:
        s = self._current()
        s.phase = phase
        s.message = message
        if progress is not None:
            s.progress = progress
        s.updated_at = workflow.now()
        weights = ", ".join(f"{v} {w:g}%" for v, w in s.weights.items()) or "none"
        details = (f"**{self._input.strategy.value}** switch of `{self._input.model_id}` to "
                   f"`{self._input.target_version}`: {message} (traffic: {weights})")
        if s.last_verdict is not None:
            details += f"; last check {s.last_verdict.outcome}: {s.last_verdict.reason}"
        workflow.set_current_details(details)
        if self._controls and phase != self._shown_phase:
            self._shown_phase = phase
            workflow.upsert_search_attributes([PHASE.value_set(phase)])

    async def _finish(self, status: OperationStatus, outcome: Outcome,
                      reason: str | None) -> None:
        """Record the end, then leave the main loop (raises `_Finished`)."""
        s = self._current()
        s.status = status
        s.outcome = outcome
        if self._cleanup_failures:
            reason = "; ".join(([reason] if reason else []) + self._cleanup_failures)
        s.reason = reason
        if status is OperationStatus.COMPLETED:
            s.progress = 1.0
        self._set_phase("completed" if status is OperationStatus.COMPLETED else "failed",
                        "completed" if status is OperationStatus.COMPLETED
                        else f"failed ({outcome.value})" + (f": {reason}" if reason else ""))
        s.finished_at = workflow.now()
        await self._record("switch_" + ("completed" if status is OperationStatus.COMPLETED
                                        else "failed"))
        self._finished = True
        if self._controls:
            await workflow.wait_condition(workflow.all_handlers_finished)
        raise _Finished(s)

    async def _record(self, event: str, *, reason: str | None = None,
                      actor: str | None = None, audit: bool = True) -> None:
        s = self._current()
        await calls.execute(
            c.RECORD_OPERATION,
            c.RecordOperationInput(
                operation_id=s.operation_id, workflow_id=workflow.info().workflow_id,
                model_id=s.model_id, target_version=s.target_version, strategy=s.strategy.value,
                strategy_config=self._input.strategy_config, event=event, status=s.status,
                outcome=s.outcome, reason=reason or s.reason,
                actor=actor or self._input.requested_by, audit=audit,
                details={"from_version": s.from_version, "weights": s.weights}),
            summary=event.replace("_", " "),
            **(call.STORE_UNTIL_DONE if self._never_give_up and s.status.terminal
               else call.STORE_CALL))


def _store_away(err: ActivityError | ApplicationError) -> bool:
    """Whether an activity failed (after its retries) because the store did not answer. (A
    local activity's failure comes as its own error, a regular one's as the cause.)"""
    cause = err if isinstance(err, ApplicationError) else err.cause
    return isinstance(cause, ApplicationError) and cause.type == c.STORE_UNAVAILABLE


def _cause(err: BaseException) -> str:
    """The innermost message of an activity failure: what actually went wrong."""
    while err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, ApplicationError):
        return err.message
    return str(err)


def _error_type(err: BaseException) -> str | None:
    """The `ApplicationError.type` an activity failed with, if any."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err.type if isinstance(err, ApplicationError) else None


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
