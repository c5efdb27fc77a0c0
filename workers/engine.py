"""Engine worker: one per serving host; starts and stops the vLLM servers of that host and
measures them every monitoring interval.

Run with `python -m workers.engine`. On start it re-adopts the engines it left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.worker import Worker

from activities.engines import EngineActivities
from activities.host import HostMembership
from activities.resources import ResourceActivities
from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.runtime import connect_temporal, setup_logging
from turnout.store import HostClaimed, Store
from turnout.tracing import setup_tracing, shutdown_tracing
from workers.common import HEARTBEAT_THROTTLE, stop_event, worker_interceptors

log = logging.getLogger("turnout.worker.engine")
# How often this host looks for engines that died.
WATCH_S = 2.0


def build_worker(client: Client, settings: ModelSwitchingConfig, engines: EngineActivities,
                 *, task_queue: str | None = None,
                 resources: ResourceActivities | None = None) -> Worker:
    resources = resources or ResourceActivities(settings, engines.store)
    return Worker(client, task_queue=task_queue or settings.engine_task_queue,
                  activities=[engines.load_version, engines.unload_version,
                              resources.measure_engines],
                  max_concurrent_activities=4, interceptors=worker_interceptors(),
                  max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
                  default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE)


async def keep_measuring(resources: ResourceActivities, settings: ModelSwitchingConfig,
                         stop: asyncio.Event) -> None:
    """Record this host's engine figures every monitoring interval until `stop` is set; the
    monitors judge memory, CPU and queues from the latest of them."""
    while not stop.is_set():
        if settings.enable_health_monitoring:
            try:
                await resources.record_host()
            except Exception:  # a store hiccup costs one interval's figures, not the loop
                log.exception("measuring the engines of %s failed", settings.engine_host)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.monitoring_interval_s)


async def keep_watching(engines: EngineActivities, client: Client,
                        settings: ModelSwitchingConfig, stop: asyncio.Event) -> None:
    """Every few seconds, put cached engines to sleep (on hosts with sleep mode) and look
    for loaded engines whose process died; have each replaced (or dropped from the cache)
    by a `ReplaceEngineWorkflow`."""
    while not stop.is_set():
        try:
            await engines.sleep_cached()
            for dead in await engines.find_dead():
                await client.start_workflow(
                    c.REPLACE_ENGINE_WORKFLOW, dead,
                    id=c.replace_engine_workflow_id(dead.slot.model_id, dead.slot.version,
                                                    dead.slot.host_id),
                    task_queue=settings.control_task_queue,
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                    static_summary=f"replace the dead engine of {dead.slot.version} of "
                                   f"{dead.slot.model_id} on {dead.slot.host_id}")
        except Exception:  # the store or Temporal away for a moment: look again soon
            log.exception("looking for dead engines on %s failed", settings.engine_host)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_S)


async def main() -> int:
    setup_logging(os.environ.get("TURNOUT_LOG_LEVEL", "INFO"))
    settings = ModelSwitchingConfig.from_env()
    setup_tracing("engine-worker")
    store = Store.from_url(settings.database_url)
    try:
        return await _serve(settings, store)
    finally:
        await store.close()
        shutdown_tracing()


async def _serve(settings: ModelSwitchingConfig, store: Store) -> int:
    # The host id first: a second worker on a live host's id must not touch its engines.
    membership = HostMembership(settings, store)
    try:
        await membership.claim()
    except HostClaimed as exc:
        log.error("%s", exc)
        return 2
    engines = EngineActivities(settings, store)
    adopted = await engines.readopt()
    log.info("re-adopted %d engine(s) on %s", len(adopted), settings.engine_host)
    client = await connect_temporal(settings)
    stop = stop_event()
    log.info("engine worker on task queue %s", settings.engine_task_queue)
    resources = ResourceActivities(settings, store)
    async with build_worker(client, settings, engines, resources=resources):
        measuring = asyncio.create_task(keep_measuring(resources, settings, stop))
        beating = asyncio.create_task(membership.keep(stop))
        watching = asyncio.create_task(keep_watching(engines, client, settings, stop))
        await asyncio.wait([asyncio.ensure_future(stop.wait()),
                            asyncio.ensure_future(membership.lost.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        await measuring
        await beating
        await watching
        log.info("engine worker stopping; engines keep running for re-adoption")
    return 3 if membership.lost.is_set() else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
