"""A load beside a busy engine on a CPU host finishes, on cores of its own.

Real vLLM CPU engines on the project's tiny models, started by the real `EngineActivities`
with a real SQLite store. Measured before the cores were partitioned (2 cores, one client
sending requests to the live engine without pause): the second engine was not ready after
5 minutes; 20 s after the client stopped, it was.

Two engine starts: run this module alone on a small machine.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import psutil
import pytest
from temporalio.testing import ActivityEnvironment

from activities.engines import EngineActivities
from turnout.config import ModelSwitchingConfig
from turnout.contracts import LoadVersionInput, UnloadVersionInput
from turnout.cpu_cores import format_cpu_list
from turnout.domain import EngineInfo, RegisterModelRequest
from turnout.store import Store

pytest.importorskip("vllm")
pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="a core partition needs at least 2 cores")

MODEL_ID = "TinyLlama_chat"
HOST = "cpuhost"
READY_BOUND_S = 180.0


@pytest.fixture
def store(engine_store: Store) -> Store:
    return engine_store


@pytest.fixture
def settings(tmp_path: Path, tiny_models: dict[str, Path]) -> ModelSwitchingConfig:
    return ModelSwitchingConfig(state_dir=str(tmp_path / "state"), engine_host=HOST,
                                model_roots=sorted({str(p.parent) for p in tiny_models.values()}),
                                engine_port_start=8250, engine_port_end=8299,
                                engine_startup_timeout_s=600, engine_kv_cache_gib=1)


def _process_cpus(pid: int) -> set[int]:
    """Every core any thread of a process may run on, as the kernel says."""
    cores: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                for part in line.split(":", 1)[1].strip().split(","):
                    low, _, high = part.partition("-")
                    cores.update(range(int(low), int(high or low) + 1))
    return cores


def _engine_processes(engine: EngineInfo) -> dict[str, set[int]]:
    """`{"<pid> <name>": cores}` for the API server and every process it started."""
    root = psutil.Process(engine.pid)
    return {f"{p.pid} {p.name()}": _process_cpus(p.pid)
            for p in [root, *root.children(recursive=True)]}


async def _client_loop(engine: EngineInfo, counts: dict[str, int],
                       stop: asyncio.Event) -> None:
    """One client sending completions to `engine` without pause."""
    body = {"model": engine.served_model_name, "prompt": "hello there", "max_tokens": 16}
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            try:
                resp = await client.post(f"{engine.url}/v1/completions", json=body)
                counts["ok" if resp.status_code == 200 else "failed"] += 1
            except httpx.HTTPError:
                counts["failed"] += 1


async def test_a_load_beside_a_busy_engine_finishes_on_cores_of_its_own(
        store: Store, settings: ModelSwitchingConfig,
        tiny_models: dict[str, Path]) -> None:
    for version, model in (("v1", tiny_models["tiny-v1"]), ("v2", tiny_models["tiny-v2"])):
        await store.register_version(RegisterModelRequest(
            model=str(model), model_arch="TinyLlama", model_stage="chat", version=version))
    acts = EngineActivities(settings, store)
    a = (await ActivityEnvironment().run(acts.load_version, LoadVersionInput(
        model_id=MODEL_ID, version="v1"))).engine
    await store.set_live_version(MODEL_ID, "v1")  # A serves: a load must keep off its cores

    counts = {"ok": 0, "failed": 0}
    stop = asyncio.Event()
    client = asyncio.create_task(_client_loop(a, counts, stop))
    try:
        while counts["ok"] < 3:  # A is busy
            assert not client.done()
            await asyncio.sleep(0.1)
        served_before = counts["ok"]
        started = time.monotonic()
        b = (await ActivityEnvironment().run(acts.load_version, LoadVersionInput(
            model_id=MODEL_ID, version="v2"))).engine
        ready_s = time.monotonic() - started
        served_during = counts["ok"] - served_before
        cpus_a, cpus_b = _engine_processes(a), _engine_processes(b)
    finally:
        stop.set()
        await client
    print(f"\nB ready beside busy A in {ready_s:.1f} s (incl. warm-up); A served "
          f"{served_during} requests meanwhile, {counts['failed']} failed")
    print(f"A: {cpus_a}\nB: {cpus_b}")

    assert ready_s < READY_BOUND_S
    assert served_during > 0 and counts["failed"] == 0  # A kept serving throughout
    # Every process of each engine — API server, EngineCore, Worker — on its own cores.
    for processes in (cpus_a, cpus_b):
        names = " ".join(processes)
        assert "VLLM::EngineCore" in names and "VLLM::Worker" in names, names
        assert all(processes.values()), processes
    union_a = set().union(*cpus_a.values())
    union_b = set().union(*cpus_b.values())
    assert union_a.isdisjoint(union_b), (cpus_a, cpus_b)
    # The cores are recorded where an operator looks: the engine's log.
    log_b = Path(b.log_path or "").read_text()
    assert f"turnout starts on cpus {format_cpu_list(union_b)}:" in log_b

    for version in ("v2", "v1"):
        await ActivityEnvironment().run(acts.unload_version, UnloadVersionInput(
            model_id=MODEL_ID, version=version))
    assert await store.list_engines() == []
