"""This engine host in the fleet: what it offers, and its claim on its host id.

The engine worker records its capacity when it starts and heartbeats while it runs;
placement (`turnout.fleet.place`) reads both from the store. A second worker that claims
the host id of a live one is refused (`HostClaimed`), so two workers never manage the
same engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import psutil

from turnout.config import ModelSwitchingConfig
from turnout.fleet import GIB, EngineHost, GpuDevice, HostCapacity
from turnout.store import HostClaimed, Store

log = logging.getLogger("turnout.host")

HEARTBEAT_S = 5.0


def cuda_devices() -> list[GpuDevice]:
    """The CUDA devices torch sees here; none on a CPU-only host (or without torch).

    Importing torch takes seconds: hosts without NVIDIA's driver are known CPU-only
    without it."""
    if not Path("/proc/driver/nvidia/gpus").is_dir() and not shutil.which("nvidia-smi"):
        return []
    try:
        import torch
    except ImportError:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        return [GpuDevice(index=i, name=torch.cuda.get_device_name(i),
                          memory_bytes=torch.cuda.get_device_properties(i).total_memory)
                for i in range(torch.cuda.device_count())]
    except Exception as exc:  # a broken driver is a CPU host as far as placement goes
        log.warning("CUDA devices not readable, treating this host as CPU-only: %r", exc)
        return []


def detect_capacity(settings: ModelSwitchingConfig,
                    gpus: list[GpuDevice] | None = None) -> HostCapacity:
    """What this host offers engines.

    On CUDA hosts engines fill GPU memory, and with `engine_sleep_mode` vLLM's sleep mode
    frees it for cached engines; elsewhere they fill host memory and stay awake (vLLM
    refuses sleep mode on the CPU). `engine_memory_gib` overrides the measured size.
    """
    gpus = cuda_devices() if gpus is None else gpus
    total = sum(g.memory_bytes for g in gpus) if gpus else psutil.virtual_memory().total
    memory = int(settings.engine_memory_gib * GIB) if settings.engine_memory_gib \
        else int(total * settings.engine_memory_fraction)
    extra = int((settings.engine_kv_cache_gib + settings.engine_overhead_gib) * GIB)
    return HostCapacity(memory_bytes=memory, engine_extra_bytes=extra, gpus=gpus,
                        max_cached_models=settings.max_cached_models,
                        port_start=settings.engine_port_start,
                        port_end=settings.engine_port_end,
                        cpu_count=len(os.sched_getaffinity(0)),
                        sleep_mode=bool(gpus) and settings.engine_sleep_mode)


class HostMembership:
    """This worker's claim on its host id: claimed at start and kept by heartbeats.

    The instance id lives in the state dir, under a file lock: a worker restarted on the
    same host takes its predecessor's claim over at once (its engines are the ones it
    re-adopts), while a second worker — on this machine (the lock) or another one (the
    store) — is refused while the first is alive.
    """

    def __init__(self, settings: ModelSwitchingConfig, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.instance_id = ""
        self.lost = asyncio.Event()
        self._lock_file: IO[str] | None = None

    def _instance(self) -> str:
        s = self.settings
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", s.engine_host)
        path = Path(s.state_dir).expanduser() / f"engine-host-{safe}.instance"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise HostClaimed(s.engine_host, f"a worker on this machine ({path})",
                              datetime.now(UTC)) from None
        lock.seek(0)
        instance = lock.read().strip() or uuid.uuid4().hex
        lock.seek(0)
        lock.truncate()
        lock.write(instance + "\n")
        lock.flush()
        self._lock_file = lock  # held until this process exits
        return instance

    async def claim(self, capacity: HostCapacity | None = None) -> EngineHost:
        """Raises `HostClaimed` (its message names the host id) when a live worker has it."""
        s = self.settings
        self.instance_id = self._instance()
        host = EngineHost(host_id=s.engine_host, task_queue=s.engine_task_queue,
                          instance_id=self.instance_id,
                          capacity=capacity or await asyncio.to_thread(detect_capacity, s))
        claimed = await self.store.claim_host(host, live_after_s=s.engine_host_live_after_s)
        c = claimed.capacity
        log.info("engine host %s: %.1f GiB for engines (%.1f GiB each beside weights), "
                 "%d cached at most, ports %d-%d, %s", claimed.host_id, c.memory_bytes / GIB,
                 c.engine_extra_bytes / GIB, c.max_cached_models, c.port_start, c.port_end,
                 f"{len(c.gpus)} GPU(s), sleep mode" if c.gpus else f"{c.cpu_count} CPU(s)")
        return claimed

    async def keep(self, stop: asyncio.Event) -> None:
        """Heartbeat until `stop`; sets `lost` and returns if another worker took the id."""
        while not stop.is_set():
            try:
                if not await self.store.heartbeat_host(self.settings.engine_host,
                                                       self.instance_id):
                    log.error("engine host id %s was claimed by another worker; stopping",
                              self.settings.engine_host)
                    self.lost.set()
                    return
            except Exception as exc:  # the store away for a moment: try at the next beat
                log.warning("heartbeat of engine host %s failed: %r",
                            self.settings.engine_host, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_S)
