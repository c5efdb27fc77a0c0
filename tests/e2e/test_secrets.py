"""Secrets stay secret: a real run with every secret set, then a search for each of them.

One stack of its own (ports apart from the other e2e modules) with authentication on, an
admin token, a webhook URL carrying a token (to a local receiver that fails), and an
endpoint credential variable in the launcher's environment. It registers a tiny model,
switches it to a real vLLM engine, serves a few requests, fails to authenticate, fires an
alert whose webhook fails. Then no secret may be in any log, in the environment of the
engine or of its children, in a process that does not use it, or in any answer.

(SQLite has no password; masking a PostgreSQL URL's is unit-tested in test_config.py.)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest
import pytest_asyncio
from aiohttp import web

from tests.e2e.conftest import e2e_stack, running
from turnout.store import Store
from workers.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

ARCH, STAGE = "TinyLlama", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"
CREDENTIAL_ENV = "TURNOUT_E2E_PARTNER_KEY"

# Recognisable random values: a hit anywhere is a leak, never a coincidence.
SECRET = {
    "api_key": f"apikey-{secrets.token_hex(12)}",
    "admin_token": f"admintoken-{secrets.token_hex(12)}",
    "webhook_token": f"hooktoken-{secrets.token_hex(12)}",
    "credential": f"partnercred-{secrets.token_hex(12)}",
    # Presented by a caller and refused: not to be logged either.
    "wrong_key": f"wrongkey-{secrets.token_hex(12)}",
}
# Who holds what (README "Secrets"); every other process must not.
HOLDERS = {
    "api": {"api_key"},
    "gateway": {"admin_token", "credential"},
    "control-worker": {"admin_token", "webhook_token", "credential"},
    "engine-worker": set(),
    "temporal": set(),
}


class Receiver:
    """A webhook receiver that fails every delivery (HTTP 500) and remembers the paths."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            await request.read()
            self.paths.append(request.path)
            return web.Response(status=500, text="receiver down")

        app = web.Application()
        app.router.add_post("/{tail:.*}", hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver,
                model_roots: list[str]) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("secrets-stack")
    webhook = f"http://127.0.0.1:{receiver.port}/services/T0/B0/{SECRET['webhook_token']}"
    stack = e2e_stack(
        root, ui_port=28233, base_env={**os.environ, CREDENTIAL_ENV: SECRET["credential"]},
        temporal_address="127.0.0.1:27233", api_port=28001, gateway_port=28000,
        gateway_admin_port=28002, engine_port_start=28100, engine_port_end=28119,
        engine_host="e2e-secrets", monitoring_interval_s=2,
        enable_authentication=True, api_key=SECRET["api_key"],
        gateway_admin_token=SECRET["admin_token"], alert_webhook_urls=[webhook],
        alert_webhook_retries=1, alert_webhook_timeout_s=2,
        endpoint_credential_envs=[CREDENTIAL_ENV], model_roots=model_roots)
    async with running(stack) as started:
        yield started


# Every answer the test saw, headers included: none may carry a secret.
SEEN: list[str] = []


async def _record(response: httpx.Response) -> None:
    await response.aread()
    SEEN.append(f"{response.request.method} {response.url} {response.status_code}\n"
                f"{response.headers}\n{response.text}")


def client(base_url: str, key: str | None = SECRET["api_key"]) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60,
                             event_hooks={"response": [_record]})


async def test_a_switch_with_every_secret_set(stack: Stack, tiny_models: dict[str, Path],
                                              receiver: Receiver) -> None:
    async with client(stack.api_url) as api:
        response = await api.post("/models", json={
            "model": str(tiny_models["tiny-v1"]), "model_arch": ARCH, "model_stage": STAGE,
            "version": "v1"})
        assert response.status_code == 201, response.text
        response = await api.post("/switch", json={
            "model_id": MODEL_ID, "target_version": "v1", "strategy": "immediate"})
        assert response.status_code == 202, response.text
        operation = response.json()["operation_id"]
        deadline = time.monotonic() + 600
        while (status := (await api.get(f"/switch/operations/{operation}")).json())[
                "status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, status
            await asyncio.sleep(1)
        assert status["status"] == "completed", status

    async with client(stack.gateway_url, key=None) as gateway:
        for _ in range(3):
            response = await gateway.post("/v1/completions", json={
                "model": MODEL_ID, "prompt": "Hello", "max_tokens": 4})
            assert response.status_code == 200, response.text
            assert response.headers["x-turnout-version"] == "v1"

    # Authentication failures: no key, a wrong key, a wrong admin token.
    async with client(stack.api_url, key=None) as anonymous:
        assert (await anonymous.get("/models")).status_code == 401
    async with client(stack.api_url, key=SECRET["wrong_key"]) as wrong:
        assert (await wrong.get("/models")).status_code == 401
    async with client(stack.gateway_admin_url, key=SECRET["wrong_key"]) as admin:
        assert (await admin.get("/admin/state")).status_code == 401

    # Any engine uses memory: levels this low fire an alert at the next look, whose
    # webhook fails (HTTP 500, retried once, then given up).
    async with client(stack.api_url) as api:
        response = await api.put("/health/thresholds", json={
            "model_id": MODEL_ID, "memory_warning_percent": 0.01,
            "memory_critical_percent": 0.02})
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 120
        while len(receiver.paths) < 2 or "gave up" not in _log(stack, "control-worker"):
            assert time.monotonic() < deadline, (receiver.paths, "no failed webhook")
            await asyncio.sleep(1)
        alerts = (await api.get("/alerts", params={"model_id": MODEL_ID})).json()
        assert any(a["type"] == "resource" for a in alerts), alerts
    # The webhook was called at its secret URL, and the failure was logged without it.
    assert all(path.endswith(SECRET["webhook_token"]) for path in receiver.paths)
    assert f"alert webhook at 127.0.0.1:{receiver.port} gave up" in _log(stack,
                                                                        "control-worker")


def _log(stack: Stack, name: str) -> str:
    return stack.processes[name].log_path.read_text(errors="replace")


def _leaks(data: bytes) -> list[str]:
    return [name for name, value in SECRET.items() if value.encode() in data]


async def test_no_secret_in_any_log(stack: Stack) -> None:
    engines = Path(stack.settings.state_dir) / "engines"
    logs = [p for d in (stack.log_dir, engines) for p in d.rglob("*") if p.is_file()]
    assert {p.name for p in logs} >= {f"{n}.log" for n in stack.processes}
    assert any(p.parent == engines for p in logs), "no engine log"
    found = {str(p): leaks for p in logs if (leaks := _leaks(p.read_bytes()))}
    assert not found, f"secrets in logs: {found}"


def _session(leader: int) -> dict[int, bytes]:
    """The environment of every process of a session (a stack process or an engine and
    all its children)."""
    environs = {}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader:
                environs[proc.pid] = Path(f"/proc/{proc.pid}/environ").read_bytes()
        except (OSError, psutil.Error):
            continue
    return environs


async def test_engines_hold_no_secret_and_no_setting(stack: Stack) -> None:
    store = Store.from_url(stack.settings.database_url)
    try:
        engines = [e for e in await store.list_engines(model_id=MODEL_ID) if e.pid]
    finally:
        await store.close()
    assert engines
    for engine in engines:
        environs = _session(engine.pid)  # type: ignore[arg-type]
        assert len(environs) >= 2, "vLLM's children were not found"
        for pid, environ in environs.items():
            assert not _leaks(environ), (pid, _leaks(environ))
            names = {item.split(b"=", 1)[0] for item in environ.split(b"\0") if item}
            assert not [n for n in names if n.startswith(b"VLLM_MODEL_SWITCHING_")], pid
            assert CREDENTIAL_ENV.encode() not in names, pid


@pytest.mark.parametrize("name", sorted(HOLDERS))
async def test_each_process_holds_only_its_secrets(stack: Stack, name: str) -> None:
    popen = stack.processes[name].popen
    assert popen is not None and popen.poll() is None
    environs = _session(popen.pid)
    assert popen.pid in environs
    held = {leak for environ in environs.values() for leak in _leaks(environ)}
    assert held == HOLDERS[name]
    if name == "temporal":
        assert not any(b"VLLM_MODEL_SWITCHING_" in e for e in environs.values())


async def test_no_secret_in_any_answer(stack: Stack) -> None:
    assert len(SEEN) >= 10
    found = [(text.splitlines()[0], leaks) for text in SEEN if (leaks := _leaks(text.encode()))]
    assert not found, found
