"""Monitor worker: the health monitors on a task queue of their own.

Run with `python -m workers.monitor` once `VLLM_MODEL_SWITCHING_MONITOR_TASK_QUEUE` is set
(the control worker then leaves the monitors to it). Useful with many models: every model's
look then runs here, and a burst of looks never delays a rollout's step on the control
worker. Several monitor workers may share the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from temporalio.client import Client
from temporalio.worker import Worker

from activities.gateway_admin import GatewayAdmin
from activities.health_looks import HealthLookActivities
from turnout.config import ModelSwitchingConfig
from turnout.runtime import connect_temporal, setup_logging
from turnout.store import Store
from turnout.tracing import setup_tracing, shutdown_tracing
from workers.common import stop_event, worker_interceptors
from workers.monitor_keeper import keep_monitors
from workflows import MonitorWorkflow

log = logging.getLogger("turnout.worker.monitor")


def build_worker(client: Client, settings: ModelSwitchingConfig, store: Store,
                 admin: GatewayAdmin) -> Worker:
    monitor = HealthLookActivities(settings, store, admin)
    return Worker(client, task_queue=settings.resolved_monitor_task_queue,
                  workflows=[MonitorWorkflow],
                  activities=[monitor.list_engine_hosts, monitor.assess_health,
                              monitor.record_failed_look],
                  interceptors=worker_interceptors())


async def main() -> int:
    setup_logging(os.environ.get("TURNOUT_LOG_LEVEL", "INFO"))
    settings = ModelSwitchingConfig.from_env()
    if settings.monitors_on_control_worker:
        # On the control queue this worker would take switch tasks it cannot run.
        log.error("VLLM_MODEL_SWITCHING_MONITOR_TASK_QUEUE is not set (or is the control "
                  "queue): the control worker runs the monitors, no monitor worker needed")
        return 2
    setup_tracing("monitor-worker")
    store = Store.from_url(settings.database_url)
    admin = GatewayAdmin(settings.gateway_admin_token)
    client = await connect_temporal(settings)
    stop = stop_event()
    log.info("monitor worker on task queue %s", settings.resolved_monitor_task_queue)
    async with build_worker(client, settings, store, admin):
        await keep_monitors(client, settings, store, stop)
        await stop.wait()
        log.info("monitor worker stopping")
    await admin.close()
    await store.close()
    shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
