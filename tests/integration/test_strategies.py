"""Every strategy run to its end on real parts: a Temporal dev server, the workers, the store,
the gateway and the API over HTTP, judged on real requests through the gateway; versions
are fake OpenAI engines (external endpoints) so a version can be made to fail on purpose.

Each test also records its history for the replay tests (`RECORD_HISTORIES=1`). They run
in file order on one model: `v1` goes live first, then switches move between `v1` and `v2`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.integration.plane import (
    ControlPlane,
    control_plane,
    record_history,
    register_upstreams,
    traffic,
    wait_done,
)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

ARCH, STAGE = "StrategiesArch", "thinker"
MODEL_ID = f"{ARCH}_{STAGE}"
# Both fakes answer after the same 20 ms, so a healthy target is compared with an equally
# fast stable version, at the default analysis settings: the latency guards test "slower
# by more than the tolerance", which scheduling noise of a busy test machine is not
# (the statistics are unit-tested in tests/unit/telemetry/test_verdicts.py).
DELAY_S = 0.02
# A target this much slower is worse than stable on every latency guard (and far within
# the absolute limits).
SLOW_S = 0.1
# An A/B test of a SLOW_S target lasts this long: the one sequential client sends that
# target 5-8 requests a second, and its first 25 are left out as warm-up, so 7.2 s
# (0.002 h) left 19-30 judged requests, on the edge of the 20 a verdict needs (CI judged
# one "inconclusive: only 19"); 14.4 s leaves well over 20 on a busy machine too.
SLOW_AB_HOURS = 0.004


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory,
                new_database: Callable[[Path], str]) -> AsyncIterator[ControlPlane]:
    root = tmp_path_factory.mktemp("strategies")
    async with control_plane(root, database_url=new_database(root)) as plane:
        for upstream in plane.upstreams.values():
            upstream.delay_s = DELAY_S
        yield plane


async def switch(client: httpx.AsyncClient, target: str, strategy: str = "immediate",
                 **options: Any) -> str:
    response = await client.post("/switch", json={
        "model_id": MODEL_ID, "target_version": target, "strategy": strategy,
        "strategy_config": options, "requested_by": "ci"})
    assert response.status_code == 202, response.text
    return str(response.json()["operation_id"])


async def wait_phase(client: httpx.AsyncClient, operation_id: str, phase: str,
                     timeout_s: float = 60) -> dict[str, Any]:
    for _ in range(int(timeout_s * 10)):
        status = (await client.get(f"/switch/operations/{operation_id}")).json()
        if status["phase"] == phase:
            return dict(status)
        assert status["status"] not in ("completed", "failed"), status
        await asyncio.sleep(0.1)
    raise AssertionError(f"{operation_id} never reached phase {phase}: {status}")


async def test_v1_goes_live(plane: ControlPlane) -> None:
    async with plane.http() as client:
        await register_upstreams(plane, client, ARCH, STAGE)
        status = await wait_done(client, await switch(client, "v1"))
        assert status["status"] == "completed", status


async def test_gradual_judges_each_step_then_completes(plane: ControlPlane) -> None:
    async with plane.http() as client, traffic(plane.gateway_url, MODEL_ID) as seen:
        operation_id = await switch(client, "v2", "gradual", duration_minutes=0.1, steps=2)
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "gradual-healthy")
    assert (status["status"], status["outcome"], status["progress"]) == \
        ("completed", "promoted", 1.0), status
    assert (status["step"], status["total_steps"]) == (2, 2)
    # One verdict before the only increase (50% → 100%), healthy, on real requests.
    [verdict] = status["verdicts"]
    assert verdict["outcome"] == "healthy", verdict
    assert verdict["target"]["requests"] >= 20 and verdict["stable"]["requests"] >= 20
    assert seen.served.get("v1", 0) > 0 and seen.served.get("v2", 0) > 0


async def test_unhealthy_canary_rolls_back_on_its_own(plane: ControlPlane) -> None:
    plane.upstreams["v1"].fail_fraction = 0.5  # the target (v1) now fails half its requests
    try:
        async with plane.http() as client, \
                traffic(plane.gateway_url, MODEL_ID, may_fail=("v1",)):
            operation_id = await switch(client, "v1", "canary", initial_percentage=30,
                                        step_percentage=30, evaluation_period_minutes=0.05)
            status = await wait_done(client, operation_id)
            await record_history(plane, operation_id, "canary-auto-rollback")
            alerts = (await client.get("/alerts", params={"model_id": MODEL_ID})).json()
            model = (await client.get(f"/models/{MODEL_ID}")).json()
    finally:
        plane.upstreams["v1"].fail_fraction = 0.0
    assert (status["status"], status["outcome"]) == ("failed", "rolled_back"), status
    assert status["reason"].startswith("automatic rollback: ") and "error rate" in \
        status["reason"], status["reason"]
    assert status["weights"] == {"v2": 100.0}
    assert status["last_verdict"]["outcome"] == "unhealthy"
    assert status["last_verdict"]["analysis"]["error_rate"]["over_limit"] is True
    assert model["live_version"] == "v2"
    [alert] = [a for a in alerts if a["operation_id"] == operation_id]
    assert (alert["severity"], alert["type"]) == ("critical", "rollout"), alert


async def test_ab_test_publishes_its_analysis_and_waits_for_an_operator(
        plane: ControlPlane) -> None:
    async with plane.http() as client:
        async with traffic(plane.gateway_url, MODEL_ID) as seen:
            operation_id = await switch(client, "v1", "ab_test", traffic_percentage=50,
                                        test_duration_hours=0.002)
            waiting = await wait_phase(client, operation_id, "awaiting_decision")
        assert waiting["status"] == "paused", waiting
        assert waiting["weights"] == {"v1": 50.0, "v2": 50.0}
        analysis = waiting["last_verdict"]["analysis"]
        assert {"error_rate", "latency"} <= analysis.keys()
        assert "not_worse" in analysis["error_rate"] and "winner" in analysis["latency"]
        assert seen.served.get("v1", 0) > 0 and seen.served.get("v2", 0) > 0
        refused = await client.post(f"/switch/operations/{operation_id}/resume")
        assert refused.status_code == 409 and "promote or roll back" in refused.text
        promoted = await client.post(f"/switch/operations/{operation_id}/promote",
                                     json={"reason": "A wins", "requested_by": "erin"})
        assert promoted.status_code == 200, promoted.text
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "ab-test-manual-promote")
    assert (status["status"], status["outcome"]) == ("completed", "promoted"), status
    assert "A wins" in status["reason"]


async def test_ab_test_with_auto_decision_promotes_a_target_that_is_not_worse(
        plane: ControlPlane) -> None:
    async with plane.http() as client, traffic(plane.gateway_url, MODEL_ID):
        operation_id = await switch(client, "v2", "ab_test", traffic_percentage=50,
                                    test_duration_hours=0.002, decision="auto")
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "ab-test-auto-promote")
    assert (status["status"], status["outcome"]) == ("completed", "promoted"), status
    assert status["last_verdict"]["outcome"] == "healthy"
    assert "A/B test: target not worse" in status["reason"]


async def test_quiet_canary_is_extended_then_waits_for_an_operator(plane: ControlPlane) -> None:
    async with plane.http() as client:  # no traffic at all: nothing is proved
        operation_id = await switch(client, "v1", "canary", initial_percentage=10,
                                    step_percentage=50, evaluation_period_minutes=0.01)
        waiting = await wait_phase(client, operation_id, "awaiting_decision")
        assert waiting["status"] == "paused"
        assert [v["outcome"] for v in waiting["verdicts"]] == ["inconclusive"] * 4
        assert waiting["weights"] == {"v1": 10.0, "v2": 90.0}
        rolled = await client.post(f"/switch/operations/{operation_id}/rollback",
                                   json={"reason": "no traffic to judge"})
        assert rolled.status_code == 200, rolled.text
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "canary-inconclusive-operator-rollback")
        model = (await client.get(f"/models/{MODEL_ID}")).json()
    assert (status["status"], status["outcome"]) == ("failed", "rolled_back"), status
    assert model["live_version"] == "v2"


# The A/B decision paths (README, "Strategies"). The model's live version is v2 here.


async def test_a_manual_ab_test_with_a_slower_target_waits_for_an_operator(
        plane: ControlPlane) -> None:
    """Worse than stable only (no absolute limit crossed): the test's result goes to the
    operator, who decides."""
    plane.upstreams["v1"].delay_s = SLOW_S
    try:
        async with plane.http() as client:
            async with traffic(plane.gateway_url, MODEL_ID):
                operation_id = await switch(client, "v1", "ab_test", traffic_percentage=50,
                                            test_duration_hours=SLOW_AB_HOURS)
                waiting = await wait_phase(client, operation_id, "awaiting_decision")
            assert waiting["status"] == "paused", waiting
            verdict = waiting["last_verdict"]
            assert verdict["outcome"] == "unhealthy", verdict
            assert "latency" in verdict["reason"] and "vs stable" in verdict["reason"]
            assert "ended with the target worse" in waiting["message"], waiting["message"]
            assert waiting["weights"] == {"v1": 50.0, "v2": 50.0}
            rolled = await client.post(f"/switch/operations/{operation_id}/rollback",
                                       json={"reason": "slower", "requested_by": "erin"})
            assert rolled.status_code == 200, rolled.text
            status = await wait_done(client, operation_id)
            await record_history(plane, operation_id, "ab-test-manual-worse-operator-rollback")
    finally:
        plane.upstreams["v1"].delay_s = DELAY_S
    assert (status["status"], status["outcome"]) == ("failed", "rolled_back"), status
    assert "slower" in status["reason"] and status["weights"] == {"v2": 100.0}


async def test_a_manual_ab_test_over_an_absolute_limit_rolls_back_on_its_own(
        plane: ControlPlane) -> None:
    plane.upstreams["v1"].fail_fraction = 0.5
    try:
        async with plane.http() as client, \
                traffic(plane.gateway_url, MODEL_ID, may_fail=("v1",)):
            operation_id = await switch(client, "v1", "ab_test", traffic_percentage=50,
                                        test_duration_hours=0.002)
            status = await wait_done(client, operation_id)
    finally:
        plane.upstreams["v1"].fail_fraction = 0.0
    assert (status["status"], status["outcome"]) == ("failed", "rolled_back"), status
    assert status["reason"].startswith("automatic rollback: error rate"), status["reason"]


async def test_an_auto_ab_test_with_a_slower_target_rolls_back_on_its_own(
        plane: ControlPlane) -> None:
    plane.upstreams["v1"].delay_s = SLOW_S
    try:
        async with plane.http() as client, traffic(plane.gateway_url, MODEL_ID):
            operation_id = await switch(client, "v1", "ab_test", traffic_percentage=50,
                                        test_duration_hours=SLOW_AB_HOURS, decision="auto")
            status = await wait_done(client, operation_id)
            await record_history(plane, operation_id, "ab-test-auto-worse-rollback")
    finally:
        plane.upstreams["v1"].delay_s = DELAY_S
    assert (status["status"], status["outcome"]) == ("failed", "rolled_back"), status
    assert status["reason"].startswith("automatic rollback: ") and "latency" in \
        status["reason"], status["reason"]
    assert status["weights"] == {"v2": 100.0}


async def test_an_auto_ab_test_without_traffic_waits_for_an_operator(
        plane: ControlPlane) -> None:
    """Inconclusive is never taken for "not worse"."""
    async with plane.http() as client:
        operation_id = await switch(client, "v1", "ab_test", traffic_percentage=50,
                                    test_duration_hours=0.001, decision="auto")
        waiting = await wait_phase(client, operation_id, "awaiting_decision")
        assert waiting["last_verdict"]["outcome"] == "inconclusive", waiting
        assert "the A/B test was inconclusive" in waiting["message"]
        rolled = await client.post(f"/switch/operations/{operation_id}/rollback",
                                   json={"reason": "nothing to judge"})
        assert rolled.status_code == 200, rolled.text
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "ab-test-auto-inconclusive-operator-rollback")
    assert (status["status"], status["outcome"]) == ("failed", "rolled_back"), status


async def test_a_paused_ab_test_holds_its_split_and_clock(plane: ControlPlane) -> None:
    """Paused during the test, nothing moves: no verdict, the same split, no check due;
    resumed, it runs the rest of its duration and decides."""
    async with plane.http() as client, traffic(plane.gateway_url, MODEL_ID):
        operation_id = await switch(client, "v1", "ab_test", traffic_percentage=50,
                                    test_duration_hours=0.003, decision="auto")
        await wait_phase(client, operation_id, "evaluating")
        paused = await client.post(f"/switch/operations/{operation_id}/pause",
                                   json={"requested_by": "erin"})
        assert paused.status_code == 200, paused.text
        await asyncio.sleep(0.003 * 3600 + 3)  # longer than the whole test
        held = (await client.get(f"/switch/operations/{operation_id}")).json()
        assert (held["status"], held["weights"], held["verdicts"]) == (
            "paused", {"v1": 50.0, "v2": 50.0}, []), held
        assert held["next_check_at"] is None
        resumed = await client.post(f"/switch/operations/{operation_id}/resume", json={})
        assert resumed.status_code == 200, resumed.text
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "ab-test-pause-resume-auto-promote")
    assert (status["status"], status["outcome"]) == ("completed", "promoted"), status
    assert [v["outcome"] for v in status["verdicts"]] == ["healthy"]


async def test_a_canary_under_light_traffic_adds_up_its_looks_and_promotes(
        plane: ControlPlane) -> None:
    """About 5 target requests a second and 3-s looks: each look alone has ~15 of the 20
    requests a verdict needs, so judged one by one the canary stays inconclusive and ends
    waiting for an operator; extended over the step's whole window, the evidence adds up
    and a healthy target is promoted."""
    async with plane.http() as client, traffic(plane.gateway_url, MODEL_ID, pace_s=0.08):
        operation_id = await switch(client, "v2", "canary", initial_percentage=50,
                                    step_percentage=50, evaluation_period_minutes=0.05)
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "canary-light-traffic-looks-add-up")
    assert (status["status"], status["outcome"]) == ("completed", "promoted"), status
    outcomes = [v["outcome"] for v in status["verdicts"]]
    first = outcomes.index("healthy")
    assert first >= 1 and set(outcomes[:first]) == {"inconclusive"}, outcomes
    looks = status["verdicts"][:first + 1]
    assert len({v["window_start"] for v in looks}) == 1  # one growing window
    assert looks[-1]["window_end"] - looks[-1]["window_start"] >= 2 * 3
