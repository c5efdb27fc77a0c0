"""SwitchWorkflow's business logic on the time-skipping server, with activity doubles."""

from __future__ import annotations

import uuid

from turnout import contracts as c
from turnout.domain import OperationStatus, Outcome, SwitchInput, SwitchStatus
from workflows import SwitchWorkflow

from .conftest import ENGINE_QUEUE, Harness


async def run_switch(h: Harness, target: str, strategy: str = "immediate",
                     config: dict | None = None) -> SwitchStatus:
    control, engines = h.workers()
    async with control, engines:
        return await h.env.client.execute_workflow(
            SwitchWorkflow.run,
            SwitchInput(operation_id=uuid.uuid4().hex, model_id="Tiny_chat",
                        target_version=target, strategy=strategy,
                        strategy_config=config or {}, engine_task_queue=ENGINE_QUEUE),
            id=f"switch-{uuid.uuid4()}", task_queue=h.task_queue)


async def test_immediate_switch_loads_routes_checks_marks_live_then_retires_old(
        harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    harness.cluster.loaded = {"v1"}
    status = await run_switch(harness, "v2")
    assert status.status is OperationStatus.COMPLETED
    assert status.outcome is Outcome.PROMOTED
    assert status.progress == 1.0
    assert status.from_version == "v1"
    assert harness.cluster.routes == [{"v2": 100}]
    assert harness.cluster.live_version == "v2"
    assert harness.cluster.loaded == {"v2"}
    work = [n for n in harness.cluster.names() if n != c.RECORD_OPERATION]
    assert work == [c.DESCRIBE_MODEL, c.PLACE_VERSION, c.LOAD_VERSION, c.SET_TRAFFIC,
                    c.CHECK_HEALTH, c.MARK_LIVE, c.DRAIN_VERSION, c.RETIRE_VERSION,
                    c.UNLOAD_VERSION]
    # Draining the old version comes after traffic left it, never before.
    drained = next(i for i, (n, _) in enumerate(harness.cluster.calls) if n == c.DRAIN_VERSION)
    routed = next(i for i, (n, _) in enumerate(harness.cluster.calls) if n == c.SET_TRAFFIC)
    assert routed < drained


async def test_first_switch_of_a_model_has_nothing_to_retire(harness: Harness) -> None:
    status = await run_switch(harness, "v1")
    assert status.status is OperationStatus.COMPLETED
    assert status.from_version is None
    assert c.DRAIN_VERSION not in harness.cluster.names()
    assert harness.cluster.routes == [{"v1": 100}]


async def test_failed_load_leaves_traffic_untouched(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    harness.cluster.fail_load = "v2"
    status = await run_switch(harness, "v2")
    assert status.status is OperationStatus.FAILED
    assert status.outcome is Outcome.LOAD_FAILED
    assert "config.json is not valid JSON" in (status.reason or "")
    assert harness.cluster.routes == []
    assert harness.cluster.live_version == "v1"


async def test_target_that_does_not_answer_is_rolled_back_to_stable(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    harness.cluster.unhealthy = True
    status = await run_switch(harness, "v2")
    assert status.status is OperationStatus.FAILED
    assert status.outcome is Outcome.ROLLED_BACK
    assert harness.cluster.routes == [{"v2": 100}, {"v1": 100}]
    assert harness.cluster.live_version == "v1"
    assert "v2" not in harness.cluster.loaded


async def test_every_event_is_recorded_for_the_audit_log(harness: Harness) -> None:
    await run_switch(harness, "v1")
    events = [i.event for n, i in harness.cluster.calls if n == c.RECORD_OPERATION]
    assert events == ["switch_started", "switch_completed"]


async def test_a_long_canary_runs_its_timers_durably(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    status = await run_switch(harness, "v2", "canary",
                              {"initial_percentage": 10, "step_percentage": 45,
                               "evaluation_period_minutes": 600})
    assert status.status is OperationStatus.COMPLETED
    assert harness.cluster.routes == [{"v2": 10, "v1": 90}, {"v2": 55, "v1": 45}, {"v2": 100}]


async def test_the_replaced_version_stands_by_then_is_released(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    harness.cluster.loaded = {"v1"}
    harness.cluster.standby_minutes = 30
    control, engines = harness.workers()
    operation = uuid.uuid4().hex
    async with control, engines:
        # An immediate switch has no timer of its own: run it in real time, so the
        # standby's window does not pass before we look.
        with harness.env.auto_time_skipping_disabled():
            status = await harness.env.client.execute_workflow(
                SwitchWorkflow.run,
                SwitchInput(operation_id=operation, model_id="Tiny_chat",
                            target_version="v2", engine_task_queue=ENGINE_QUEUE),
                id=f"switch-{uuid.uuid4()}", task_queue=harness.task_queue)
        assert status.outcome is Outcome.PROMOTED
        # The switch is over; v1 is still loaded, held by its standby window.
        assert harness.cluster.loaded == {"v1", "v2"}
        assert harness.cluster.holders["v1"] == {("standby", operation)}
        assert c.UNLOAD_VERSION not in harness.cluster.names()
        standby = harness.env.client.get_workflow_handle(
            f"standby-Tiny_chat-v1-{operation}")
        async with harness.env.time_skipping_unlocked():  # the 30 minutes are skipped
            await standby.result()
    assert harness.cluster.holders["v1"] == set()
    assert harness.cluster.loaded == {"v2"}
    [unload] = [i for n, i in harness.cluster.calls if n == c.UNLOAD_VERSION]
    assert (unload.version, unload.when) == ("v1", "unheld")


async def test_a_switch_to_a_loaded_version_says_it_started_warm(harness: Harness) -> None:
    harness.cluster.live_version = "v2"
    harness.cluster.warm = {"v1"}
    status = await run_switch(harness, "v1")
    assert status.outcome is Outcome.PROMOTED and status.warm_start is True
    cold = await run_switch(harness, "v3")
    assert cold.warm_start is False


async def test_a_failed_load_lets_go_of_the_target(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    harness.cluster.fail_load = "v2"
    status = await run_switch(harness, "v2")
    assert status.outcome is Outcome.LOAD_FAILED
    assert harness.cluster.holders["v2"] == set()
    released = [i for n, i in harness.cluster.calls if n == c.RELEASE_VERSION]
    assert [(r.version, r.kind.value) for r in released] == [("v2", "switch")]


async def test_a_rolled_back_target_a_shadow_holds_keeps_its_engine(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    harness.cluster.unhealthy = True
    harness.cluster.holders["v2"] = {("shadow", "shadow-Tiny_chat")}
    status = await run_switch(harness, "v2")
    assert status.outcome is Outcome.ROLLED_BACK
    assert harness.cluster.routes[-1] == {"v1": 100}
    assert "v2" in harness.cluster.loaded  # the shadow still mirrors to it
    assert c.UNLOAD_VERSION not in harness.cluster.names()
