"""The REST API over real HTTP, a real Temporal dev server, real workers, store and gateway
(the `plane` fixture, tests/integration/conftest.py).

Versions here are external endpoints (fake OpenAI servers), so no vLLM engine is started:
the engine worker only records them. Real engines are exercised in tests/e2e.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from api.app import create_app
from tests.integration.plane import ControlPlane, record_history, serve_api, traffic, wait_done
from tests.support import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

ARCH, STAGE = "Qwen2_5OmniForConditionalGeneration", "thinker"
MODEL_ID = f"{ARCH}_{STAGE}"


def guide_body(plane: ControlPlane, version: str, **extra: Any) -> dict[str, Any]:
    """The guide's "Register a Model" body, pointing at a fake engine as external endpoint."""
    return {"model": "Qwen/Qwen2.5-Omni-7B", "model_arch": ARCH, "model_stage": STAGE,
            "version": version, "metadata": {"author": "team"},
            "endpoint": plane.upstreams.get(version, plane.upstreams["v1"]).url,
            "served_model_name": f"served-{version}",
            **extra}


async def test_register_model_as_the_guide_shows(plane: ControlPlane) -> None:
    async with plane.http() as client:
        for version in ("v1", "v2"):
            response = await client.post("/models", json=guide_body(plane, version))
            assert response.status_code == 201, response.text
            assert response.json()["model_id"] == MODEL_ID
        again = await client.post("/models", json=guide_body(plane, "v1"))
        assert again.status_code == 409 and "already exists" in again.json()["detail"]
        model = (await client.get(f"/models/{MODEL_ID}")).json()
        assert [v["version"] for v in model["versions"]] == ["v1", "v2"]
        assert model["live_version"] is None


@pytest.mark.parametrize(("body_change", "field"), [
    ({"model_arch": None}, "model_arch"),
    ({"version": "has spaces"}, "version"),
    ({"metadata": "not an object"}, "metadata"),
    ({"model": ""}, "model"),
    ({"unexpected": 1}, "unexpected"),
])
async def test_bad_registration_is_422_naming_the_field(
        plane: ControlPlane, body_change: dict[str, Any], field: str) -> None:
    body = {k: v for k, v in {**guide_body(plane, "v9"), **body_change}.items() if v is not None}
    async with plane.http() as client:
        response = await client.post("/models", json=body)
        assert response.status_code == 422
        assert field in [str(p) for e in response.json()["detail"] for p in e["loc"]]
        assert (await client.get(f"/models/{MODEL_ID}")).json()["versions"][-1]["version"] != "v9"


async def test_unknown_model_is_404(plane: ControlPlane) -> None:
    async with plane.http() as client:
        response = await client.get("/models/nope_nope")
        assert response.status_code == 404 and "nope_nope" in response.json()["detail"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model_id": "nope_nope", "target_version": "v1"}, 404, "model_id"),
    ({"model_id": MODEL_ID, "target_version": "v9"}, 404, "target_version"),
    ({"model_id": MODEL_ID, "target_version": "v1", "strategy": "yolo"}, 422, "strategy"),
    ({"model_id": MODEL_ID, "target_version": "v1", "strategy": "gradual",
      "strategy_config": {"steps": 0}}, 422, "steps"),
    ({"model_id": MODEL_ID, "target_version": "v1", "strategy": "canary",
      "strategy_config": {"initial_percentage": 101}}, 422, "initial_percentage"),
    ({"model_id": MODEL_ID}, 422, "target_version"),
])
async def test_bad_switch_requests_change_nothing(plane: ControlPlane, body: dict[str, Any],
                                                  status: int, needle: str) -> None:
    async with plane.http() as client:
        before = (await client.get("/switch/operations")).json()
        response = await client.post("/switch", json=body)
        assert response.status_code == status, response.text
        assert needle in response.text
        assert (await client.get("/switch/operations")).json() == before


async def test_immediate_switch_routes_the_gateway(plane: ControlPlane) -> None:
    async with plane.http() as client:
        response = await client.post("/switch", json={
            "model_id": MODEL_ID, "target_version": "v1", "strategy": "immediate"})
        assert response.status_code == 202, response.text
        status = await wait_done(client, response.json()["operation_id"])
        assert (status["status"], status["outcome"], status["progress"]) == \
            ("completed", "promoted", 1.0)
        assert status["weights"] == {"v1": 100.0}
        async with httpx.AsyncClient(base_url=plane.gateway_url) as gateway:
            answer = await gateway.post("/v1/completions",
                                        json={"model": MODEL_ID, "prompt": "hi"})
        assert answer.headers["x-turnout-version"] == "v1"
        assert (await client.get(f"/models/{MODEL_ID}")).json()["live_version"] == "v1"
        await record_history(plane, status["operation_id"], "immediate-first")


async def test_second_switch_while_one_is_active_is_409(plane: ControlPlane) -> None:
    async with plane.http() as client, traffic(plane.gateway_url, MODEL_ID):
        first = await client.post("/switch", json={
            "model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
            "strategy_config": {"initial_percentage": 50, "step_percentage": 50,
                                "evaluation_period_minutes": 0.05}})
        assert first.status_code == 202
        operation_id = first.json()["operation_id"]
        second = await client.post("/switch", json={
            "model_id": MODEL_ID, "target_version": "v2", "strategy": "immediate"})
        assert second.status_code == 409
        assert second.json()["active_operation_id"] == operation_id
        validation = (await client.post("/switch/validate", json={
            "model_id": MODEL_ID, "target_version": "v2"})).json()
        assert validation["valid"] is False and operation_id in " ".join(validation["errors"])
        status = await wait_done(client, operation_id)
        assert status["status"] == "completed", status
        await record_history(plane, operation_id, "canary-two-steps")
        listed = (await client.get("/switch/operations",
                                   params={"model_id": MODEL_ID, "status": "completed"})).json()
        assert operation_id in [op["operation_id"] for op in listed]


async def test_every_operation_is_audited(plane: ControlPlane) -> None:
    async with plane.http() as client:
        audit = (await client.get("/audit", params={"model_id": MODEL_ID})).json()
    actions = [e["action"] for e in audit]
    assert actions.count("version_registered") == 2
    assert actions.count("switch_requested") == actions.count("switch_completed") == 2
    # Newest first; with authentication off nobody is verified: the actor is `anonymous`.
    assert [e["id"] for e in audit] == sorted((e["id"] for e in audit), reverse=True)
    assert {e["actor"] for e in audit} == {"anonymous"}


async def test_unknown_operation_is_404(plane: ControlPlane) -> None:
    async with plane.http() as client:
        response = await client.get("/switch/operations/does-not-exist")
        assert response.status_code == 404 and response.json()["detail"]


async def test_api_key_is_required_when_authentication_is_on(plane: ControlPlane) -> None:
    port = free_port()
    settings = plane.settings.model_copy(update={"enable_authentication": True,
                                                 "api_key": "s3cret-for-this-test",
                                                 "api_port": port})
    server, task = await serve_api(create_app(settings, store=plane.store,
                                              temporal=plane.env.client), port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/models")).status_code == 401
            wrong = await client.get("/models", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            right = await client.get("/models",
                                     headers={"Authorization": "Bearer s3cret-for-this-test"})
            assert right.status_code == 200
    finally:
        server.should_exit = True
        await task


async def test_openapi_documents_the_errors(plane: ControlPlane) -> None:
    async with plane.http() as client:
        spec = (await client.get("/openapi.json")).json()
    responses = spec["paths"]["/switch"]["post"]["responses"]
    assert {"202", "404", "409", "422"} <= set(responses)
    control = spec["paths"]["/switch/operations/{operation_id}/{action}"]["post"]
    assert {"200", "404", "409", "422", "503"} <= set(control["responses"])
    assert "ErrorBody" in str(control["responses"]["409"])
    action = next(p for p in control["parameters"] if p["name"] == "action")
    enum = spec["components"]["schemas"][action["schema"]["$ref"].rsplit("/", 1)[-1]]["enum"]
    assert enum == ["rollback", "pause", "resume", "promote", "abort"]
    rollback = spec["paths"]["/models/{model_id}/rollback"]["post"]["responses"]
    assert {"200", "202", "404", "409", "503"} <= set(rollback)
    assert "SwitchAccepted" in str(rollback["202"])

