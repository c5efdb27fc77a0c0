"""An engine host's claim on its id, on a real store (SQLite and PostgreSQL): the real
engine worker refuses to start on the id of a live host, naming it, and a restarted worker
takes its own over."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from activities.host import HostMembership, detect_capacity
from turnout.config import ModelSwitchingConfig
from turnout.fleet import GIB, GpuDevice
from turnout.store import HostClaimed, Store, upgrade_async

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]


@pytest.fixture
def database_url(tmp_path: Path, new_database: Callable[[Path], str]) -> str:
    return new_database(tmp_path)


async def _settings(tmp_path: Path, state: str, url: str,
                    **overrides: object) -> ModelSwitchingConfig:
    await upgrade_async(url)
    return ModelSwitchingConfig.from_env({}, database_url=url, engine_host="gpu-7",
                                         state_dir=str(tmp_path / state), **overrides)


async def test_a_second_worker_on_a_live_host_id_exits_naming_it(tmp_path: Path,
                                                                 database_url: str) -> None:
    settings = await _settings(tmp_path, "first", database_url)
    store = Store.from_url(settings.database_url)
    try:
        await HostMembership(settings, store).claim()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("VLLM_MODEL_SWITCHING_")}
        env.update(VLLM_MODEL_SWITCHING_DATABASE_URL=settings.database_url,
                   VLLM_MODEL_SWITCHING_ENGINE_HOST="gpu-7",
                   VLLM_MODEL_SWITCHING_STATE_DIR=str(tmp_path / "second"),
                   # Nothing listens here: the worker must stop before it needs Temporal.
                   VLLM_MODEL_SWITCHING_TEMPORAL_ADDRESS="127.0.0.1:1")
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers.engine", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(worker.communicate(), 60)
    finally:
        await store.close()
    assert worker.returncode == 2, out.decode()
    assert "engine host id 'gpu-7' is held by another live engine worker" in out.decode()


async def test_a_restarted_worker_takes_its_own_claim_over(tmp_path: Path,
                                                           database_url: str) -> None:
    settings = await _settings(tmp_path, "state", database_url)
    store = Store.from_url(settings.database_url)
    try:
        first = HostMembership(settings, store)
        claimed = await first.claim()
        # The same state dir while the first still holds its lock: a second process here.
        with pytest.raises(HostClaimed, match="a worker on this machine"):
            await HostMembership(settings, store).claim()
        assert first._lock_file is not None
        first._lock_file.close()  # the first process has exited
        again = await HostMembership(settings, store).claim()
        assert again.instance_id == claimed.instance_id
    finally:
        await store.close()


async def test_capacity_of_a_cpu_host_and_of_a_gpu_host(tmp_path: Path,
                                                        database_url: str) -> None:
    settings = await _settings(tmp_path, "s", database_url, engine_memory_fraction=0.5,
                               engine_kv_cache_gib=1, engine_overhead_gib=2,
                               max_cached_models=3)
    cpu = detect_capacity(settings, gpus=[])
    assert cpu.memory_bytes == int(psutil.virtual_memory().total * 0.5)
    assert cpu.engine_extra_bytes == 3 * GIB and cpu.max_cached_models == 3
    assert not cpu.sleep_mode and cpu.cpu_count >= 1
    assert cpu.ports == settings.engine_port_end - settings.engine_port_start + 1
    gpus = [GpuDevice(index=i, name="fake", memory_bytes=80 * GIB) for i in range(2)]
    gpu = detect_capacity(settings, gpus=gpus)
    assert gpu.memory_bytes == 80 * GIB and not gpu.sleep_mode  # sleep mode is opt-in
    asleep = detect_capacity(settings.model_copy(update={"engine_sleep_mode": True}),
                             gpus=gpus)
    assert asleep.sleep_mode
    cpu_asked = detect_capacity(settings.model_copy(update={"engine_sleep_mode": True}),
                                gpus=[])
    assert not cpu_asked.sleep_mode  # vLLM refuses sleep mode on the CPU
    fixed = detect_capacity(settings.model_copy(update={"engine_memory_gib": 12}), gpus=[])
    assert fixed.memory_bytes == 12 * GIB
