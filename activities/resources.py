"""Resource use of this host's engines, recorded in the store every monitoring interval.

Runs where the engines run, because only that host can read their processes. Memory and
CPU come from the process tree (vLLM serves from an API process plus an engine-core child,
so a parent-only figure would miss most of the model); queue length and KV-cache use come
from vLLM's own `/metrics` where the engine exports them. vLLM exports no GPU memory
figure of its own; its KV-cache use is the measure of how full a GPU engine is.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from temporalio import activity

from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.domain import EngineInfo, EngineState
from turnout.store import Store
from turnout.telemetry.health import EngineResources

log = logging.getLogger("turnout.resources")

# vLLM metric names (older releases used the gpu_ prefix for the KV cache on every device).
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def _rss_bytes(processes: list[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """Sum of each vLLM gauge over its label sets (one engine may report several)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:"):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


class ResourceActivities:
    def __init__(self, settings: ModelSwitchingConfig, store: Store) -> None:
        self.settings = settings
        self.store = store

    async def record_host(self, cpu_sample_s: float = c.CPU_SAMPLE_S) -> int:
        """Measure every engine of this host and keep the figures in the store, where the
        monitors read them; returns how many engines were measured.

        The engine worker calls this every monitoring interval: one measurement per host
        per interval, however many models the host serves (the monitor of each model
        used to ask the host itself, one activity per model and host per look).
        """
        engines = await self._local_engines()
        measured = await self._measure(engines, cpu_sample_s)
        await self.store.save_engine_resources(
            self.settings.engine_host,
            {(engine.model_id, engine.version): resources for engine, resources in measured})
        return len(measured)

    @activity.defn(name=c.MEASURE_ENGINES)
    async def measure_engines(self, input: c.MeasureEnginesInput) -> c.MeasureEnginesResult:
        """One model's engines on this host, for monitors whose run started before the
        hosts recorded their figures in the store (see `MonitorWorkflow`)."""
        result = c.MeasureEnginesResult()
        for engine, resources in await self._measure(
                await self._local_engines(input.model_id), input.cpu_sample_s):
            result.engines.setdefault(engine.version, []).append(
                resources.model_dump(mode="json"))
        return result

    async def _local_engines(self, model_id: str | None = None) -> list[EngineInfo]:
        return [e for e in await self.store.list_engines(
            model_id=model_id, host=self.settings.engine_host)
            if e.state is EngineState.READY and not e.external and e.pid]

    async def _measure(self, engines: list[EngineInfo], cpu_sample_s: float
                       ) -> list[tuple[EngineInfo, EngineResources]]:
        trees: dict[int, list[psutil.Process]] = {}
        for engine in engines:
            try:
                trees[engine.pid or 0] = _tree(engine.pid or 0)
            except psutil.Error as exc:
                log.warning("engine %s %s (pid %s) not measurable: %r",
                            engine.model_id, engine.version, engine.pid, exc)
        before = {pid: _cpu_seconds(tree) for pid, tree in trees.items()}
        sampled_from = time.monotonic()
        await asyncio.sleep(cpu_sample_s)
        # The real interval: on a busy host the sleep overruns, and dividing by the asked-for
        # interval would report more CPU than the host has.
        elapsed = max(time.monotonic() - sampled_from, 1e-3)
        cores = psutil.cpu_count() or 1
        host_memory = psutil.virtual_memory().total
        measured = []
        async with httpx.AsyncClient(timeout=5) as client:
            for engine in engines:
                tree = trees.get(engine.pid or 0)
                if tree is None:
                    continue
                used = _cpu_seconds(tree) - before[engine.pid or 0]
                rss = _rss_bytes(tree)
                resources = EngineResources(
                    host=engine.host, url=engine.url, memory_mb=rss / 2**20,
                    memory_percent=100.0 * rss / host_memory,
                    cpu_percent=min(100.0, max(0.0, 100.0 * used / (elapsed * cores))))
                await self._add_vllm_figures(client, engine, resources)
                measured.append((engine, resources))
        return measured

    async def _add_vllm_figures(self, client: httpx.AsyncClient, engine: EngineInfo,
                                resources: EngineResources) -> None:
        try:
            response = await client.get(f"{engine.url}/metrics")
            response.raise_for_status()
            metrics = parse_vllm_metrics(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("vLLM metrics of %s unreadable: %r", engine.url, exc)
            return
        resources.running_requests = metrics.get(_RUNNING)
        resources.queued_requests = metrics.get(_WAITING)
        resources.kv_cache_usage = next((metrics[name] for name in _KV_CACHE
                                         if name in metrics), None)
