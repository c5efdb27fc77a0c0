"""Each engine host records its engines' figures in the store; the monitors read them.

A real process stands in for the engine: `python -m http.server` serving a `metrics` file
in vLLM's Prometheus text format, measured through psutil and real HTTP, into a real
SQLite store."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from activities.resources import ResourceActivities
from tests.integration.stores import TINY_MODEL, tiny_store
from tests.support import free_port
from turnout.config import ModelSwitchingConfig
from turnout.domain import EngineInfo, EngineState

pytestmark = pytest.mark.asyncio(loop_scope="session")

HOST = "resources-test-host"
METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="tiny"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="tiny"} 3.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="tiny"} 0.25
"""


@pytest.fixture
def engine_process(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """(pid, url) of a process answering `/metrics` like a vLLM server."""
    (tmp_path / "metrics").write_text(METRICS)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                                "127.0.0.1", "--directory", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/metrics").raise_for_status()
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield process.pid, url
    process.kill()
    process.wait()


async def test_a_host_records_its_engines_and_forgets_those_gone(
        tmp_path: Path, engine_process: tuple[int, str]) -> None:
    pid, url = engine_process
    _, store = await tiny_store(tmp_path)
    settings = ModelSwitchingConfig.from_env({}, engine_host=HOST)
    try:
        await store.save_engine(EngineInfo(model_id=TINY_MODEL, version="v1", host=HOST,
                                           url=url, served_model_name="tiny", pid=pid,
                                           state=EngineState.READY))
        # Another host's engine and an external endpoint are not this host's to measure.
        await store.save_engine(EngineInfo(model_id=TINY_MODEL, version="v2", host="other",
                                           url=url, served_model_name="tiny", pid=pid,
                                           state=EngineState.READY))
        resources = ResourceActivities(settings, store)
        assert await resources.record_host(cpu_sample_s=0.1) == 1

        recent = datetime.now(UTC) - timedelta(minutes=1)
        found = await store.engine_resources(TINY_MODEL, recent)
        assert list(found) == ["v1"] and len(found["v1"]) == 1
        engine = found["v1"][0]
        assert engine.host == HOST and engine.url == url
        assert engine.memory_mb is not None and engine.memory_mb > 1
        assert engine.memory_percent is not None and 0 < engine.memory_percent < 100
        assert engine.cpu_percent is not None and 0 <= engine.cpu_percent <= 100
        assert (engine.running_requests, engine.queued_requests, engine.kv_cache_usage) \
            == (2.0, 3.0, 0.25)
        # A measurement older than asked for is not trusted.
        assert await store.engine_resources(
            TINY_MODEL, datetime.now(UTC) + timedelta(seconds=5)) == {}

        await store.delete_engine(TINY_MODEL, "v1", HOST)
        assert await resources.record_host(cpu_sample_s=0.1) == 0
        assert await store.engine_resources(TINY_MODEL, recent) == {}
    finally:
        await store.close()
