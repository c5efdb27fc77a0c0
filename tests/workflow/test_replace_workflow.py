"""ReplaceEngineWorkflow's decisions on the time-skipping server, with activity doubles."""

from __future__ import annotations

import uuid

from turnout import contracts as c
from workflows import ReplaceEngineWorkflow

from .conftest import ENGINE_QUEUE, Harness


async def replace(h: Harness, role: str) -> str:
    control, engines = h.workers()
    slot = c.EngineSlot(model_id="m", version="v1", host_id="gpu-2", task_queue=ENGINE_QUEUE)
    async with control, engines:
        return await h.env.client.execute_workflow(
            ReplaceEngineWorkflow.run,
            c.ReplaceEngineInput(slot=slot, role=role, pid=4242, exit="killed by signal 9"),
            id=f"replace-{uuid.uuid4()}", task_queue=h.task_queue)


async def test_a_dead_serving_engine_is_started_again_and_routed_to(harness: Harness) -> None:
    outcome = await replace(harness, "serving")
    assert outcome == "replaced the engine of v1 of m on gpu-2"
    assert harness.cluster.names() == [c.RAISE_ALERT, c.LOAD_VERSION, c.REFRESH_ROUTE,
                                       c.RESOLVE_ALERT]
    [alert] = [a for n, a in harness.cluster.calls if n == c.RAISE_ALERT]
    assert (alert.type, alert.severity.value) == ("engine", "critical")
    assert "gpu-2" in alert.title and "signal 9" in alert.message
    assert harness.cluster.alerts == []  # resolved once replaced


async def test_a_dead_cached_engine_is_dropped_not_restarted(harness: Harness) -> None:
    outcome = await replace(harness, "standby")
    assert outcome == "dropped the dead standby engine of v1 of m on gpu-2"
    assert harness.cluster.names() == [c.RAISE_ALERT, c.UNLOAD_VERSION, c.RESOLVE_ALERT]


async def test_an_engine_that_cannot_start_again_keeps_its_alert(harness: Harness) -> None:
    harness.cluster.fail_load = "v1"
    outcome = await replace(harness, "candidate")
    assert outcome.startswith("could not replace the engine of v1 of m on gpu-2")
    assert c.RESOLVE_ALERT not in harness.cluster.names()
    assert [a.type for a in harness.cluster.alerts] == ["engine"]
