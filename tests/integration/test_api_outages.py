"""Outages at the API, with the real `python -m api` process: it starts without Temporal
(calls that need it are 503, `/readyz` says not ready) and connects once Temporal is up;
a store that does not answer (PostgreSQL stopped, SQLite locked by another process) is a
503 naming the store within about `API_BACKEND_TIMEOUT_S`, never a 500 or a hang, and the
API answers again as soon as the store is back. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.postgres import start_postgres
from tests.support import free_port
from turnout.runtime import installed_binary
from turnout.store import upgrade_async

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

BACKEND_TIMEOUT_S = 1.0
# A hang is a failure: every call must be answered well within this.
CLIENT_TIMEOUT_S = 15 * BACKEND_TIMEOUT_S
REGISTER = {"model": "org/outage", "model_arch": "Outage", "model_stage": "s",
            "version": "v1", "endpoint": "http://127.0.0.1:9", "served_model_name": "x"}


@asynccontextmanager
async def api_process(database_url: str, temporal_address: str,
                      log: Path) -> AsyncIterator[httpx.AsyncClient]:
    """`python -m api` on a free port, once it answers `/healthz`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODEL_SWITCHING_")}
    env.update(VLLM_MODEL_SWITCHING_DATABASE_URL=database_url,
               VLLM_MODEL_SWITCHING_TEMPORAL_ADDRESS=temporal_address,
               VLLM_MODEL_SWITCHING_API_PORT=str(port),
               VLLM_MODEL_SWITCHING_ALLOW_PRIVATE_ENDPOINTS="true",
               VLLM_MODEL_SWITCHING_API_BACKEND_TIMEOUT_S=str(BACKEND_TIMEOUT_S),
               VLLM_MODEL_SWITCHING_API_READY_TIMEOUT_S="1")
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api", env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     timeout=CLIENT_TIMEOUT_S) as client:
            for _ in range(300):
                assert process.returncode is None, log.read_text()
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the API did not start:\n{log.read_text()}")
            yield client
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


@contextmanager
def temporal_server(port: int, root: Path) -> Iterator[None]:
    process = subprocess.Popen(
        [installed_binary("temporal"), "server", "start-dev", "--headless", "--ip",
         "127.0.0.1", "--port", str(port), "--ui-port", str(free_port()), "--http-port",
         str(free_port()), "--metrics-port", str(free_port()), "--log-level", "error",
         "--db-filename", str(root / "temporal.db")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.terminate()
        process.wait(30)


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 60) -> dict:
    for _ in range(int(timeout_s * 5)):
        ready = await client.get("/readyz")
        if ready.status_code == 200:
            return ready.json()
        await asyncio.sleep(0.2)
    raise AssertionError(f"never ready: {ready.json()}")


async def test_the_api_starts_without_temporal_and_connects_when_it_comes(
        tmp_path: Path, new_database: Callable[[Path], str]) -> None:
    url = new_database(tmp_path)
    await upgrade_async(url)
    temporal_port = free_port()
    async with api_process(url, f"127.0.0.1:{temporal_port}", tmp_path / "api.log") as api:
        ready = await api.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "not_ready",
                                "checks": {"store": "ok", "temporal": "failed"}}
        # The store's part works; what needs Temporal is a 503 saying so, nothing is made.
        assert (await api.post("/models", json=REGISTER)).status_code == 201
        switch = {"model_id": "Outage_s", "target_version": "v1", "strategy": "immediate"}
        refused = await api.post("/switch", json=switch)
        assert refused.status_code == 503, refused.text
        assert "Temporal is not available" in refused.json()["detail"]
        assert (await api.get("/switch/operations")).json() == []
        with temporal_server(temporal_port, tmp_path):
            assert await wait_ready(api) == {"status": "ready",
                                             "checks": {"store": "ok", "temporal": "ok"}}
            accepted = await api.post("/switch", json=switch)
            assert accepted.status_code == 202, accepted.text
        # Temporal gone again, the client connected: a 503 within its retry bound.
        while (await api.get("/readyz")).status_code == 200:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        again = await api.get(f"/switch/operations/{accepted.json()['operation_id']}")
        # The record answers for a workflow Temporal cannot be asked about.
        assert again.status_code == 200 and again.json()["status"] == "pending"
        assert (await api.post("/switch/operations/"
                               f"{accepted.json()['operation_id']}/pause",
                               json={})).status_code == 503


@asynccontextmanager
async def store_outage(store_kind: str, tmp_path: Path
                       ) -> AsyncIterator[tuple[str, Callable[[], object],
                                                Callable[[], object]]]:
    """(database URL, stop, restart): a PostgreSQL server of this test's own, or a SQLite
    file another process locks (root ignores file modes, so a lock is how a SQLite store
    stops answering here)."""
    if store_kind == "postgresql":
        server = await asyncio.to_thread(start_postgres)
        try:
            yield server.create_database(), server.pause, server.resume
        finally:
            server.stop()
        return
    path = tmp_path / "turnout.db"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        connection = sqlite3.connect(path, isolation_level=None, timeout=10)
        connection.execute("BEGIN EXCLUSIVE")
        holder.append(connection)

    def unlock() -> None:
        holder.pop().execute("ROLLBACK")

    yield f"sqlite+aiosqlite:///{path}", lock, unlock


async def test_a_store_outage_is_a_503_naming_the_store_then_it_answers_again(
        tmp_path: Path, store_kind: str) -> None:
    async with store_outage(store_kind, tmp_path) as (url, stop, restart):
        await upgrade_async(url)
        async with api_process(url, f"127.0.0.1:{free_port()}", tmp_path / "api.log") as api:
            assert (await api.post("/models", json=REGISTER)).status_code == 201
            stop()
            try:
                failed = await api.post("/models", json={**REGISTER, "version": "v2"})
                assert failed.status_code == 503, failed.text
                assert failed.json() == {"detail": "the store is not available; try again "
                                                   "shortly"}
                if store_kind == "postgresql":  # SQLite still reads while it is locked
                    assert (await api.get("/models")).status_code == 503
                    ready = (await api.get("/readyz")).json()
                    assert ready["checks"]["store"] in ("failed", "timeout")
            finally:
                restart()
            again = await api.post("/models", json={**REGISTER, "version": "v2"})
            assert again.status_code == 201, again.text
            models = (await api.get("/models")).json()
            assert [v["version"] for v in models[0]["versions"]] == ["v1", "v2"]
