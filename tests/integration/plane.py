"""A control plane on real parts for the API tests: a Temporal dev server (with turnout's
search attributes), the control and engine workers, the store, the gateway and the API
over HTTP. Versions are external endpoints (fake OpenAI servers), so no vLLM engine runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.engines import EngineActivities
from activities.gateway_admin import GatewayAdmin
from activities.health import HealthActivities
from api.app import create_app
from gateway.app import start_gateway
from tests.integration.upstream import FakeUpstream, register_fakes
from tests.replay.recording import save_history
from tests.support import free_port
from turnout.config import ModelSwitchingConfig
from turnout.runtime import installed_binary, temporal_interceptors
from turnout.store import Store, upgrade
from workers import control, engine, monitor
from workers.monitor_keeper import keep_monitors
from workers.stack import SEARCH_ATTRIBUTES

_KEY_MAKERS: dict[str, Callable[[str], SearchAttributeKey[Any]]] = {
    "Keyword": SearchAttributeKey.for_keyword,
    "Text": SearchAttributeKey.for_text,
    "Int": SearchAttributeKey.for_int,
    "Double": SearchAttributeKey.for_float,
    "Bool": SearchAttributeKey.for_bool,
    "Datetime": SearchAttributeKey.for_datetime,
    "KeywordList": SearchAttributeKey.for_keyword_list,
}


def search_attribute_keys() -> list[SearchAttributeKey[Any]]:
    """The stack's custom search attributes, typed, for `start_local(search_attributes=)`."""
    return [_KEY_MAKERS[kind](name) for name, kind in SEARCH_ATTRIBUTES.items()]


@dataclass
class ControlPlane:
    settings: ModelSwitchingConfig
    store: Store
    env: WorkflowEnvironment
    api_url: str
    gateway_url: str
    upstreams: dict[str, FakeUpstream]

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.api_url, timeout=30)


async def serve_api(app: Any, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to await
        await asyncio.sleep(0.05)
    return server, task


@asynccontextmanager
async def control_plane(root: Path, versions: tuple[str, ...] = ("v1", "v2"),
                        database_url: str | None = None,
                        **overrides: Any) -> AsyncIterator[ControlPlane]:
    """The plane; `overrides` are settings (`ModelSwitchingConfig` fields) for this run.
    The store is `database_url` (an empty database: migrated here), by default a SQLite
    file in `root`."""
    url = database_url or f"sqlite+aiosqlite:///{root}/turnout.db"
    await asyncio.to_thread(upgrade, url)
    store = Store.from_url(url)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=installed_binary("temporal"),
        data_converter=pydantic_data_converter, search_attributes=search_attribute_keys(),
        interceptors=temporal_interceptors(),  # Temporal's tracing, when tracing is on
        dev_server_extra_args=["--dynamic-config-value",
                               "system.forceSearchAttributesCacheRefreshOnRead=true"])
    gateway_port, admin_port, api_port = free_port(), free_port(), free_port()
    # The fake engines listen on 127.0.0.1: a private address, refused as an endpoint
    # unless the deployment allows it.
    overrides.setdefault("allow_private_endpoints", True)
    settings = ModelSwitchingConfig.from_env(
        {}, database_url=url, state_dir=str(root), engine_host=f"it-{uuid.uuid4().hex[:8]}",
        control_task_queue=f"control-{uuid.uuid4()}", gateway_port=gateway_port,
        gateway_admin_port=admin_port, api_port=api_port, **overrides)
    upstreams = {v: await FakeUpstream(v, f"served-{v}").start() for v in versions}
    admin = GatewayAdmin(None)
    gateway = await start_gateway(settings, store, "it-gateway")
    health = HealthActivities(store, settings=settings, admin=admin)
    workers = [control.build_worker(env.client, settings, store, admin, health=health),
               engine.build_worker(env.client, settings, EngineActivities(settings, store))]
    if not settings.monitors_on_control_worker:  # as the stack runs `workers.monitor`
        workers.append(monitor.build_worker(env.client, settings, store, admin))
    tasks = [asyncio.create_task(w.run()) for w in workers]
    stop_monitors = asyncio.Event()
    tasks.append(asyncio.create_task(
        keep_monitors(env.client, settings, store, stop_monitors, period_s=1)))
    server, server_task = await serve_api(create_app(settings, store=store, temporal=env.client),
                                          api_port)
    try:
        yield ControlPlane(settings, store, env, f"http://127.0.0.1:{api_port}",
                           f"http://127.0.0.1:{gateway_port}", upstreams)
    finally:
        server.should_exit = True
        await server_task
        stop_monitors.set()
        for worker in workers:
            await worker.shutdown()
        await asyncio.gather(*tasks, return_exceptions=True)
        await gateway.stop()
        for upstream in upstreams.values():
            await upstream.stop()
        await health.close()
        await admin.close()
        await env.shutdown()
        await store.close()


async def register_upstreams(plane: ControlPlane, client: httpx.AsyncClient, arch: str,
                             stage: str) -> None:
    """Register each fake engine of the plane as a version (`v1`, `v2`) of one model."""
    await register_fakes(client, plane.upstreams, arch, stage)


async def first_version_live(plane: ControlPlane, client: httpx.AsyncClient, arch: str,
                             stage: str) -> None:
    """Register the plane's fake engines as versions of one model and make `v1` live with
    an immediate switch (a rollout needs a live version to shift from)."""
    await register_upstreams(plane, client, arch, stage)
    response = await client.post("/switch", json={"model_id": f"{arch}_{stage}",
                                                   "target_version": "v1"})
    assert response.status_code == 202, response.text
    status = await wait_done(client, response.json()["operation_id"])
    assert status["outcome"] == "promoted", status


async def wait_done(client: httpx.AsyncClient, operation_id: str) -> dict[str, Any]:
    """Poll `GET /switch/operations/{id}` until it is `completed` or `failed`."""
    for _ in range(600):
        status = (await client.get(f"/switch/operations/{operation_id}")).json()
        if status["status"] in ("completed", "failed"):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"operation {operation_id} did not end: {status}")


@dataclass
class Traffic:
    """What the clients of a `traffic()` block got: answers counted as served only when
    they succeeded (2xx); every other answer, and every transport error, is a failure."""
    served: dict[str, int] = field(default_factory=dict)  # 2xx answers per version
    # (version header or "none", what went wrong) of each failed request.
    failures: list[tuple[str, str]] = field(default_factory=list)

    def count(self, answer: httpx.Response) -> None:
        version = answer.headers.get("x-turnout-version", "none")
        if answer.is_success:
            self.served[version] = self.served.get(version, 0) + 1
        else:
            self.failures.append((version, f"{answer.status_code}: {answer.text[:200]}"))

    def check(self, may_fail: tuple[str, ...]) -> None:
        """Every request succeeded, but for answers from a version in `may_fail` (the
        ones a test makes fail on purpose)."""
        unexpected = [f for f in self.failures if f[0] not in may_fail]
        sent = sum(self.served.values()) + len(self.failures)
        assert not unexpected, (f"{len(unexpected)} of {sent} client requests failed, "
                                f"first {unexpected[:5]}")


@asynccontextmanager
async def traffic(gateway_url: str, model_id: str, pace_s: float = 0,
                  may_fail: tuple[str, ...] = ()) -> AsyncIterator[Traffic]:
    """Send completions through the gateway, one after another (`pace_s` apart: light
    traffic), until the block ends: health judgments need requests (too few is
    inconclusive, never healthy). Yields a live count of what the clients got; when the
    block ends without an error, asserts that every request succeeded (the promise of a
    zero-downtime shift) except answers from the versions in `may_fail`, the ones the
    test makes fail."""
    seen = Traffic()

    async def send() -> None:
        async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as gateway:
            i = 0
            while True:
                try:
                    seen.count(await gateway.post("/v1/completions", json={
                        "model": model_id, "prompt": "hi", "user": f"user-{i}"}))
                except httpx.HTTPError as error:
                    seen.failures.append(("none", f"{type(error).__name__}: {error}"))
                    await asyncio.sleep(0.05)  # a refused connection fails at once
                i += 1
                if pace_s:
                    await asyncio.sleep(pace_s)

    task = asyncio.create_task(send())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    seen.check(may_fail)


async def record_history(plane: ControlPlane, operation_id: str, scenario: str) -> None:
    """With RECORD_HISTORIES=1, keep this switch's history for the replay tests."""
    record = await plane.store.get_operation(operation_id)
    await record_workflow_history(plane, f"switch-{scenario}", record.workflow_id,
                                  record.run_id)


async def record_workflow_history(plane: ControlPlane, name: str, workflow_id: str,
                                  run_id: str | None = None) -> None:
    """With RECORD_HISTORIES=1, keep a workflow's history (so far) for the replay tests."""
    await save_history(plane.env.client, name, workflow_id, run_id)


async def cli(plane: ControlPlane, *args: str,
              api_key: str | None = None) -> tuple[int, Any, str]:
    """Run `turnout ARGS` against the plane's API (sending `api_key` if given): exit code,
    JSON output, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODEL_SWITCHING_")}
    env.update(VLLM_MODEL_SWITCHING_API_URL=plane.api_url, USER="cli-user")
    if api_key is not None:
        env["VLLM_MODEL_SWITCHING_API_KEY"] = api_key
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "turnout.client.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, json.loads(out) if out.strip() else None, err.decode()
