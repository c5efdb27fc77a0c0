"""The engine fleet on real parts: a replaced version stands by, so an emergency rollback
after promotion is a route change; the standby ends after its window; preloads fill the
host's cache, the lowest priority is evicted first, and what serves or mirrors never is.

One stack of its own (a short standby window, a cache of one engine) with real vLLM
engines on tiny models; the tests run in order and build on each other.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.e2e.client import eventually, record, record_switch
from tests.e2e.conftest import e2e_stack, running
from tests.replay.recording import recording, save_history
from turnout import contracts as c
from turnout.domain import EngineInfo
from turnout.runtime import connect_temporal
from turnout.store import Store
from workers.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

ARCH, STAGE = "Fleet", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"
STANDBY_MINUTES = 1.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory,
                model_roots: list[str]) -> AsyncIterator[Stack]:
    # Fixed ports below the kernel's ephemeral range (32768+), where vLLM's own sockets
    # land, and apart from the other e2e modules' and `make run`'s.
    async with running(e2e_stack(
            tmp_path_factory.mktemp("fleet"), ui_port=23234, model_roots=model_roots,
            temporal_address="127.0.0.1:23233", api_port=23001, gateway_port=23000,
            gateway_admin_port=23002, engine_port_start=23100, engine_port_end=23119,
            engine_host="e2e-fleet", standby_minutes=STANDBY_MINUTES, max_cached_models=1,
            monitoring_interval_s=4)) as started:
        yield started


async def call(stack: Stack, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        return await client.request(method, path, **kwargs)


async def wait_end(stack: Stack, operation_id: str, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = (await call(stack, "GET", f"/switch/operations/{operation_id}")).json()
        if status["status"] in ("completed", "failed"):
            return status
        assert time.monotonic() < deadline, f"switch still {status} after {timeout_s}s"
        await asyncio.sleep(0.2)


async def switch(stack: Stack, version: str) -> dict[str, Any]:
    r = await call(stack, "POST", "/switch", json={
        "model_id": MODEL_ID, "target_version": version, "strategy": "immediate"})
    assert r.status_code == 202, r.text
    status = await wait_end(stack, r.json()["operation_id"])
    assert (status["status"], status["outcome"]) == ("completed", "promoted"), \
        status["reason"]
    return status


async def engines(stack: Stack) -> dict[str, dict[str, Any]]:
    """Version -> its engine as `GET /engines` shows it (one host here)."""
    report = (await call(stack, "GET", "/engines")).json()
    return {e["version"]: e for e in report["engines"] if e["model_id"] == MODEL_ID}


async def preload(stack: Stack, version: str, priority: int) -> httpx.Response:
    return await call(stack, "POST", f"/models/{MODEL_ID}/versions/{version}/preload",
                      json={"priority": priority})


async def preload_ready(stack: Stack, version: str) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        status = (await call(stack, "GET",
                             f"/models/{MODEL_ID}/versions/{version}/preload")).json()
        assert status["phase"] != "failed", status
        return status if status["phase"] == "ready" else None

    return await eventually(ready, f"{version} preloaded", 600)


class Client:
    """Completions through the gateway without pause; when each was sent, who answered."""

    def __init__(self, gateway_url: str) -> None:
        self.gateway_url = gateway_url
        self.answers: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.gateway_url, timeout=60) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = await client.post("/v1/completions", json={
                        "model": MODEL_ID, "prompt": "Hello", "max_tokens": 2})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    self.failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                else:
                    self.answers.append((sent, r.headers["x-turnout-version"]))


async def test_the_replaced_version_stands_by(stack: Stack,
                                              tiny_models: dict[str, Path]) -> None:
    # Four versions: two models' weights, each registered twice, so the cache tests below
    # need no more model files.
    for version, name in (("v1", "tiny-v1"), ("v2", "tiny-v2"), ("p1", "tiny-v1"),
                          ("p10", "tiny-v2"), ("p20", "tiny-v1")):
        r = await call(stack, "POST", "/models", json={
            "model": str(tiny_models[name]), "model_arch": ARCH, "model_stage": STAGE,
            "version": version})
        assert r.status_code == 201, r.text
    first = await switch(stack, "v1")
    assert first["warm_start"] is False
    second = await switch(stack, "v2")
    assert second["warm_start"] is False
    loaded = await engines(stack)
    assert (loaded["v2"]["role"], loaded["v1"]["role"]) == ("serving", "standby"), loaded
    assert loaded["v1"]["state"] == "ready"
    assert any(h.startswith("standby:") for h in loaded["v1"]["held_by"])
    [host] = (await call(stack, "GET", "/engines")).json()["hosts"]
    assert host["host_id"] == "e2e-fleet" and host["live"] and host["engines"] == 2
    assert 0 < host["free_bytes"] < host["capacity"]["memory_bytes"]


async def test_an_emergency_rollback_after_promotion_is_instant(stack: Stack) -> None:
    client = Client(stack.gateway_url)
    sender = asyncio.create_task(client.run())
    try:
        await eventually(lambda: asyncio.sleep(0, result=len(client.answers) > 20),
                         "the client's first answers", 60)
        asked = time.monotonic()
        r = await call(stack, "POST", f"/models/{MODEL_ID}/rollback",
                       json={"reason": "v2 misbehaves"})
        assert r.status_code == 202, r.text
        status = await wait_end(stack, r.json()["operation_id"], timeout_s=120)
        await asyncio.sleep(1.5)
    finally:
        client._stop.set()
        await sender
    assert (status["status"], status["outcome"], status["warm_start"]) == \
        ("completed", "promoted", True), status
    await record_switch(stack, "immediate-warm-emergency-rollback", status["operation_id"])
    assert client.failures == [], client.failures[:5]
    late = [version for sent, version in client.answers if sent >= asked + 1.0]
    assert late and set(late) == {"v1"}, \
        f"answers sent 1 s after the rollback: {sorted(set(late))}"
    first_v1 = min(sent for sent, version in client.answers
                   if version == "v1" and sent >= asked)
    print(f"every request sent from {first_v1 - asked:.3f} s after the rollback request "
          f"on was served by v1; {len(client.answers)} answers, 0 failed")
    loaded = await engines(stack)
    assert (loaded["v1"]["role"], loaded["v2"]["role"]) == ("serving", "standby"), loaded


async def test_a_standby_is_released_after_its_window(stack: Stack) -> None:
    async def v2_gone() -> bool:
        return "v2" not in await engines(stack)

    await eventually(v2_gone, "v2's engine stopped after its standby window",
                     STANDBY_MINUTES * 60 + 60)
    assert (await engines(stack))["v1"]["role"] == "serving"
    if recording():
        client = await connect_temporal(stack.settings)
        async for standby in client.list_workflows(f"WorkflowType = '{c.STANDBY_WORKFLOW}'"):
            if standby.status is not None and standby.status.name == "COMPLETED":
                await save_history(client, "standby-released", standby.id, standby.run_id)
                break


async def test_preloads_fill_the_cache_and_the_lowest_priority_goes_first(
        stack: Stack) -> None:
    r = await preload(stack, "p1", priority=1)
    assert r.status_code == 202, r.text
    await preload_ready(stack, "p1")
    assert (await engines(stack))["p1"]["role"] == "preloaded"
    # max_cached_models = 1: a preload of priority 10 evicts the one of priority 1.
    r = await preload(stack, "p10", priority=10)
    assert r.status_code == 202, r.text
    await preload_ready(stack, "p10")
    loaded = await engines(stack)
    assert "p1" not in loaded and loaded["p10"]["priority"] == 10, loaded
    assert loaded["v1"]["role"] == "serving"
    evicted = (await call(stack, "GET", f"/models/{MODEL_ID}/versions/p1/preload")).json()
    assert evicted["phase"] == "evicted", evicted
    await record(stack, "preload-evicted", c.preload_workflow_id(MODEL_ID, "p1"))
    # A lower priority may not evict it: refused at once, naming what would have to go.
    refused = await preload(stack, "p1", priority=0)
    assert refused.status_code == 409, refused.text
    assert "p10" in refused.json()["detail"] and "priority 10" in refused.json()["detail"]
    # Preloading what is loaded already is idempotent: 200 with the existing engine.
    again = await preload(stack, "p10", priority=10)
    assert again.status_code == 200 and again.json()["phase"] == "ready", again.text


async def test_what_serves_or_mirrors_is_never_evicted(stack: Stack) -> None:
    r = await call(stack, "POST", f"/models/{MODEL_ID}/shadow",
                   json={"version": "p1", "percentage": 10})
    assert r.status_code == 202, r.text

    async def mirroring() -> bool:
        shadow = (await call(stack, "GET", f"/models/{MODEL_ID}/shadow")).json()
        assert shadow["phase"] != "failed", shadow
        return shadow["phase"] == "mirroring"

    await eventually(mirroring, "the shadow mirroring to p1", 600)
    r = await preload(stack, "p20", priority=20)
    assert r.status_code == 202, r.text
    await preload_ready(stack, "p20")
    loaded = await engines(stack)
    assert {v: e["role"] for v, e in loaded.items()} == \
        {"v1": "serving", "p1": "shadow", "p20": "preloaded"}, loaded
    r = await call(stack, "DELETE", f"/models/{MODEL_ID}/shadow")
    assert r.status_code == 202, r.text
    r = await call(stack, "DELETE", f"/models/{MODEL_ID}/versions/p20/preload")
    assert r.status_code == 202, r.text

    async def released() -> bool:
        return set(await engines(stack)) == {"v1"}

    await eventually(released, "the shadow's and the preload's engines stopped", 120)
    await record(stack, "preload-released", c.preload_workflow_id(MODEL_ID, "p20"))
    await record(stack, "shadow-released", c.shadow_workflow_id(MODEL_ID))


# ---------------------------------------------------------------------- two engine hosts

SECOND_HOST = "e2e-fleet-2"


async def engine_of(stack: Stack, version: str, host: str) -> EngineInfo | None:
    store = Store.from_url(stack.settings.database_url)
    try:
        return await store.get_engine(MODEL_ID, version, host)
    finally:
        await store.close()


async def served_by_engine(engine: EngineInfo) -> float:
    """Requests the vLLM engine itself says it finished (its own /metrics)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{engine.url}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


async def test_a_version_with_two_replicas_runs_on_two_hosts(stack: Stack) -> None:
    s = stack.settings
    stack.add_process("engine-worker-2", [sys.executable, "-m", "workers.engine"], env={
        s.env_name("engine_host"): SECOND_HOST, s.env_name("engine_port_start"): "23120",
        s.env_name("engine_port_end"): "23139"})
    stack.start_process("engine-worker-2")

    async def two_live_hosts() -> bool:
        hosts = (await call(stack, "GET", "/engines")).json()["hosts"]
        return sum(h["live"] for h in hosts) == 2

    await eventually(two_live_hosts, "the second engine host heartbeating", 90)
    r = await call(stack, "POST", "/switch", json={
        "model_id": MODEL_ID, "target_version": "v2", "strategy": "immediate",
        "replicas": 2})
    assert r.status_code == 202, r.text
    status = await wait_end(stack, r.json()["operation_id"])
    assert status["outcome"] == "promoted", status["reason"]
    await record_switch(stack, "immediate-two-replicas", status["operation_id"])
    report = (await call(stack, "GET", "/engines")).json()
    hosts = sorted(e["host"] for e in report["engines"]
                   if e["model_id"] == MODEL_ID and e["version"] == "v2")
    assert hosts == ["e2e-fleet", SECOND_HOST], report["engines"]
    too_many = await call(stack, "POST", "/switch/validate", json={
        "model_id": MODEL_ID, "target_version": "v1", "replicas": 3})
    assert any("replicas" in e for e in too_many.json()["errors"]), too_many.text

    client = Client(stack.gateway_url)
    sender = asyncio.create_task(client.run())
    try:
        await eventually(lambda: asyncio.sleep(0, result=len(client.answers) > 40),
                         "answers through the gateway", 60)
        first = await engine_of(stack, "v2", "e2e-fleet")
        second = await engine_of(stack, "v2", SECOND_HOST)
        assert first is not None and second is not None
        # The gateway spreads v2's share over both replicas.
        assert await served_by_engine(first) > 5 and await served_by_engine(second) > 5

        # A replica's engine is killed: the other serves every request meanwhile; the
        # dead one is replaced, and its alert fires and resolves.
        assert second.pid is not None
        os.killpg(second.pid, signal.SIGKILL)

        async def engine_alert(state: str) -> list[dict[str, Any]]:
            alerts = (await call(stack, "GET", "/alerts",
                                 params={"model_id": MODEL_ID, "state": state})).json()
            return [a for a in alerts if a["type"] == "engine" and a["version"] == "v2"]

        [alert] = await eventually(lambda: engine_alert("firing"), "an engine alert", 30)
        assert alert["severity"] == "critical" and SECOND_HOST in alert["title"]

        async def replaced() -> EngineInfo | None:
            engine = await engine_of(stack, "v2", SECOND_HOST)
            ready = engine is not None and engine.state.value == "ready" \
                and engine.pid != second.pid
            return engine if ready else None

        renewed = await eventually(replaced, "the dead replica replaced", 600)
        await eventually(lambda: engine_alert("resolved"), "the engine alert resolved", 60)
        await record(stack, "replace-engine-serving",
                     c.replace_engine_workflow_id(MODEL_ID, "v2", SECOND_HOST))
        answers = len(client.answers)
        await eventually(lambda: asyncio.sleep(0, result=len(client.answers) > answers + 40),
                         "more answers", 60)
        assert await served_by_engine(renewed) > 0, "the new replica is not routed to"
    finally:
        client._stop.set()
        await sender
    assert client.failures == [], client.failures[:5]
