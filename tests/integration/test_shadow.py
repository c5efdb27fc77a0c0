"""Traffic mirroring end to end on real parts: `POST /models/{id}/shadow` starts a
ShadowWorkflow on a Temporal dev server, the real gateway copies requests to the shadow's
(fake OpenAI) server and never returns its answers, a switch meanwhile keeps the shadow,
and `DELETE` removes it."""

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
    cli,
    control_plane,
    record_workflow_history,
    register_upstreams,
    traffic,
    wait_done,
)
from turnout import ModelSwitcher
from turnout.contracts import shadow_workflow_id

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

ARCH, STAGE = "Mirrored", "chat"
MODEL = f"{ARCH}_{STAGE}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory,
                new_database: Callable[[Path], str]) -> AsyncIterator[ControlPlane]:
    root = tmp_path_factory.mktemp("shadow")
    async with control_plane(root, versions=("v1", "v2", "v3"),
                             database_url=new_database(root), monitoring_interval_s=1) as plane:
        async with plane.http() as client:
            await register_upstreams(plane, client, ARCH, STAGE)
            started = await client.post("/switch", json={
                "model_id": MODEL, "target_version": "v1", "strategy": "immediate"})
            assert (await wait_done(client, started.json()["operation_id"]))["status"] == \
                "completed"
        yield plane


async def shadow_phase(client: httpx.AsyncClient, phase: str) -> dict[str, Any]:
    for _ in range(300):
        status = (await client.get(f"/models/{MODEL}/shadow")).json()
        if status.get("phase") == phase:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"shadow never reached {phase}: {status}")


async def test_bad_shadow_requests_change_nothing(plane: ControlPlane) -> None:
    async with plane.http() as client:
        assert (await client.get(f"/models/{MODEL}/shadow")).status_code == 404
        assert (await client.delete(f"/models/{MODEL}/shadow")).status_code == 404
        cases = [({"version": "v9"}, 404), ({"version": "v1"}, 409),
                 ({"version": "v2", "percentage": 0}, 422),
                 ({"version": "v2", "percentage": 101}, 422),
                 ({"version": "v2", "duration_minutes": -1}, 422),
                 ({"version": "v2", "percent": 10}, 422)]
        for body, expected in cases:
            r = await client.post(f"/models/{MODEL}/shadow", json=body)
            assert r.status_code == expected, (body, r.text)
            assert "detail" in r.json()
        unknown = await client.post("/models/Nope_x/shadow", json={"version": "v2"})
        assert unknown.status_code == 404
    assert (await plane.store.get_route(MODEL)).shadow() is None  # type: ignore[union-attr]


async def test_a_shadow_sees_copies_and_clients_never_see_it(plane: ControlPlane) -> None:
    v2 = plane.upstreams["v2"]
    async with plane.http() as client:
        r = await client.post(f"/models/{MODEL}/shadow",
                              json={"version": "v2", "percentage": 100,
                                    "requested_by": "alice"})
        assert r.status_code == 202, r.text
        again = await client.post(f"/models/{MODEL}/shadow", json={"version": "v3"})
        assert again.status_code == 409 and "already running" in again.json()["detail"]
        await shadow_phase(client, "mirroring")
        switcher = ModelSwitcher(api_url=plane.api_url)
        seen_by_sdk = await asyncio.to_thread(switcher.get_shadow, MODEL)
        assert (seen_by_sdk["version"], seen_by_sdk["percent"]) == ("v2", 100)
        route = await plane.store.get_route(MODEL)
        assert route is not None and route.weights() == {"v1": 100}
        shadow = route.shadow()
        assert shadow is not None and (shadow.version, shadow.mirror_percent) == ("v2", 100)

        copies_before = len(v2.received)
        async with traffic(plane.gateway_url, MODEL) as seen:
            await asyncio.sleep(2)
        assert set(seen.served) == {"v1"}, seen.served  # every answer from the live version
        copies = v2.received[copies_before:]
        assert copies and {body["model"] for body in copies} == {v2.served_model_name}

        # The monitor looks at the shadow like any version, under its own role.
        report = (await client.get(f"/health/models/{MODEL}")).json()
        roles = {v["version"]: v["role"] for v in report["versions"]}
        assert roles.get("v2") == "shadow", report

        # A switch meanwhile keeps the shadow: v3 goes live, v2 is still mirrored to.
        switched = await client.post("/switch", json={
            "model_id": MODEL, "target_version": "v3", "strategy": "immediate"})
        assert (await wait_done(client, switched.json()["operation_id"]))["status"] == \
            "completed"
        route = await plane.store.get_route(MODEL)
        assert route is not None and route.weights() == {"v3": 100}
        assert route.shadow() is not None and route.shadow().version == "v2"  # type: ignore[union-attr]

        stopped = await client.request("DELETE", f"/models/{MODEL}/shadow",
                                       json={"requested_by": "alice", "reason": "enough"})
        assert stopped.status_code == 202, stopped.text
        done = await shadow_phase(client, "completed")
        assert done["reason"] == "enough" and done["finished_at"]
        await record_workflow_history(plane, "shadow-stopped-during-a-switch",
                                      shadow_workflow_id(MODEL))
        route = await plane.store.get_route(MODEL)
        assert route is not None and route.shadow() is None and route.weights() == {"v3": 100}
        copies_after = len(v2.received)
        async with traffic(plane.gateway_url, MODEL) as seen:
            await asyncio.sleep(1)
        assert set(seen.served) == {"v3"} and len(v2.received) == copies_after
        audit = (await client.get("/audit", params={"model_id": MODEL})).json()
        assert {"shadow_started", "shadow_stopped"} <= {e["action"] for e in audit}


async def test_operators_shadow_and_read_health_from_the_cli(plane: ControlPlane) -> None:
    code, started, err = await cli(plane, "shadow", MODEL, "v2", "--percent", "50",
                                   "--minutes", "5")
    assert code == 0 and started["percent"] == 50, err
    async with plane.http() as client:
        await shadow_phase(client, "mirroring")
    code, status, err = await cli(plane, "shadow", MODEL)
    assert (code, status["phase"], status["version"]) == (0, "mirroring", "v2"), err
    code, _, err = await cli(plane, "shadow", MODEL, "v3")
    assert code == 1 and "409" in err
    code, status, err = await cli(plane, "shadow", MODEL, "--stop", "--reason", "cli")
    assert code == 0, err
    async with plane.http() as client:
        assert (await shadow_phase(client, "completed"))["reason"] == "cli"

    code, health, err = await cli(plane, "health", MODEL)
    assert code == 0 and health["model_id"] == MODEL, err
    code, alerts, err = await cli(plane, "alerts", "--model", MODEL)
    assert code == 0 and isinstance(alerts, list), err
    code, levels, err = await cli(plane, "thresholds", "--model", MODEL,
                                  "latency_p95_warning=2000")
    assert (code, levels["latency_p95_warning"]) == (0, 2000), err
    code, levels, err = await cli(plane, "thresholds", "--model", MODEL)
    assert (code, levels["latency_p95_warning"]) == (0, 2000), err
    code, _, err = await cli(plane, "thresholds", "latency_p95_warnin=1")
    assert code == 1 and "latency_p95_warnin" in err
