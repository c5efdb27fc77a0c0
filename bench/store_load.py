"""Store load: route writes per second and `GET /switch/operations/{id}` p95, SQLite
versus PostgreSQL, measured side by side in one run.

Per store (a fresh SQLite file; a fresh database on a real PostgreSQL server started from
the installed binaries, `tests/postgres.py`), N models with two versions each and N
canaries' worth of the writes a switch makes, all at once: each canary creates its
operation record, then per step writes its route (`Store.update_route`, with a change
key, as `set_traffic` does: the database raises the generation) and its record's status
(as `record_operation` does), and finishes its record. Meanwhile readers poll `GET
/switch/operations/{id}` of those operations over real HTTP, on the real API (each read
asks Temporal, a dev server here, for the switch's status, then reads the record).

    python -m bench.store_load [--canaries 200] [--steps 10] [--readers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from tests.integration.plane import serve_api
from tests.postgres import start_postgres
from tests.support import free_port
from turnout.config import ModelSwitchingConfig
from turnout.domain import (
    Backend,
    OperationRecord,
    OperationStatus,
    Outcome,
    RegisterModelRequest,
    Route,
    SwitchingStrategyType,
)
from turnout.runtime import installed_binary
from turnout.store import Store, upgrade_async


@dataclass
class Figures:
    store: str
    route_writes: int
    write_seconds: float
    reads: int
    read_p50_ms: float
    read_p95_ms: float
    read_errors: int

    @property
    def writes_per_s(self) -> float:
        return self.route_writes / self.write_seconds


def record(model_id: str, operation_id: str) -> OperationRecord:
    return OperationRecord(
        operation_id=operation_id, workflow_id=f"switch-{model_id}", model_id=model_id,
        target_version="v2", strategy=SwitchingStrategyType.CANARY,
        status=OperationStatus.RUNNING, requested_by="bench")


async def canary(store: Store, model_id: str, operation_id: str, steps: int) -> None:
    """The store writes of one canary switch, as its activities make them."""
    await store.create_operation(record(model_id, operation_id))  # once: a no-op here
    for step in range(1, steps + 1):
        share = round(100 * step / steps, 2)

        def shift(_current: Route | None, share: float = share) -> list[Backend]:
            backends = [Backend(version="v2", weight=share, url="http://127.0.0.1:1",
                                served_model_name="v2")]
            if share < 100:
                backends.append(Backend(version="v1", weight=round(100 - share, 2),
                                        url="http://127.0.0.1:2", served_model_name="v1"))
            return backends

        await store.update_route(model_id, shift, f"{operation_id}/step-{step}")
        await store.set_operation_status(operation_id, OperationStatus.RUNNING)
    await store.finish_operation(operation_id, OperationStatus.COMPLETED, Outcome.PROMOTED,
                                 None)


async def reader(api_url: str, operations: list[str], latencies: list[float],
                 errors: list[int], stop: asyncio.Event, offset: int) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as client:
        i = offset
        while not stop.is_set():
            started = time.perf_counter()
            answer = await client.get(f"/switch/operations/{operations[i % len(operations)]}")
            latencies.append(time.perf_counter() - started)
            if answer.status_code != 200:
                errors.append(answer.status_code)
            i += 1


async def measure(name: str, url: str, root: Path, temporal: WorkflowEnvironment,
                  canaries: int, steps: int, readers: int) -> Figures:
    await upgrade_async(url)
    store = Store.from_url(url)
    models = [f"bench_{i}" for i in range(canaries)]
    for model in models:
        for version in ("v1", "v2"):
            await store.register_version(RegisterModelRequest(
                model=f"/models/{model}-{version}", model_arch="bench",
                model_stage=model.split("_")[1], version=version))
    operations = [uuid.uuid4().hex for _ in models]
    settings = ModelSwitchingConfig.from_env({}, database_url=url, state_dir=str(root),
                                             api_port=free_port())
    server, task = await serve_api(create_app(settings, store=store, temporal=temporal.client),
                                   settings.api_port)
    api_url = f"http://127.0.0.1:{settings.api_port}"
    latencies: list[float] = []
    errors: list[int] = []
    stop = asyncio.Event()
    try:
        # The records exist before the clock starts (a switch's API call makes them), so
        # every read finds one; the canaries then write their routes and statuses.
        for model, operation in zip(models, operations, strict=True):
            await store.create_operation(record(model, operation))
        polling = [asyncio.create_task(reader(api_url, operations, latencies, errors, stop,
                                              i * canaries // readers))
                   for i in range(readers)]
        started = time.perf_counter()
        await asyncio.gather(*(canary(store, m, o, steps)
                               for m, o in zip(models, operations, strict=True)))
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*polling)
    finally:
        server.should_exit = True
        await task
        await store.close()
    ms = sorted(x * 1000 for x in latencies)
    return Figures(name, canaries * steps, elapsed, len(ms), statistics.median(ms),
                   ms[int(0.95 * (len(ms) - 1))], len(errors))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--readers", type=int, default=8)
    args = parser.parse_args()
    postgres = start_postgres()
    temporal = await WorkflowEnvironment.start_local(
        dev_server_existing_path=installed_binary("temporal"),
        data_converter=pydantic_data_converter)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="turnout-bench-store-") as tmp:
            root = Path(tmp)
            results.append(await measure(
                "SQLite", f"sqlite+aiosqlite:///{root / 'turnout.db'}", root, temporal,
                args.canaries, args.steps, args.readers))
            results.append(await measure(
                "PostgreSQL", postgres.create_database("bench"), root, temporal,
                args.canaries, args.steps, args.readers))
    finally:
        await temporal.shutdown()
        postgres.stop()
    print(f"{args.canaries} concurrent canaries x {args.steps} steps "
          f"(route write + status write each), {args.readers} readers of "
          f"GET /switch/operations/{{id}}")
    print(f"{'store':<12}{'route writes/s':>16}{'GET p50 ms':>12}{'GET p95 ms':>12}"
          f"{'reads':>8}{'errors':>8}")
    for r in results:
        print(f"{r.store:<12}{r.writes_per_s:>16.0f}{r.read_p50_ms:>12.1f}"
              f"{r.read_p95_ms:>12.1f}{r.reads:>8}{r.read_errors:>8}")
    sqlite, pg = results
    print(f"PostgreSQL / SQLite: route writes/s x{pg.writes_per_s / sqlite.writes_per_s:.2f}, "
          f"GET p95 x{pg.read_p95_ms / sqlite.read_p95_ms:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
