"""Long rollouts and every control path, in seconds, on the time-skipping server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from turnout import contracts as c
from turnout.domain import OperationStatus, Outcome, SwitchInput, SwitchStatus
from workflows import SwitchWorkflow

from .conftest import ENGINE_QUEUE, Harness

CANARY = {"initial_percentage": 10, "step_percentage": 45, "evaluation_period_minutes": 120}


@asynccontextmanager
async def rollout(h: Harness, strategy: str, config: dict[str, Any],
                  target: str = "v2") -> AsyncIterator[WorkflowHandle]:
    h.cluster.live_version = h.cluster.live_version or "v1"
    control, engines = h.workers()
    async with control, engines:
        yield await h.env.client.start_workflow(
            SwitchWorkflow.run,
            SwitchInput(operation_id=uuid.uuid4().hex, model_id="Tiny_chat",
                        target_version=target, strategy=strategy, strategy_config=config,
                        engine_task_queue=ENGINE_QUEUE),
            id=f"switch-{uuid.uuid4()}", task_queue=h.task_queue)


async def status_of(handle: WorkflowHandle) -> SwitchStatus:
    return await handle.query(SwitchWorkflow.status)


async def until(handle: WorkflowHandle, check: Callable[[SwitchStatus], bool]) -> SwitchStatus:
    for _ in range(200):
        status = await status_of(handle)
        if status is not None and check(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition never met: {status}")


def evaluating_at(percent: float) -> Callable[[SwitchStatus], bool]:
    return lambda s: s.phase == "evaluating" and s.weights.get("v2") == percent


async def control(handle: WorkflowHandle, action: str, reason: str = "") -> SwitchStatus:
    return await handle.execute_update(action, c.ControlRequest(reason=reason,
                                                                requested_by="alice"),
                                       result_type=SwitchStatus)


async def test_a_multi_hour_canary_judges_every_step_and_promotes(harness: Harness) -> None:
    async with rollout(harness, "canary", CANARY) as handle:
        result = await handle.result()
    assert (result.status, result.outcome) == (OperationStatus.COMPLETED, Outcome.PROMOTED)
    assert harness.cluster.routes == [{"v2": 10, "v1": 90}, {"v2": 55, "v1": 45}, {"v2": 100}]
    judged = [i for n, i in harness.cluster.calls if n == c.JUDGE_HEALTH]
    assert len(judged) == 2
    assert judged[0].window_end - judged[0].window_start == pytest.approx(7200, abs=5)
    assert len(result.verdicts) == 2 and result.last_verdict.outcome == "healthy"


async def test_an_unhealthy_verdict_rolls_back_on_its_own(harness: Harness) -> None:
    harness.cluster.verdicts = ["healthy", "unhealthy"]
    async with rollout(harness, "canary", CANARY) as handle:
        result = await handle.result()
    assert (result.status, result.outcome) == (OperationStatus.FAILED, Outcome.ROLLED_BACK)
    assert "error rate" in result.reason and "automatic rollback" in result.reason
    assert harness.cluster.routes[-1] == {"v1": 100}
    # Traffic back on stable first, then the target is released.
    names = harness.cluster.names()
    assert names.index(c.UNLOAD_VERSION) > len(names) - 1 - names[::-1].index(c.SET_TRAFFIC)
    assert "v2" not in harness.cluster.loaded
    assert harness.cluster.live_version == "v1"
    [alert] = harness.cluster.alerts
    assert (alert.type, alert.severity.value, alert.version) == ("rollout", "critical", "v2")
    assert "error rate" in alert.message


async def test_inconclusive_extends_the_step_and_is_never_taken_for_health(
        harness: Harness) -> None:
    harness.cluster.verdicts = ["inconclusive", "inconclusive", "healthy"]
    async with rollout(harness, "canary", CANARY) as handle:
        result = await handle.result()
    assert result.outcome is Outcome.PROMOTED
    assert [v.outcome for v in result.verdicts] == [
        "inconclusive", "inconclusive", "healthy", "healthy"]
    # The first step stayed at 10% through its two extensions.
    assert harness.cluster.routes[:2] == [{"v2": 10, "v1": 90}, {"v2": 55, "v1": 45}]


async def test_an_inconclusive_look_is_extended_over_the_steps_whole_window(
        harness: Harness) -> None:
    """Evidence adds up: each extension judges the step from its start (light traffic
    reaches the minimum), the warm-up left out of each of them; the next step judges a
    window of its own, warm-up included."""
    harness.cluster.verdicts = ["inconclusive", "inconclusive", "healthy"]
    async with rollout(harness, "canary", CANARY) as handle:
        result = await handle.result()
    assert result.outcome is Outcome.PROMOTED
    looks = [i for n, i in harness.cluster.calls if n == c.JUDGE_HEALTH]
    first_step, second_step = looks[:3], looks[3]
    assert len({look.window_start for look in first_step}) == 1
    assert [look.window_end for look in first_step] == sorted(
        look.window_end for look in first_step)
    assert all(look.warmup for look in first_step)
    assert second_step.window_start >= first_step[-1].window_end
    assert not second_step.warmup


async def test_endlessly_inconclusive_waits_for_an_operator(harness: Harness) -> None:
    harness.cluster.verdicts = ["inconclusive"] * 4
    async with rollout(harness, "canary", CANARY) as handle:
        for _ in range(4):
            await harness.env.sleep(7200)
        status = await until(handle, lambda s: s.phase == "awaiting_decision")
        assert status.status is OperationStatus.PAUSED
        assert "inconclusive" in status.message
        assert status.weights == {"v2": 10, "v1": 90}
        await control(handle, c.RESUME)
        result = await handle.result()
    assert result.outcome is Outcome.PROMOTED
    # Resumed, the step's next look still judges the step from its start.
    looks = [i for n, i in harness.cluster.calls if n == c.JUDGE_HEALTH]
    assert len({look.window_start for look in looks[:5]}) == 1


async def test_a_48_hour_ab_test_publishes_its_analysis_and_waits_for_promote(
        harness: Harness) -> None:
    config = {"traffic_percentage": 20, "test_duration_hours": 48}
    async with rollout(harness, "ab_test", config) as handle:
        await until(handle, evaluating_at(20))
        await harness.env.sleep(48 * 3600)
        status = await until(handle, lambda s: s.phase == "awaiting_decision")
        assert status.status is OperationStatus.PAUSED
        assert status.last_verdict.analysis == {"compared": True}
        with pytest.raises(WorkflowUpdateFailedError):
            await control(handle, c.RESUME)
        await control(handle, c.PROMOTE, "B wins")
        result = await handle.result()
    assert (result.status, result.outcome) == (OperationStatus.COMPLETED, Outcome.PROMOTED)
    assert "B wins" in result.reason
    assert harness.cluster.routes == [{"v2": 20, "v1": 80}, {"v2": 100}]


async def test_an_ab_test_with_auto_decision_promotes_a_target_that_is_not_worse(
        harness: Harness) -> None:
    config = {"traffic_percentage": 50, "test_duration_hours": 48, "decision": "auto"}
    async with rollout(harness, "ab_test", config) as handle:
        result = await handle.result()
    assert result.outcome is Outcome.PROMOTED
    assert "not worse" in result.reason


async def test_rollback_mid_canary_restores_stable_first(harness: Harness) -> None:
    async with rollout(harness, "canary", CANARY) as handle:
        await until(handle, evaluating_at(10))
        after = await control(handle, c.ROLLBACK, "latency looks off")
        # The update returns as soon as traffic is back on stable; release follows.
        assert after.weights == {"v1": 100}
        result = await handle.result()
    assert result.outcome is Outcome.ROLLED_BACK
    assert "alice" in result.reason and "latency looks off" in result.reason
    assert harness.cluster.routes == [{"v2": 10, "v1": 90}, {"v1": 100}]
    assert "v2" not in harness.cluster.loaded
    events = [i.event for n, i in harness.cluster.calls if n == c.RECORD_OPERATION]
    assert "rollback_applied" in events and events[-1] == "switch_failed"
    [alert] = harness.cluster.alerts
    assert alert.severity.value == "warning" and "latency looks off" in alert.message


async def test_abort_ends_on_stable_as_aborted(harness: Harness) -> None:
    async with rollout(harness, "gradual", {"duration_minutes": 600, "steps": 5}) as handle:
        await until(handle, evaluating_at(20))
        await control(handle, c.ABORT)
        result = await handle.result()
    assert (result.status, result.outcome) == (OperationStatus.FAILED, Outcome.ABORTED)
    assert harness.cluster.routes[-1] == {"v1": 100}


async def test_promote_jumps_to_100_and_finishes(harness: Harness) -> None:
    async with rollout(harness, "canary", CANARY) as handle:
        await until(handle, evaluating_at(10))
        after = await control(handle, c.PROMOTE)
        assert after.weights == {"v2": 100}
        result = await handle.result()
    assert (result.status, result.outcome) == (OperationStatus.COMPLETED, Outcome.PROMOTED)
    assert harness.cluster.routes == [{"v2": 10, "v1": 90}, {"v2": 100}]
    assert harness.cluster.live_version == "v2" and "v1" not in harness.cluster.loaded


async def test_pause_freezes_weights_and_timers_until_resume(harness: Harness) -> None:
    async with rollout(harness, "canary", CANARY) as handle:
        await until(handle, evaluating_at(10))
        paused = await control(handle, c.PAUSE, "watching a dashboard")
        assert paused.status is OperationStatus.PAUSED and paused.next_check_at is None
        with pytest.raises(WorkflowUpdateFailedError):
            await control(handle, c.PAUSE)
        await harness.env.sleep(10 * 3600)  # far past every evaluation period
        still = await status_of(handle)
        assert still.status is OperationStatus.PAUSED
        assert still.weights == {"v2": 10, "v1": 90}
        assert [n for n in harness.cluster.names() if n == c.JUDGE_HEALTH] == []
        resumed = await control(handle, c.RESUME)
        assert resumed.status is OperationStatus.RUNNING
        result = await handle.result()
    assert result.outcome is Outcome.PROMOTED


async def test_rollback_while_loading_cancels_the_load(harness: Harness) -> None:
    harness.cluster.slow_load = True
    async with rollout(harness, "canary", CANARY) as handle:
        await until(handle, lambda s: s.phase == "loading")
        await control(handle, c.ROLLBACK, "wrong version")
        result = await handle.result()
    assert result.outcome is Outcome.ROLLED_BACK
    assert harness.cluster.names().count(c.LOAD_VERSION) == 1
    assert harness.cluster.routes == [{"v1": 100}]


async def test_rollback_while_placing_cancels_the_placement(harness: Harness) -> None:
    """No engine host is live yet: the placement retries for minutes; a rollback meanwhile
    is carried out at once (its update answers), nothing loaded, traffic where it was."""
    harness.cluster.fail(c.PLACE_VERSION, ApplicationError(
        "no engine host is live", type="NoLiveEngineHost"), times=10_000)
    async with rollout(harness, "canary", CANARY) as handle:
        await until(handle, lambda s: s.phase == "loading")
        after = await control(handle, c.ROLLBACK, "no hosts today")
        assert after.weights == {"v1": 100}
        result = await handle.result()
    assert result.outcome is Outcome.ROLLED_BACK and "no hosts today" in result.reason
    assert c.LOAD_VERSION not in harness.cluster.names()
    assert harness.cluster.routes == [{"v1": 100}]


async def test_actions_are_refused_once_the_switch_has_ended(harness: Harness) -> None:
    async with rollout(harness, "immediate", {}) as handle:
        await handle.result()
        for action in c.CONTROL_ACTIONS:
            # The validator refuses, or the server does: the workflow is closed.
            with pytest.raises((WorkflowUpdateFailedError, RPCError)):
                await control(handle, action)


async def test_a_pause_during_a_slow_load_holds_the_first_step_until_resume(
        harness: Harness) -> None:
    """Paused while the target loads: the load finishes, but no route changes (and no
    timer runs) until the operator resumes."""
    harness.cluster.slow_load = True
    async with rollout(harness, "canary", CANARY) as handle:
        await until(handle, lambda s: s.phase == "loading")
        await control(handle, c.PAUSE, "checking the weights first")
        harness.cluster.slow_load = False  # the load completes while paused
        await until(handle, lambda _s: "v2" in harness.cluster.loaded)
        await harness.env.sleep(10 * 3600)  # far past every evaluation period
        still = await status_of(handle)
        assert (still.status, still.weights) == (OperationStatus.PAUSED, {"v1": 100})
        assert harness.cluster.routes == []
        await control(handle, c.RESUME)
        result = await handle.result()
    assert result.outcome is Outcome.PROMOTED
    assert harness.cluster.routes == [{"v2": 10, "v1": 90}, {"v2": 55, "v1": 45}, {"v2": 100}]


async def test_a_pause_while_judging_the_end_of_an_ab_test_holds_its_auto_promote(
        harness: Harness) -> None:
    """Paused while the last look is judged: the automatic promote waits for resume."""
    harness.cluster.judging = asyncio.Event()
    config = {"traffic_percentage": 50, "test_duration_hours": 48, "decision": "auto"}
    async with rollout(harness, "ab_test", config) as handle:
        await until(handle, evaluating_at(50))
        await harness.env.sleep(48 * 3600)
        await until(handle, lambda s: s.phase == "judging")
        await control(handle, c.PAUSE, "want to read the analysis")
        harness.cluster.judging.set()  # the verdict: healthy, not worse
        await until(handle, lambda s: s.last_verdict is not None)
        await harness.env.sleep(24 * 3600)
        assert harness.cluster.routes == [{"v2": 50, "v1": 50}]
        assert (await status_of(handle)).status is OperationStatus.PAUSED
        await control(handle, c.RESUME)
        result = await handle.result()
    assert result.outcome is Outcome.PROMOTED and "not worse" in result.reason
    assert harness.cluster.routes == [{"v2": 50, "v1": 50}, {"v2": 100}]
