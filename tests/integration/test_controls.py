"""Operators steer running switches: pause, resume, promote, rollback, abort, emergency
rollback, over REST, the SDK and the CLI, on a real Temporal dev server, real workers,
store and gateway (the `plane` fixture), with fake external engines.

The tests run in file order and share one model: `v1` is made live first, then canaries
move between `v1` and `v2`, each ended by an operator.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.integration.plane import ControlPlane, cli, record_history, wait_done
from turnout.sdk import ModelSwitcher, TurnoutAPIError

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

ARCH, STAGE = "ControlsArch", "canary"
MODEL_ID = f"{ARCH}_{STAGE}"
LONE_ID = f"{ARCH}_lonely"  # one version, never switched: nothing to roll back to
# Evaluations long enough that only an operator ends a canary during a test.
SLOW_CANARY = {"initial_percentage": 20, "step_percentage": 40, "evaluation_period_minutes": 60}
ACTIONS = ("rollback", "pause", "resume", "promote", "abort")

# Operations that finished, by how: later tests act on them.
finished: dict[str, str] = {}


def register_body(plane: ControlPlane, version: str, stage: str = STAGE) -> dict[str, Any]:
    return {"model": "tiny/controls", "model_arch": ARCH, "model_stage": stage,
            "version": version, "endpoint": plane.upstreams[version].url,
            "served_model_name": f"served-{version}"}


async def start_canary(client: httpx.AsyncClient, target: str) -> str:
    """Start a slow canary to `target`; return once its first step holds traffic on it."""
    response = await client.post("/switch", json={
        "model_id": MODEL_ID, "target_version": target, "strategy": "canary",
        "strategy_config": SLOW_CANARY, "requested_by": "ci"})
    assert response.status_code == 202, response.text
    operation_id = response.json()["operation_id"]
    for _ in range(300):
        status = (await client.get(f"/switch/operations/{operation_id}")).json()
        if status["weights"].get(target, 0) > 0 and status["phase"] == "evaluating":
            assert status["status"] == "running", status
            return operation_id
        assert status["status"] not in ("completed", "failed"), status
        await asyncio.sleep(0.1)
    raise AssertionError(f"canary {operation_id} never put traffic on {target}: {status}")


async def served_versions(plane: ControlPlane, requests: int = 10) -> set[str]:
    """Which versions the gateway answers with, over real HTTP."""
    seen = set()
    async with httpx.AsyncClient(base_url=plane.gateway_url, timeout=30) as gateway:
        for i in range(requests):
            answer = await gateway.post("/v1/completions", json={
                "model": MODEL_ID, "prompt": "hi", "user": f"user-{i}"})
            assert answer.status_code == 200, answer.text
            seen.add(answer.headers["x-turnout-version"])
    return seen


async def control(client: httpx.AsyncClient, operation_id: str, action: str,
                  **body: Any) -> httpx.Response:
    return await client.post(f"/switch/operations/{operation_id}/{action}",
                             json=body or None)


async def test_v1_goes_live(plane: ControlPlane) -> None:
    async with plane.http() as client:
        for version in ("v1", "v2"):
            response = await client.post("/models", json=register_body(plane, version))
            assert response.status_code == 201, response.text
        response = await client.post("/switch", json={"model_id": MODEL_ID,
                                                       "target_version": "v1"})
        assert response.status_code == 202, response.text
        status = await wait_done(client, response.json()["operation_id"])
        assert (status["status"], status["outcome"]) == ("completed", "promoted"), status
    assert await served_versions(plane) == {"v1"}


async def test_pause_resume_then_promote(plane: ControlPlane) -> None:
    async with plane.http() as client:
        operation_id = await start_canary(client, "v2")

        paused = await control(client, operation_id, "pause", reason="check dashboards",
                               requested_by="alice")
        assert paused.status_code == 200, paused.text
        assert paused.json()["status"] == "paused"
        assert paused.json()["operation_id"] == operation_id
        status = (await client.get(f"/switch/operations/{operation_id}")).json()
        assert status["status"] == "paused"
        assert status["weights"] == {"v2": 20.0, "v1": 80.0}

        again = await control(client, operation_id, "pause")
        assert again.status_code == 409, again.text
        assert "paused" in again.json()["detail"]

        resumed = await control(client, operation_id, "resume", requested_by="alice")
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["status"] == "running"
        not_paused = await control(client, operation_id, "resume")
        assert not_paused.status_code == 409 and "not paused" in not_paused.json()["detail"]

        promoted = await control(client, operation_id, "promote", reason="looks good",
                                 requested_by="alice")
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["weights"] == {"v2": 100.0}
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "canary-pause-resume-promote")
        assert (status["status"], status["outcome"]) == ("completed", "promoted"), status
        assert status["success"] is True
        model = (await client.get(f"/models/{MODEL_ID}")).json()
        assert (model["live_version"], model["previous_version"]) == ("v2", "v1")
    assert await served_versions(plane) == {"v2"}
    finished["promoted"] = operation_id


async def test_rollback_with_a_reason_restores_the_stable_version(plane: ControlPlane) -> None:
    async with plane.http() as client:
        operation_id = await start_canary(client, "v1")
        assert await served_versions(plane, 50) == {"v1", "v2"}
        rolled = await control(client, operation_id, "rollback", reason="p95 regression",
                               requested_by="bob")
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["weights"] == {"v2": 100.0}
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "canary-operator-rollback")
        assert (status["status"], status["outcome"]) == ("failed", "rolled_back"), status
        assert "p95 regression" in status["reason"]
        assert (await client.get(f"/models/{MODEL_ID}")).json()["live_version"] == "v2"
        alerts = (await client.get("/alerts", params={"model_id": MODEL_ID})).json()
        [alert] = [a for a in alerts if a["operation_id"] == operation_id]
        assert (alert["type"], alert["severity"], alert["state"]) == \
            ("rollout", "warning", "firing")
        assert "p95 regression" in alert["message"]
        acked = await client.post(f"/alerts/{alert['id']}/acknowledge",
                                  json={"requested_by": "bob"})
        # Authentication is off here: the actor is `anonymous`, `requested_by` a note.
        assert acked.status_code == 200 and acked.json()["acknowledged_by"] == "anonymous"
        assert (await client.post("/alerts/999999/acknowledge")).status_code == 404
    assert await served_versions(plane) == {"v2"}
    finished["rolled_back"] = operation_id


async def test_abort_returns_traffic_and_ends_the_switch(plane: ControlPlane) -> None:
    async with plane.http() as client:
        operation_id = await start_canary(client, "v1")
        aborted = await control(client, operation_id, "abort")  # no body at all
        assert aborted.status_code == 200, aborted.text
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "canary-abort")
        assert (status["status"], status["outcome"]) == ("failed", "aborted"), status
    assert await served_versions(plane) == {"v2"}
    finished["aborted"] = operation_id


@pytest.mark.parametrize("action", ACTIONS)
async def test_actions_on_a_finished_switch_are_409(plane: ControlPlane, action: str) -> None:
    # One switch ended each way by the tests before (they run in file order): none missing,
    # or this would check nothing.
    assert finished.keys() == {"promoted", "rolled_back", "aborted"}, finished
    async with plane.http() as client:
        for operation_id in finished.values():
            response = await control(client, operation_id, action, reason="too late")
            assert response.status_code == 409, response.text
            assert response.json()["detail"]


async def test_unknown_operation_is_404_and_unknown_action_422(plane: ControlPlane) -> None:
    async with plane.http() as client:
        missing = await control(client, "does-not-exist", "pause")
        assert missing.status_code == 404 and "does-not-exist" in missing.json()["detail"]
        bogus = await control(client, finished["promoted"], "explode")
        assert bogus.status_code == 422
        assert "action" in [str(p) for e in bogus.json()["detail"] for p in e["loc"]]
        too_long = await control(client, finished["promoted"], "pause", reason="x" * 3000)
        assert too_long.status_code == 422


async def test_emergency_rollback_rolls_back_the_active_switch(plane: ControlPlane) -> None:
    async with plane.http() as client:
        operation_id = await start_canary(client, "v1")
        response = await client.post(f"/models/{MODEL_ID}/rollback",
                                     json={"reason": "pager went off", "requested_by": "carol"})
        assert response.status_code == 200, response.text
        assert response.json()["operation_id"] == operation_id
        assert response.json()["weights"] == {"v2": 100.0}
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "canary-emergency-rollback")
        assert (status["status"], status["outcome"]) == ("failed", "rolled_back"), status
        assert "pager went off" in status["reason"]
    assert await served_versions(plane) == {"v2"}


async def test_emergency_rollback_without_a_switch_goes_back_to_previous(
        plane: ControlPlane) -> None:
    async with plane.http() as client:
        response = await client.post(f"/models/{MODEL_ID}/rollback",
                                     json={"reason": "bad answers", "requested_by": "dave"})
        assert response.status_code == 202, response.text
        operation_id = response.json()["operation_id"]
        status = await wait_done(client, operation_id)
        await record_history(plane, operation_id, "immediate-emergency-rollback")
        assert (status["status"], status["outcome"], status["target_version"]) == \
            ("completed", "promoted", "v1"), status
        assert status["strategy"] == "immediate"
        record = next(op for op in (await client.get(
            "/switch/operations", params={"model_id": MODEL_ID})).json()
            if op["operation_id"] == operation_id)
        assert record["requested_by"] == "anonymous"  # authentication is off
        model = (await client.get(f"/models/{MODEL_ID}")).json()
        assert (model["live_version"], model["previous_version"]) == ("v1", "v2")
    assert await served_versions(plane) == {"v1"}


async def test_emergency_rollback_refusals(plane: ControlPlane) -> None:
    async with plane.http() as client:
        unknown = await client.post("/models/nope_nope/rollback")
        assert unknown.status_code == 404
        lone = await client.post("/models", json=register_body(plane, "v1", stage="lonely"))
        assert lone.status_code == 201, lone.text
        nothing = await client.post(f"/models/{LONE_ID}/rollback", json={"reason": "?"})
        assert nothing.status_code == 409
        assert nothing.json()["detail"] == "no previous version to roll back to"
        assert (await client.get("/switch/operations",
                                 params={"model_id": LONE_ID})).json() == []


async def test_sdk_controls(plane: ControlPlane) -> None:
    switcher = ModelSwitcher(api_url=plane.api_url)
    async with plane.http() as client:
        operation_id = await start_canary(client, "v2")
    # The SDK is synchronous; the API serves on this event loop, so call it from a thread.
    paused = await asyncio.to_thread(switcher.pause, operation_id, "sdk pause",
                                     requested_by="erin")
    assert paused["status"] == "paused"
    with pytest.raises(TurnoutAPIError) as refused:
        await asyncio.to_thread(switcher.pause, operation_id)
    assert refused.value.status_code == 409 and "paused" in str(refused.value.detail)
    resumed = await asyncio.to_thread(switcher.resume, operation_id)
    assert resumed["status"] == "running"
    listed = await asyncio.to_thread(switcher.list_operations, MODEL_ID)
    assert listed[0]["operation_id"] == operation_id
    rolled = await asyncio.to_thread(switcher.rollback, operation_id, "sdk rollback")
    assert rolled["operation_id"] == operation_id
    status = await switcher.wait_for(operation_id, timeout=60, interval=0.1)
    assert (status["status"], status["outcome"]) == ("failed", "rolled_back")
    failed = await asyncio.to_thread(switcher.list_operations, MODEL_ID, "failed")
    assert operation_id in [op["operation_id"] for op in failed]
    assert all(op["status"] == "failed" for op in failed)
    with pytest.raises(TurnoutAPIError) as too_late:
        await asyncio.to_thread(switcher.promote, operation_id)
    assert too_late.value.status_code == 409
    with pytest.raises(TurnoutAPIError) as lone:
        await asyncio.to_thread(switcher.emergency_rollback, LONE_ID, "nothing to go back to")
    assert lone.value.status_code == 409


async def test_cli_controls(plane: ControlPlane) -> None:
    async with plane.http() as client:
        operation_id = await start_canary(client, "v2")
    code, status, err = await cli(plane, "pause", operation_id, "--reason", "cli pause")
    assert (code, status["status"]) == (0, "paused"), err
    code, _, err = await cli(plane, "pause", operation_id)
    assert code == 1 and "409" in err
    code, status, err = await cli(plane, "resume", operation_id)
    assert (code, status["status"]) == (0, "running"), err
    code, status, err = await cli(plane, "promote", operation_id, "--reason", "cli promote")
    assert code == 0, err
    async with plane.http() as client:
        done = await wait_done(client, operation_id)
    assert (done["status"], done["outcome"]) == ("completed", "promoted")
    code, listed, err = await cli(plane, "operations", "--model", MODEL_ID, "--status",
                                  "completed")
    assert code == 0, err
    assert operation_id in [op["operation_id"] for op in listed]
    code, _, err = await cli(plane, "abort", operation_id)
    assert code == 1 and "409" in err

    code, accepted, err = await cli(plane, "emergency-rollback", MODEL_ID, "--reason", "cli")
    assert code == 0, err
    async with plane.http() as client:
        done = await wait_done(client, accepted["operation_id"])
    assert (done["status"], done["target_version"]) == ("completed", "v1")
    assert await served_versions(plane) == {"v1"}


async def test_accepted_controls_are_audited(plane: ControlPlane) -> None:
    async with plane.http() as client:
        audit = (await client.get("/audit", params={"model_id": MODEL_ID})).json()
    by_action: dict[str, list[dict[str, Any]]] = {}
    for entry in audit:
        by_action.setdefault(entry["action"], []).append(entry)
    # Accepted only: pause 3 times (REST, SDK, CLI), each also refused once.
    assert len(by_action["operator_pause"]) == 3
    assert len(by_action["operator_resume"]) == 3
    # Authentication is off here: every actor is `anonymous`; the body's `requested_by`
    # is kept as an unverified note in the details. Newest first.
    assert {e["actor"] for e in audit} == {"anonymous"}
    pause = by_action["operator_pause"][-1]
    assert (pause["actor"], pause["operation_id"]) == ("anonymous", finished["promoted"])
    assert pause["details"]["reason"] == "check dashboards"
    assert pause["details"]["requested_by"] == "alice"
    rollback = [e for e in by_action["operator_rollback"]
                if e["details"]["requested_by"] == "bob"]
    assert rollback and rollback[0]["details"]["reason"] == "p95 regression"
    assert rollback[0]["operation_id"] == finished["rolled_back"]
    assert any(e["operation_id"] == finished["aborted"] for e in by_action["operator_abort"])
    assert any(e["details"]["requested_by"] == "cli-user"
               and e["details"]["reason"] == "cli promote"
               for e in by_action["operator_promote"])
    emergencies = by_action["emergency_rollback"]
    assert [e["details"]["requested_by"] for e in emergencies] == ["cli-user", "dave", "carol"]
    assert emergencies[1]["details"]["to_version"] == "v1"
