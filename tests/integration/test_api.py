"""The REST API over real HTTP, a real Temporal dev server, real workers, store and gateway
(the `plane` fixture, tests/integration/conftest.py).

Versions here are external endpoints (fake OpenAI servers), so no vLLM engine is started:
the engine worker only records them. Real engines are exercised in tests/e2e.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import pytest

from api.app import create_app
from tests.integration.plane import ControlPlane, record_history, serve_api, traffic, wait_done
from tests.support import free_port

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

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


def _local_body(plane: ControlPlane, **extra: Any) -> dict[str, Any]:
    """A local model version under the plane's model roots (never loaded here)."""
    return {"model": f"{plane.settings.resolved_model_roots[0]}/tiny", "model_arch": ARCH,
            "model_stage": STAGE, "version": "v9", **extra}


async def _state(plane: ControlPlane, client: httpx.AsyncClient) -> list[Any]:
    """Everything a refused request must leave as it was: models, operations, audit log,
    routes and engines."""
    return [(await client.get(path)).json()
            for path in ("/models", "/switch/operations", "/audit")] + [
        [r.model_dump() for r in await plane.store.list_routes()],
        [e.model_dump() for e in await plane.store.list_engines()]]


# The hostile inputs (and their relatives): each a 422 naming the field, fast,
# changing nothing. Every body is otherwise valid.
HOSTILE: list[tuple[str, str, Any, tuple[str, ...]]] = [
    ("canary step of 1e-17 (planning looped for ever)", "/switch",
     {"model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
      "strategy_config": {"step_percentage": 1e-17}}, ("strategy_config", "step_percentage")),
    ("canary of ~95,000 steps", "/switch",
     {"model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
      "strategy_config": {"initial_percentage": 5, "step_percentage": 0.001}},
     ("strategy_config", "step_percentage")),
    ("canary of 191 steps", "/switch",
     {"model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
      "strategy_config": {"step_percentage": 0.5}}, ("strategy_config", "step_percentage")),
    ("A/B test at 99.999%", "/switch",
     {"model_id": MODEL_ID, "target_version": "v2", "strategy": "ab_test",
      "strategy_config": {"traffic_percentage": 99.999}},
     ("strategy_config", "traffic_percentage")),
    ("huge strategy_config", "/switch",
     {"model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
      "strategy_config": {f"k{i}": i for i in range(5000)}}, ("strategy_config",)),
    ("requested_by beyond its column", "/switch",
     {"model_id": MODEL_ID, "target_version": "v2", "requested_by": "x" * 257},
     ("requested_by",)),
    ("flags smuggled in a list", "/models", "smuggle", ("engine_args", "max_model_len")),
    ("a reserved flag", "/models", {"engine_args": {"host": "0.0.0.0"}},
     ("engine_args", "host")),
    ("remote code without the operator's consent", "/models",
     {"engine_args": {"trust_remote_code": True}}, ("engine_args", "trust_remote_code")),
    ("an unknown flag", "/models", {"engine_args": {"enable_everything": True}},
     ("engine_args", "enable_everything")),
    ("a model outside the model roots", "/models", {"model": "/etc"}, ("model",)),
    ("a model path with ..", "/models", {"model": "ROOT/../../etc"}, ("model",)),
    ("the metadata service with a fragment", "/models",
     {"endpoint": "http://169.254.169.254/latest#"}, ("endpoint",)),
    ("the metadata service by number", "/models", {"endpoint": "http://2852039166/"},
     ("endpoint",)),
    ("the metadata service by name", "/models",
     {"endpoint": "http://metadata.google.internal/computeMetadata/v1"}, ("endpoint",)),
    ("a credential in the endpoint", "/models",
     {"endpoint": "http://user:secret@api.example.com"}, ("endpoint",)),
    ("a query turning the path into anything", "/models",
     {"endpoint": "http://api.example.com/x?to="}, ("endpoint",)),
    ("a turnout setting as credential", "/models",
     {"endpoint": "https://api.example.com", "api_key_env": "VLLM_MODEL_SWITCHING_API_KEY"},
     ("api_key_env",)),
    ("too-big metadata", "/models", {"metadata": {"blob": "x" * 20_000}}, ("metadata",)),
    ("too-deep metadata", "/models", {"metadata": {"a": [[[[[[[[[[1]]]]]]]]]]}},
     ("metadata",)),
]


@pytest.mark.parametrize(("path", "change", "loc"), [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
async def test_hostile_input_is_a_fast_422_that_changes_nothing(
        plane: ControlPlane, path: str, change: Any, loc: tuple[str, ...]) -> None:
    if path == "/models":
        body = _local_body(plane)
        if change == "smuggle":
            change = {"engine_args": {"max_model_len": ["256", "--host", "0.0.0.0",
                                                        "--trust-remote-code"]}}
        body.update({k: v.replace("ROOT", body["model"].rsplit("/", 1)[0])
                     if isinstance(v, str) else v for k, v in change.items()})
        if "endpoint" in change:
            body["model"] = "Qwen/Qwen2.5-Omni-7B"
    else:
        body = change
    async with plane.http() as client:
        if (await client.get(f"/models/{MODEL_ID}")).status_code == 404:  # run alone
            for version in ("v1", "v2"):
                await client.post("/models", json=guide_body(plane, version))
        before = await _state(plane, client)
        started = time.monotonic()
        response = await client.post(path, json=body)
        elapsed = time.monotonic() - started
        assert response.status_code == 422, response.text
        assert elapsed < 2, f"{elapsed:.2f} s"
        locs = [tuple(str(p) for p in e["loc"] if p != "body")
                for e in response.json()["detail"]]
        assert loc in locs, response.json()
        assert await _state(plane, client) == before


async def test_a_private_endpoint_is_refused_where_the_settings_do_not_allow_it(
        plane: ControlPlane) -> None:
    """The plane allows its 127.0.0.1 fakes; a deployment with the default settings
    refuses them, also when a name resolves there (`localhost`, resolved for real)."""
    port = free_port()
    settings = plane.settings.model_copy(update={"allow_private_endpoints": False,
                                                 "api_port": port})
    server, task = await serve_api(create_app(settings, store=plane.store,
                                              temporal=plane.env.client), port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            before = await _state(plane, client)
            for endpoint in (plane.upstreams["v1"].url, "http://localhost:9/",
                             "http://10.1.2.3:8000"):
                response = await client.post("/models", json={
                    **guide_body(plane, "v9"), "endpoint": endpoint})
                assert response.status_code == 422, response.text
                assert "ALLOW_PRIVATE_ENDPOINTS" in response.text
            assert await _state(plane, client) == before
    finally:
        server.should_exit = True
        await task


async def test_an_endpoint_credential_is_sent_by_name_and_never_shown(
        plane: ControlPlane, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """`api_key_env` names a variable; the health probe and the gateway send its value as
    a bearer token to the endpoint, `GET /models` shows only the name. Without the
    variable the gateway refuses to send anything to that backend (502)."""
    variable, secret = "TURNOUT_IT_UPSTREAM_KEY", "it-upstream-s3cr3t-7f4c"
    monkeypatch.setenv(variable, secret)
    upstream = plane.upstreams["v1"]
    port = free_port()
    settings = plane.settings.model_copy(update={"endpoint_credential_envs": [variable],
                                                 "api_port": port})
    server, task = await serve_api(create_app(settings, store=plane.store,
                                              temporal=plane.env.client), port)
    model_id = "Keyed_chat"
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as keyed:
            refused = await keyed.post("/models", json={
                "model": "m", "model_arch": "Keyed", "model_stage": "chat", "version": "v1",
                "endpoint": upstream.url, "api_key_env": "OTHER_SECRET"})
            assert refused.status_code == 422 and "ENDPOINT_CREDENTIAL_ENVS" in refused.text
            created = await keyed.post("/models", json={
                "model": "m", "model_arch": "Keyed", "model_stage": "chat", "version": "v1",
                "endpoint": upstream.url, "served_model_name": upstream.served_model_name,
                "api_key_env": variable})
            assert created.status_code == 201, created.text
            assert created.json()["config"]["api_key_env"] == variable
    finally:
        server.should_exit = True
        await task
    first = len(upstream.headers)
    async with plane.http() as client:
        switch = await client.post("/switch", json={"model_id": model_id,
                                                    "target_version": "v1"})
        assert switch.status_code == 202, switch.text
        status = await wait_done(client, switch.json()["operation_id"])
        assert status["status"] == "completed", status
        async with httpx.AsyncClient(base_url=plane.gateway_url) as gateway:
            answer = await gateway.post("/v1/completions",
                                        json={"model": model_id, "prompt": "hi"})
            assert answer.status_code == 200, answer.text
            sent = upstream.headers[first:]
            assert len(sent) >= 2  # the health probe's completion, then the client's
            assert all(h.get("Authorization") == f"Bearer {secret}" for h in sent)
            route = await plane.store.get_route(model_id)
            assert route is not None and route.backends[0].api_key_env == variable
            shown = (await client.get("/models")).text + (await client.get("/audit")).text
            assert variable in shown and secret not in shown

            monkeypatch.delenv(variable)
            count = len(upstream.headers)
            with caplog.at_level(logging.ERROR, logger="gateway.proxy"):
                for _ in range(2):
                    missing = await gateway.post("/v1/completions",
                                                 json={"model": model_id, "prompt": "hi"})
                    assert missing.status_code == 502 and secret not in missing.text
            assert len(upstream.headers) == count  # nothing was sent without it
            logged = [r.getMessage() for r in caplog.records if variable in r.getMessage()
                      and r.levelno >= logging.ERROR]
            assert len(logged) == 1, logged  # once, by name


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
        assert answer.status_code == 200, answer.text
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

