"""Chaos on the serving side, real processes and real signals: the engine worker killed
between starting vLLM and recording the engine, the canary's target engine killed, the live
engine killed in steady state, and the store (PostgreSQL) stopped during a canary while the
monitors run.

Each asserts what a user relies on: no client request fails where another version can
serve it, no step is applied twice, the switch ends as it would have without the fault (or,
where the fault is the new version's own engine dying, it is rolled back saying why), and
the fault is visible. One stack of its own on a PostgreSQL server of its own (stopped and
started by a test), real vLLM engines on the tiny models; the tests run in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import psutil
import pytest
import pytest_asyncio

from activities.engines import unrecorded_engines
from tests.e2e.conftest import e2e_stack, running
from tests.postgres import PostgresServer, start_postgres
from turnout.domain import EngineInfo, EngineState, Route
from turnout.runtime import port_free
from turnout.store import Store
from workers.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

ARCH, STAGE = "Chaos", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"
HOST = "e2e-chaos"
T = TypeVar("T")
# The canary the engine-worker test starts, which the next test's fault ends.
CANARY: dict[str, str] = {}


@pytest.fixture(scope="module")
def postgres() -> AsyncIterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def database_url(postgres: PostgresServer) -> str:
    return postgres.create_database("chaos")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory, model_roots: list[str],
                database_url: str) -> AsyncIterator[Stack]:
    # Ports below the kernel's ephemeral range and apart from the other modules' and
    # `make run`'s.
    async with running(e2e_stack(
            tmp_path_factory.mktemp("chaos"), ui_port=25234, database_url=database_url,
            model_roots=model_roots, temporal_address="127.0.0.1:25233", api_port=25001,
            gateway_port=25000, gateway_admin_port=25002, engine_port_start=25100,
            engine_port_end=25119, engine_host=HOST, standby_minutes=0,
            monitoring_interval_s=4)) as started:
        yield started


class Load:
    """One client sending completions through the gateway without pause, each answer's
    status, version and time kept."""

    def __init__(self, gateway_url: str) -> None:
        self.gateway_url = gateway_url
        self.served: list[str] = []
        self.failures: list[tuple[float, str, float]] = []  # (when, what, seconds taken)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.gateway_url, timeout=60) as client:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    r = await client.post("/v1/completions", json={
                        "model": MODEL_ID, "prompt": "Hello", "max_tokens": 2})
                    if r.status_code == 200:
                        self.served.append(r.headers.get("x-turnout-version", "?"))
                        continue
                    what = f"HTTP {r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    what = repr(exc)
                self.failures.append((began, what, time.monotonic() - began))
                await asyncio.sleep(0.05)

    async def served_more(self, count: int, timeout_s: float = 120) -> None:
        goal = len(self.served) + count
        await eventually(lambda: _now(len(self.served) >= goal), f"{count} more answers",
                         timeout_s)


@asynccontextmanager
async def load(stack: Stack) -> AsyncIterator[Load]:
    client = Load(stack.gateway_url)
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        client._stop.set()
        await task


async def _now(value: T) -> T:
    return value


async def eventually(check: Callable[[], Awaitable[T]], what: str, timeout_s: float) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        await asyncio.sleep(0.2)


async def api(stack: Stack, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
        return await client.request(method, path, **kwargs)


async def start(stack: Stack, version: str, strategy: str,
                config: dict[str, Any] | None = None) -> str:
    r = await api(stack, "POST", "/switch", json={
        "model_id": MODEL_ID, "target_version": version, "strategy": strategy,
        "strategy_config": config or {}})
    assert r.status_code == 202, r.text
    return r.json()["operation_id"]


async def status(stack: Stack, operation_id: str) -> dict[str, Any]:
    r = await api(stack, "GET", f"/switch/operations/{operation_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def wait_end(stack: Stack, operation_id: str, timeout_s: float = 600) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        s = await status(stack, operation_id)
        return s if s["status"] in ("completed", "failed") else None
    return await eventually(ended, f"operation {operation_id} to end", timeout_s)


async def wait_phase(stack: Stack, operation_id: str, phase: str,
                     timeout_s: float = 600) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        s = await status(stack, operation_id)
        assert s["status"] not in ("completed", "failed"), s
        return s if s["phase"] == phase else None
    return await eventually(reached, f"phase {phase}", timeout_s)


async def engine_of(database_url: str, version: str) -> EngineInfo | None:
    store = Store.from_url(database_url)
    try:
        return await store.get_engine(MODEL_ID, version, HOST)
    finally:
        await store.close()


async def ready_engine(database_url: str, version: str, not_pid: int | None = None,
                       timeout_s: float = 600) -> EngineInfo:
    async def ready() -> EngineInfo | None:
        engine = await engine_of(database_url, version)
        ok = engine is not None and engine.state is EngineState.READY \
            and engine.pid != not_pid
        return engine if ok else None
    return await eventually(ready, f"a ready engine of {version}", timeout_s)


async def alerts(stack: Stack, kind: str, version: str, state: str) -> list[dict[str, Any]]:
    found = (await api(stack, "GET", "/alerts", params={
        "model_id": MODEL_ID, "state": state})).json()
    return [a for a in found if a["type"] == kind and a["version"] == version]


async def route(database_url: str) -> Route:
    store = Store.from_url(database_url)
    try:
        found = await store.get_route(MODEL_ID)
    finally:
        await store.close()
    assert found is not None
    return found


def kill_engine(engine: EngineInfo) -> None:
    """SIGKILL a vLLM engine's whole session (its API server and its engine core)."""
    assert engine.pid is not None
    os.killpg(engine.pid, signal.SIGKILL)


@asynccontextmanager
async def engines_table_locked(database_url: str) -> AsyncIterator[None]:
    """Writes to the engines table wait while this holds a lock on it (reads go on): an
    engine worker that starts vLLM then blocks on writing its record."""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE engines IN SHARE ROW EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def test_v1_goes_live(stack: Stack, tiny_models: dict[str, Path]) -> None:
    for version, model in (("v1", "tiny-v1"), ("v2", "tiny-v2")):
        r = await api(stack, "POST", "/models", json={
            "model_arch": ARCH, "model_stage": STAGE, "version": version,
            "model": str(tiny_models[model])})
        assert r.status_code == 201, r.text
    s = await wait_end(stack, await start(stack, "v1", "immediate"))
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), s


async def test_an_engine_worker_killed_before_recording_its_engine_leaves_no_orphan(
        stack: Stack, database_url: str) -> None:
    """The engine worker is killed after starting v2's vLLM server but before its record is
    written (the store slow to answer): the restarted worker stops the engine nobody knows,
    its port is free again, and the retried load brings v2 up for the canary, which goes on
    to evaluate with every client request answered."""
    v1 = await ready_engine(database_url, "v1")
    async with load(stack) as client:
        async with engines_table_locked(database_url):
            operation_id = await start(stack, "v2", "canary", {
                "initial_percentage": 50, "step_percentage": 50,
                "evaluation_period_minutes": 1})

            async def started() -> list[int]:
                return unrecorded_engines(HOST, {v1.pid})
            [orphan] = await eventually(started, "v2's vLLM server to start", 120)
            orphan_port = _port_of(orphan)
            stack.kill_process("engine-worker", signal.SIGKILL)
            assert psutil.pid_exists(orphan)  # its own session: it outlives the worker
        stack.start_process("engine-worker")

        async def orphan_gone() -> bool:
            return not psutil.pid_exists(orphan) or \
                psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
        await eventually(orphan_gone, "the unrecorded engine stopped", 60)
        # (The retried load starts only after the attempt's heartbeat timeout, 60 s.)
        assert port_free("127.0.0.1", orphan_port)
        # The load is retried (after its heartbeat timeout) on the restarted worker.
        await wait_phase(stack, operation_id, "evaluating", 600)
        v2 = await ready_engine(database_url, "v2")
        assert v2.pid != orphan
        await client.served_more(20)
        assert unrecorded_engines(HOST, {v1.pid, v2.pid}) == []
    assert client.failures == [], client.failures[:5]
    assert (await status(stack, operation_id))["weights"] == {"v1": 50.0, "v2": 50.0}
    CANARY["operation_id"] = operation_id


def _port_of(pid: int) -> int:
    cmdline = psutil.Process(pid).cmdline()
    return int(cmdline[cmdline.index("--port") + 1])


async def test_the_canary_target_engine_killed_rolls_back_without_a_client_failure(
        stack: Stack, database_url: str) -> None:
    """v2's engine dies mid-canary: its requests are retried on v1 (no client sees a
    failure), the engine alert fires, and the canary is rolled back naming why; no engine
    of v2 is left behind, and the rollback changed the route once."""
    operation_id = CANARY["operation_id"]
    v1, v2 = await ready_engine(database_url, "v1"), await ready_engine(database_url, "v2")
    async with load(stack) as client:
        await client.served_more(10)
        assert {"v1", "v2"} <= set(client.served)
        before = await route(database_url)
        kill_engine(v2)
        [alert] = await eventually(lambda: alerts(stack, "engine", "v2", "firing"),
                                   "an engine alert for v2", 60)
        assert alert["severity"] == "critical" and HOST in alert["title"], alert
        s = await wait_end(stack, operation_id)
        after = len(client.served)
        await client.served_more(20)
    assert (s["status"], s["outcome"]) == ("failed", "rolled_back"), s
    print("rolled back:", s["reason"])
    assert client.failures == [], client.failures[:5]
    assert set(client.served[after:]) == {"v1"}
    final = await route(database_url)
    assert final.weights() == {"v1": 100.0}, final
    print("generations", before.generation, final.generation)

    async def v2_gone() -> bool:
        return await engine_of(database_url, "v2") is None and \
            unrecorded_engines(HOST, {v1.pid}) == []
    await eventually(v2_gone, "no engine of v2 left", 300)


async def test_the_live_engine_killed_is_replaced(stack: Stack, database_url: str) -> None:
    """The only engine of the live version dies: until its replacement is ready, clients
    get a quick error answer (no hang), the engine alert fires, then resolves once the new
    engine serves."""
    v1 = await ready_engine(database_url, "v1")
    async with load(stack) as client:
        await client.served_more(10)
        kill_engine(v1)
        await eventually(lambda: alerts(stack, "engine", "v1", "firing"),
                         "an engine alert for v1", 60)
        renewed = await ready_engine(database_url, "v1", not_pid=v1.pid)
        await client.served_more(20)
        await eventually(lambda: alerts(stack, "engine", "v1", "resolved"),
                         "the engine alert resolved", 60)
        failed = len(client.failures)
        await client.served_more(20)
    print("failures while v1 had no engine:", failed, client.failures[:3])
    assert client.failures[failed:] == []
    assert all(taken < 10 for _, _, taken in client.failures), client.failures[:5]
    assert renewed.pid != v1.pid


async def test_a_store_outage_during_a_canary(stack: Stack, postgres: PostgresServer,
                                              database_url: str) -> None:
    """PostgreSQL stops for longer than a judgment's retries while a canary evaluates and
    the monitors look: the gateway serves the split it has (no client failure), the API
    answers 503 naming the store, and once the store is back the canary goes on to promote
    as it would have, each step applied once, and the monitor looks again."""
    async with load(stack) as client:
        operation_id = await start(stack, "v2", "canary", {
            "initial_percentage": 50, "step_percentage": 50,
            "evaluation_period_minutes": 0.5})
        await wait_phase(stack, operation_id, "evaluating")
        await client.served_more(10)
        before = await route(database_url)
        postgres.pause()
        try:
            served = len(client.served)
            began = time.monotonic()
            r = await api(stack, "GET", f"/switch/operations/{operation_id}")
            assert r.status_code == 503 and "store" in r.json()["detail"].lower(), r.text
            assert time.monotonic() - began < 15
            # Longer than the judgment's retries (5 attempts, about 30 s) and than the
            # evaluation period: the step's end comes while the store is away.
            await asyncio.sleep(45)
            assert len(client.served) > served
        finally:
            postgres.resume()
        s = await wait_end(stack, operation_id)
        await client.served_more(10)
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), s
    assert client.failures == [], client.failures[:5]
    final = await route(database_url)
    assert final.weights() == {"v2": 100.0}
    print("generations", before.generation, final.generation)
