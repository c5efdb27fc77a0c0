"""SwitchWorkflow's business logic on the time-skipping server, with activity doubles."""

from __future__ import annotations

import uuid

from temporalio.api.enums.v1 import EventType
from temporalio.exceptions import ApplicationError

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


async def test_the_replaced_version_stands_by_then_is_released(
        own_harness: Harness) -> None:
    harness = own_harness  # its time-skipping locks must not outlive it (see conftest)
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


def restoring(weights: dict[str, float]):  # type: ignore[no-untyped-def]
    return lambda input: input.weights == weights


async def test_a_rollback_whose_stable_engine_is_gone_loads_it_again(
        harness: Harness) -> None:
    """The stable version's engine died before the rollback: the restore finds no ready
    engine, says so in an alert, loads the stable version again (held by the route) and
    then restores; the switch ends rolled back, not with the rollback given up."""
    cluster = harness.cluster
    cluster.live_version = "v1"
    cluster.unhealthy = True
    cluster.fail(c.SET_TRAFFIC, ApplicationError("Tiny_chat v1 has no ready engine",
                                                 type=c.NO_READY_ENGINE, non_retryable=True),
                 when=restoring({"v1": 100}))
    status = await run_switch(harness, "v2")
    assert (status.status, status.outcome) == (OperationStatus.FAILED, Outcome.ROLLED_BACK)
    assert cluster.routes == [{"v2": 100}, {"v1": 100}]
    names = cluster.names()
    failed = names.index(c.SET_TRAFFIC, names.index(c.CHECK_HEALTH))
    place = next(i for i, (n, x) in enumerate(cluster.calls)
                 if n == c.PLACE_VERSION and x.version == "v1")
    load = next(i for i, (n, x) in enumerate(cluster.calls)
                if n == c.LOAD_VERSION and x.version == "v1")
    assert failed < place < load < len(names) - 1 - names[::-1].index(c.SET_TRAFFIC)
    assert ("serving", "Tiny_chat") in cluster.holders["v1"]
    assert "v1" in cluster.loaded
    [failing, restored, rolled_back] = cluster.alerts
    assert "rollback of Tiny_chat to v1 is failing" in failing.title
    assert "no ready engine" in failing.message
    assert restored.title == "traffic of Tiny_chat restored to v1 after 1 failed try"
    assert "rolled back automatically" in rolled_back.title
    records = [i for n, i in cluster.calls if n == c.RECORD_OPERATION]
    assert records[-1].event == "switch_failed" and records[-1].status.terminal


async def test_restoring_the_stable_version_is_never_given_up(harness: Harness) -> None:
    """Gateways that do not confirm the restore five times in a row (each try already
    retried by the activity's policy): the workflow waits longer each time and tries
    again until it succeeds."""
    cluster = harness.cluster
    cluster.live_version = "v1"
    cluster.unhealthy = True
    cluster.fail(c.SET_TRAFFIC, ApplicationError("gateways ['gw'] did not apply generation 2",
                                                 type="GatewaySyncTimeout", non_retryable=True),
                 times=5, when=restoring({"v1": 100}))
    status = await run_switch(harness, "v2")
    assert (status.status, status.outcome) == (OperationStatus.FAILED, Outcome.ROLLED_BACK)
    restores = [i for n, i in cluster.calls
                if n == c.SET_TRAFFIC and i.weights == {"v1": 100}]
    assert len(restores) == 6 and len({i.change_key for i in restores}) == 6
    assert cluster.routes[-1] == {"v1": 100}
    assert [a.title for a in cluster.alerts][:2] == [
        "rollback of Tiny_chat to v1 is failing",
        "traffic of Tiny_chat restored to v1 after 5 failed tries"]


async def test_a_failure_while_retiring_the_old_version_still_completes(
        harness: Harness) -> None:
    """The switch happened (the target is live); draining the old version fails: the
    operation still ends completed, with what failed in its reason and its record."""
    cluster = harness.cluster
    cluster.live_version = "v1"
    cluster.fail(c.DRAIN_VERSION, ApplicationError("no gateway answers", non_retryable=True))
    status = await run_switch(harness, "v2")
    assert (status.status, status.outcome) == (OperationStatus.COMPLETED, Outcome.PROMOTED)
    assert "retiring v1 failed: no gateway answers" in (status.reason or "")
    assert cluster.live_version == "v2"
    last = [i for n, i in cluster.calls if n == c.RECORD_OPERATION][-1]
    assert (last.event, last.status) == ("switch_completed", OperationStatus.COMPLETED)
    assert "retiring v1 failed" in (last.reason or "")


async def test_marking_live_and_the_final_record_outlast_a_long_store_outage(
        harness: Harness) -> None:
    """Marking the target live and the final record are retried by the server without
    limit: 24 failures each, more than the 20 attempts after which a store call gives up
    (the retry policies the workflow asked for say so too)."""
    cluster = harness.cluster
    cluster.live_version = "v1"
    cluster.fail(c.MARK_LIVE, RuntimeError("database is locked"), times=24)
    cluster.fail(c.RECORD_OPERATION, RuntimeError("database is locked"), times=24,
                 when=lambda input: input.status.terminal)
    control, engines = harness.workers()
    async with control, engines:
        handle = await harness.env.client.start_workflow(
            SwitchWorkflow.run,
            SwitchInput(operation_id=uuid.uuid4().hex, model_id="Tiny_chat",
                        target_version="v2", engine_task_queue=ENGINE_QUEUE),
            id=f"switch-{uuid.uuid4()}", task_queue=harness.task_queue)
        status = await handle.result()
    assert (status.status, status.outcome) == (OperationStatus.COMPLETED, Outcome.PROMOTED)
    assert cluster.names().count(c.MARK_LIVE) == 25 and cluster.live_version == "v2"
    finals = [i for n, i in cluster.calls if n == c.RECORD_OPERATION and i.status.terminal]
    assert len(finals) == 25
    attempts = {}
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled = event.activity_task_scheduled_event_attributes
            attempts.setdefault(scheduled.activity_type.name, []).append(
                scheduled.retry_policy.maximum_attempts)
    assert attempts[c.MARK_LIVE] == [0]
    # Every record but the last (the terminal one) gives up after 20 attempts.
    assert attempts[c.RECORD_OPERATION][:-1] == [20] * (len(attempts[c.RECORD_OPERATION]) - 1)
    assert attempts[c.RECORD_OPERATION][-1] == 0


async def test_a_model_that_cannot_be_read_ends_with_a_terminal_record(
        harness: Harness) -> None:
    harness.cluster.fail(c.DESCRIBE_MODEL, ApplicationError(
        "model 'Tiny_chat' is not registered", type="NotFound", non_retryable=True))
    status = await run_switch(harness, "v2")
    assert (status.status, status.outcome) == (OperationStatus.FAILED, Outcome.ERROR)
    assert "is not registered" in (status.reason or "")
    assert harness.cluster.routes == []
    last = [i for n, i in harness.cluster.calls if n == c.RECORD_OPERATION][-1]
    assert (last.event, last.status) == ("switch_failed", OperationStatus.FAILED)
