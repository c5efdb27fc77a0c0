"""A rollback is not given up: on the real plane (Temporal dev server, workers, store,
gateway, API over HTTP; fake external engines), the stable version's engine is gone when an
operator rolls a canary back. Restoring traffic to it fails at first (no ready engine),
the switch alerts, places the stable version again (held by the route) and then restores.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from activities.fleet import EXTERNAL_HOST
from tests.integration.plane import (
    ControlPlane,
    first_version_live,
    record_history,
    traffic,
    wait_done,
)
from turnout.domain import EngineState

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

ARCH, STAGE = "RecoveryArch", "canary"
MODEL_ID = f"{ARCH}_{STAGE}"
# Evaluations long enough that only the operator ends the canary during the test.
SLOW_CANARY = {"initial_percentage": 20, "step_percentage": 40, "evaluation_period_minutes": 60}


async def evaluating(client: httpx.AsyncClient, operation_id: str) -> None:
    for _ in range(300):
        status = (await client.get(f"/switch/operations/{operation_id}")).json()
        if status["phase"] == "evaluating" and status["weights"].get("v2") == 20:
            return
        assert status["status"] not in ("completed", "failed"), status
        await asyncio.sleep(0.1)
    raise AssertionError(f"canary never reached 20% on v2: {status}")


async def test_a_rollback_whose_stable_engine_is_gone_restores_it(
        plane: ControlPlane) -> None:
    async with plane.http() as client:
        await first_version_live(plane, client, ARCH, STAGE)
        response = await client.post("/switch", json={
            "model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
            "strategy_config": SLOW_CANARY, "requested_by": "ci"})
        assert response.status_code == 202, response.text
        operation_id = response.json()["operation_id"]
        async with traffic(plane.gateway_url, MODEL_ID) as seen:
            await evaluating(client, operation_id)
            # The stable version's engine record goes (its engine died, say): a route to
            # v1 can no longer be written until v1 is placed again.
            await plane.store.delete_engine(MODEL_ID, "v1", EXTERNAL_HOST)
            rolled = await client.post(f"/switch/operations/{operation_id}/rollback",
                                       json={"reason": "v2 looks off", "requested_by": "bob"})
            assert rolled.status_code == 200, rolled.text
            assert rolled.json()["weights"] == {"v1": 100.0}
            status = await wait_done(client, operation_id)
            await record_history(plane, operation_id, "canary-rollback-stable-engine-gone")
            assert (status["status"], status["outcome"]) == ("failed", "rolled_back"), status
        assert seen.served.get("v1", 0) > 0 and seen.served.get("v2", 0) > 0
        [engine] = await plane.store.list_engines(model_id=MODEL_ID, version="v1")
        assert engine.state is EngineState.READY
        async with httpx.AsyncClient(base_url=plane.gateway_url, timeout=30) as gateway:
            for i in range(10):
                answer = await gateway.post("/v1/completions", json={
                    "model": MODEL_ID, "prompt": "hi", "user": f"after-{i}"})
                assert answer.status_code == 200, answer.text
                assert answer.headers["x-turnout-version"] == "v1"
        # The first failed try raised the rollout alert; the restore and then the
        # rollback refreshed it (one alert, three raisings).
        alerts = (await client.get("/alerts", params={"model_id": MODEL_ID})).json()
        [alert] = [a for a in alerts if a["operation_id"] == operation_id]
        assert alert["count"] == 3, alert
        assert "v2 looks off" in alert["message"]
    record = await plane.store.get_operation(operation_id)
    handle = plane.env.client.get_workflow_handle(record.workflow_id, run_id=record.run_id)
    history = await handle.fetch_history()
    summaries = [event.user_metadata.summary.data.decode()
                 for event in history.events if event.HasField("user_metadata")
                 and event.user_metadata.HasField("summary")]
    restores = [s for s in summaries if "restore 100% to v1" in s]
    assert len(restores) == 2, summaries  # the failed try, then the one that succeeded
    assert any("alert: restoring fails" in s for s in summaries), summaries
    assert any("place v1" in s for s in summaries), summaries
