"""Access by named keys with roles, through the real API on the real plane (Temporal dev
server, workers, store, gateway; fake external engines): who may call what, who the audit
log names, refused keys audited without their secret, open probes, protected docs, the
body limit, and the SDK and CLI with a key.

The tests run in file order and share one model: the operator registers it and makes
`v1` live early on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from api.app import create_app
from tests.integration.plane import ControlPlane, cli, control_plane, serve_api, wait_done
from tests.support import free_port
from turnout.auth import hash_key
from turnout.sdk import DynamicModelRegistry, ModelSwitcher, TurnoutAPIError

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

ARCH, STAGE = "AuthArch", "roles"
MODEL_ID = f"{ARCH}_{STAGE}"
VIEWER_KEY = "viewer-key-for-the-role-tests"
OPERATOR_KEY = "operator-key-for-the-role-tests"
ADMIN_KEY = "admin-key-for-the-role-tests"  # the guide's `api_key`: admin, named `default`
MAX_BODY = 64 * 1024


def key_file(root: Path) -> Path:
    path = root / "keys.yaml"
    path.write_text(f"""# names are actors in the audit log; hashes, not keys
- name: dashboard
  role: viewer
  key_sha256: {hash_key(VIEWER_KEY)}
- name: ci-bot
  role: operator
  key_sha256: {hash_key(OPERATOR_KEY)}
""")
    os.chmod(path, 0o600)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory,
                new_database: Callable[[Path], str]) -> AsyncIterator[ControlPlane]:
    root = tmp_path_factory.mktemp("auth-plane")
    async with control_plane(root, database_url=new_database(root), latency_tolerance=3.0,
                             enable_authentication=True,
                             api_keys_file=str(key_file(root)), api_key=ADMIN_KEY,
                             api_max_body_bytes=MAX_BODY,
                             # This module's own refusals must all be audited; the budget
                             # is tested on an app of its own below.
                             api_auth_failures_audited_per_minute=1000) as plane:
        yield plane


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def viewer(plane: ControlPlane) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=plane.api_url, timeout=30, headers=as_(VIEWER_KEY))


def register_body(plane: ControlPlane, version: str) -> dict[str, Any]:
    return {"model": "tiny/roles", "model_arch": ARCH, "model_stage": STAGE,
            "version": version, "endpoint": plane.upstreams[version].url,
            "served_model_name": f"served-{version}"}


async def audit(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/audit", params=params, headers=as_(VIEWER_KEY))
    assert response.status_code == 200, response.text
    return response.json()


async def test_probes_are_open_and_reveal_nothing(plane: ControlPlane) -> None:
    async with plane.http() as client:
        live = await client.get("/healthz")
        assert (live.status_code, live.json()) == (200, {"status": "ok"})
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "checks": {"store": "ok", "temporal": "ok"}}


async def test_readyz_names_the_part_that_does_not_answer(plane: ControlPlane) -> None:
    """Temporal not answering: 503 naming `temporal`, within the timeout, and no address."""
    from temporalio.client import Client

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    gone = await Client.connect(address, lazy=True)
    port = free_port()
    settings = plane.settings.model_copy(update={"api_port": port, "api_ready_timeout_s": 1.0})
    server, task = await serve_api(create_app(settings, store=plane.store, temporal=gone), port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            started = asyncio.get_running_loop().time()
            ready = await client.get("/readyz")
            took = asyncio.get_running_loop().time() - started
    finally:
        server.should_exit = True
        await task
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not_ready" and body["checks"]["store"] == "ok"
    assert body["checks"]["temporal"] in ("failed", "timeout")
    assert address not in ready.text and "127.0.0.1" not in ready.text and took < 5


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
async def test_docs_follow_the_apis_rule(plane: ControlPlane, path: str) -> None:
    async with plane.http() as client:
        assert (await client.get(path)).status_code == 401
        assert (await client.get(path, headers=as_("not-a-known-key"))).status_code == 401
        shown = await client.get(path, headers={"X-API-Key": VIEWER_KEY})
        assert shown.status_code == 200
    if path == "/openapi.json":
        spec = shown.json()
        assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        assert spec["paths"]["/switch"]["post"]["x-turnout-role"] == "operator"
        assert spec["paths"]["/models"]["get"]["x-turnout-role"] == "viewer"
        assert spec["paths"]["/healthz"]["get"]["security"] == []
        assert {"401", "403", "413"} <= set(spec["paths"]["/switch"]["post"]["responses"])


@pytest.mark.parametrize(("headers", "reason"), [
    ({}, "missing"),
    ({"Authorization": "Bearer not-a-known-key"}, "unknown"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed"),
    ({"Authorization": "Bearer ключ-ключ".encode()}, "malformed"),
    ({"X-API-Key": "é".encode("latin-1")}, "malformed"),
    ({"X-API-Key": "k" * 10_000}, "malformed"),
    ({"Authorization": f"Bearer {VIEWER_KEY}", "X-API-Key": OPERATOR_KEY}, "malformed"),
])
async def test_bad_keys_are_401_and_audited_without_the_secret(
        plane: ControlPlane, headers: dict[str, Any], reason: str) -> None:
    async with plane.http() as client:
        last = await newest_id(client, action="auth_failed")
        refused = await client.post("/switch", headers=headers, json={
            "model_id": MODEL_ID, "target_version": "v1"})
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["detail"]
        entries = await audit(client, action="auth_failed", limit=10)
    [entry] = [e for e in entries if e["id"] > last]
    assert entry["actor"] is None
    assert entry["details"] == {"method": "POST", "path": "/switch", "client": "127.0.0.1",
                                "reason": reason}
    written = json.dumps(entry, ensure_ascii=False)
    for value in headers.values():
        secret = (value.decode("latin-1") if isinstance(value, bytes) else value).split()[-1]
        assert secret not in written
        assert hashlib.sha256(secret.encode()).hexdigest() not in written


async def audited(client: httpx.AsyncClient, operation_id: str,
                  action: str) -> list[dict[str, Any]]:
    """The operation's entries once `action` is among them (a workflow writes its records
    a moment after its status shows the step)."""
    for _ in range(100):
        entries = await audit(client, operation_id=operation_id)
        if any(e["action"] == action for e in entries):
            return entries
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {action} in the audit log of {operation_id}: {entries}")


async def newest_id(client: httpx.AsyncClient, **filters: Any) -> int:
    entries = await audit(client, limit=1, **filters)
    return entries[0]["id"] if entries else 0


async def test_viewer_reads_but_cannot_change_anything(plane: ControlPlane) -> None:
    async with plane.http() as client:
        for version in ("v1", "v2"):
            registered = await client.post("/models", json=register_body(plane, version),
                                           headers=as_(OPERATOR_KEY))
            assert registered.status_code == 201, registered.text
        viewer = as_(VIEWER_KEY)
        for path in ("/models", f"/models/{MODEL_ID}", "/switch/operations", "/alerts",
                     "/health/models", "/health/thresholds", f"/models/{MODEL_ID}/rules",
                     "/audit", "/auth/whoami"):
            response = await client.get(path, headers=viewer)
            assert response.status_code == 200, (path, response.text)
        validation = await client.post("/switch/validate", headers=viewer, json={
            "model_id": MODEL_ID, "target_version": "v1"})
        assert validation.status_code == 200 and validation.json()["valid"] is True

        refused = [
            await client.post("/switch", headers=viewer,
                              json={"model_id": MODEL_ID, "target_version": "v1"}),
            await client.post("/models", headers=viewer, json=register_body(plane, "v1")),
            await client.put(f"/models/{MODEL_ID}/rules", headers=viewer, json={"rules": []}),
            await client.post(f"/models/{MODEL_ID}/rollback", headers=viewer),
            await client.post(f"/models/{MODEL_ID}/shadow", headers=viewer,
                              json={"version": "v2"}),
            await client.put("/health/thresholds", headers=viewer,
                             json={"model_id": MODEL_ID, "error_rate_warning": 0.5}),
            # A role check comes before the body is judged: no hint for the refused.
            await client.put("/health/thresholds", headers=viewer, json={"nonsense": 1}),
        ]
        for response in refused:
            assert response.status_code == 403, response.text
            assert response.json()["detail"] == ("key 'dashboard' has role viewer; this call "
                                                  "needs role operator")
        assert (await client.get("/switch/operations", headers=viewer)).json() == []
        assert (await client.get(f"/models/{MODEL_ID}/rules", headers=viewer)).json()[
            "rules"] == []
        denied = await audit(client, action="access_denied", actor="dashboard")
    assert len(denied) == len(refused)
    assert denied[0]["details"] == {"method": "PUT", "path": "/health/thresholds",
                                    "client": "127.0.0.1", "role": "viewer",
                                    "needed": "operator"}


async def test_operator_switches_and_the_audit_names_the_key(plane: ControlPlane) -> None:
    async with plane.http() as client:
        started = await client.post("/switch", headers=as_(OPERATOR_KEY), json={
            "model_id": MODEL_ID, "target_version": "v1", "requested_by": "alice (on call)"})
        assert started.status_code == 202, started.text
        operation_id = started.json()["operation_id"]
        async with viewer(plane) as reader:
            status = await wait_done(reader, operation_id)
        assert status["status"] == "completed", status
        [record] = (await client.get("/switch/operations", headers=as_(VIEWER_KEY))).json()
        assert record["requested_by"] == "ci-bot"
        entries = await audited(client, operation_id, "switch_completed")
    by_action = {e["action"]: e for e in entries}
    # What the API wrote and what the workflow wrote both name the key.
    assert by_action["switch_requested"]["actor"] == "ci-bot"
    assert by_action["switch_requested"]["details"]["requested_by"] == "alice (on call)"
    assert by_action["switch_completed"]["actor"] == "ci-bot"
    registrations = [e for e in await _all_audit(plane, action="version_registered")
                     if e["model_id"] == MODEL_ID]
    assert {e["actor"] for e in registrations} == {"ci-bot"}
    host = plane.upstreams["v1"].url.split("//")[1].rstrip("/")
    v1 = next(e for e in registrations if e["details"]["version"] == "v1")
    assert v1["details"]["endpoint_host"] == host
    assert v1["details"]["engine_args"] == {} and v1["details"]["model"] == "tiny/roles"


async def _all_audit(plane: ControlPlane, **params: Any) -> list[dict[str, Any]]:
    async with plane.http() as client:
        return await audit(client, **params)


async def test_thresholds_one_model_is_operator_every_model_is_admin(
        plane: ControlPlane) -> None:
    async with plane.http() as client:
        one = await client.put("/health/thresholds", headers=as_(OPERATOR_KEY),
                               json={"model_id": MODEL_ID, "error_rate_warning": 0.04,
                                     "requested_by": "note"})
        assert one.status_code == 200, one.text
        every = await client.put("/health/thresholds", headers=as_(OPERATOR_KEY),
                                 json={"error_rate_warning": 0.04})
        assert every.status_code == 403
        assert every.json()["detail"].endswith("needs role admin")
        unchanged = await client.get("/health/thresholds", headers=as_(VIEWER_KEY))
        assert unchanged.json()["error_rate_warning"] != 0.04
        admin = await client.put("/health/thresholds", headers={"X-API-Key": ADMIN_KEY},
                                 json={"error_rate_warning": 0.04})
        assert admin.status_code == 200 and admin.json()["error_rate_warning"] == 0.04
        updates = await audit(client, action="thresholds_updated")
    assert [(e["actor"], e["model_id"]) for e in updates[:2]] == [("default", None),
                                                                   ("ci-bot", MODEL_ID)]
    assert updates[1]["details"]["requested_by"] == "note"


async def test_operator_controls_and_acknowledges_as_itself(plane: ControlPlane) -> None:
    async with plane.http() as client:
        rolled = await client.post(f"/models/{MODEL_ID}/rollback", headers=as_(OPERATOR_KEY),
                                   json={"reason": "drill", "requested_by": "bob"})
        # v1 is live and nothing came before it: nothing to roll back to.
        assert rolled.status_code == 409
        started = await client.post("/switch", headers=as_(OPERATOR_KEY), json={
            "model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
            "strategy_config": {"initial_percentage": 20, "step_percentage": 40,
                                "evaluation_period_minutes": 60}})
        assert started.status_code == 202, started.text
        operation_id = started.json()["operation_id"]
        for _ in range(300):
            status = (await client.get(f"/switch/operations/{operation_id}",
                                       headers=as_(VIEWER_KEY))).json()
            if status["phase"] == "evaluating":
                break
            await asyncio.sleep(0.1)
        viewer_abort = await client.post(f"/switch/operations/{operation_id}/abort",
                                         headers=as_(VIEWER_KEY))
        assert viewer_abort.status_code == 403
        aborted = await client.post(f"/switch/operations/{operation_id}/abort",
                                    headers=as_(OPERATOR_KEY),
                                    json={"reason": "drill", "requested_by": "bob"})
        assert aborted.status_code == 200, aborted.text
        entries = await audited(client, operation_id, "abort_applied")
    [abort] = [e for e in entries if e["action"] == "operator_abort"]
    assert abort["actor"] == "ci-bot" and abort["details"]["requested_by"] == "bob"
    # The workflow records the actor the API passed it, not the body's note.
    applied = [e for e in entries if e["action"] == "abort_applied"]
    assert applied and {e["actor"] for e in applied} == {"ci-bot"}


async def test_audit_pages_newest_first_with_filters(plane: ControlPlane) -> None:
    async with plane.http() as client:
        everything = await audit(client, limit=5000)
        ids = [e["id"] for e in everything]
        assert ids == sorted(ids, reverse=True) and len(ids) > 6
        # Entries written meanwhile (the aborted canary winds down) have larger ids.
        first = httpx.URL("/audit", params={"limit": 3, "before": ids[0] + 1})
        pages, url = [], str(first)
        while url:
            response = await client.get(url, headers=as_(VIEWER_KEY))
            pages.append(response.json())
            url = response.links.get("next", {}).get("url")
            assert len(pages) < 100
        assert [e["id"] for page in pages for e in page] == ids
        assert all(len(page) == 3 for page in pages[:-1])
        mine = await audit(client, actor="ci-bot", action="switch_requested")
        assert len(mine) == 2 and {e["actor"] for e in mine} == {"ci-bot"}
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert await audit(client, since=later) == []
        newest = everything[0]["at"]
        assert [e["id"] for e in await audit(client, since=newest)][-1:] == ids[:1]
        bad = await client.get("/audit", params={"before": 0}, headers=as_(VIEWER_KEY))
        assert bad.status_code == 422


async def test_bodies_over_the_limit_are_413_before_they_are_read(plane: ControlPlane) -> None:
    body = {**register_body(plane, "v2"), "version": "big",
            "metadata": {"blob": "x" * (MAX_BODY + 1)}}
    async with plane.http() as client:
        declared = await client.post("/models", json=body, headers=as_(OPERATOR_KEY))
        assert declared.status_code == 413
        assert "VLLM_MODEL_SWITCHING_API_MAX_BODY_BYTES" in declared.json()["detail"]

        async def chunks() -> AsyncIterator[bytes]:
            data = json.dumps(body).encode()
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        streamed = await client.post("/models", content=chunks(),
                                     headers={**as_(OPERATOR_KEY),
                                              "Content-Type": "application/json"})
        assert streamed.status_code == 413 and streamed.json()["detail"]
        model = (await client.get(f"/models/{MODEL_ID}", headers=as_(VIEWER_KEY))).json()
    assert "big" not in {v["version"] for v in model["versions"]}


async def test_sdk_and_cli_send_their_key(plane: ControlPlane) -> None:
    registry = DynamicModelRegistry(api_url=plane.api_url, api_key=VIEWER_KEY)
    models = await asyncio.to_thread(registry.list_models)
    assert MODEL_ID in {m.model_id for m in models}
    switcher = ModelSwitcher(api_url=plane.api_url, api_key=VIEWER_KEY)
    with pytest.raises(TurnoutAPIError) as refused:
        await asyncio.to_thread(switcher.pause, "whatever")
    assert refused.value.status_code == 403 and "operator" in str(refused.value)
    assert (await asyncio.to_thread(switcher.whoami))["name"] == "dashboard"
    page = await asyncio.to_thread(switcher.list_audit, action="access_denied", limit=1)
    assert [(e["actor"], e["details"]["path"]) for e in page] == \
        [("dashboard", "/switch/operations/whatever/pause")]

    code, who, err = await cli(plane, "whoami", api_key=OPERATOR_KEY)
    assert code == 0, err
    assert who == {"name": "ci-bot", "role": "operator", "authenticated": True}
    code, listed, err = await cli(plane, "audit", "--actor", "ci-bot", "--limit", "2",
                                  api_key=VIEWER_KEY)
    assert code == 0 and len(listed) == 2 and listed[0]["actor"] == "ci-bot", err
    # A refused key reaches the operator as one clear line, not a traceback.
    for key, status, hint in ((VIEWER_KEY, "403", "needs role operator"),
                              ("a-key-nobody-knows", "401", "VLLM_MODEL_SWITCHING_API_KEY"),
                              (None, "401", "VLLM_MODEL_SWITCHING_API_KEY")):
        code, out, err = await cli(plane, "pause", "some-operation", api_key=key)
        assert (code, out) == (1, None)
        assert err.startswith(f"turnout: HTTP {status}: ") and hint in err, err
        assert len(err.strip().splitlines()) == 1, err


async def test_failed_authentications_are_audited_within_a_budget(
        plane: ControlPlane) -> None:
    """A flood of bad keys writes at most the per-client budget to the audit log."""
    port = free_port()
    settings = plane.settings.model_copy(update={
        "api_port": port, "api_auth_failures_audited_per_minute": 3})
    app = create_app(settings, store=plane.store, temporal=plane.env.client)
    server, task = await serve_api(app, port)
    try:
        async with plane.http() as client:
            last = await newest_id(client, action="auth_failed")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as flood:
                answers = [(await flood.get("/models", headers=as_(f"guess-{i}"))).status_code
                           for i in range(40)]
            after = await audit(client, action="auth_failed", limit=100)
    finally:
        server.should_exit = True
        await task
    assert answers == [401] * 40
    new = [e for e in after if e["id"] > last]
    assert 1 <= len(new) <= 3 * 2  # the budget, even if the minute turned during the flood


async def test_authentication_on_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODEL_SWITCHING_")}
    env.update(VLLM_MODEL_SWITCHING_ENABLE_AUTHENTICATION="true",
               VLLM_MODEL_SWITCHING_API_PORT=str(free_port()),
               VLLM_MODEL_SWITCHING_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/t.db")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode != 0
    assert "VLLM_MODEL_SWITCHING_API_KEYS_FILE" in err.decode()
    assert "VLLM_MODEL_SWITCHING_API_KEY" in err.decode()
    assert "Traceback" not in err.decode()
