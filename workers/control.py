"""Control worker: runs the switch workflows and the activities that talk to store and gateways.

Run with `python -m workers.control`.
"""

from __future__ import annotations

import asyncio
import logging
import os

from temporalio.client import Client
from temporalio.worker import Worker

from activities.fleet import FleetActivities
from activities.gateway_admin import GatewayAdmin
from activities.health import HealthActivities
from activities.health_looks import HealthLookActivities
from activities.registry import RegistryActivities
from activities.traffic import TrafficActivities
from turnout.config import ModelSwitchingConfig
from turnout.runtime import connect_temporal, setup_logging
from turnout.store import Store
from turnout.tracing import setup_tracing, shutdown_tracing
from workers.common import HEARTBEAT_THROTTLE, stop_event, worker_interceptors
from workers.monitor_keeper import keep_monitors
from workflows import WORKFLOWS

log = logging.getLogger("turnout.worker.control")


def build_worker(client: Client, settings: ModelSwitchingConfig, store: Store,
                 admin: GatewayAdmin, *, task_queue: str | None = None,
                 health: HealthActivities | None = None,
                 fleet: FleetActivities | None = None) -> Worker:
    """`health` and `fleet` are made here unless given; whoever makes them closes them."""
    registry = RegistryActivities(store)
    traffic = TrafficActivities(settings, store, admin)
    health = health or HealthActivities(store, settings=settings, admin=admin)
    monitor = HealthLookActivities(settings, store, admin)
    fleet = fleet or FleetActivities(settings, store)
    return Worker(
        client, task_queue=task_queue or settings.control_task_queue, workflows=WORKFLOWS,
        activities=[registry.describe_model, registry.mark_live, registry.record_operation,
                    registry.raise_alert, traffic.set_traffic, traffic.set_mirror,
                    traffic.drain_version, health.check_health, health.judge_health,
                    monitor.list_engine_hosts, monitor.assess_health,
                    monitor.record_failed_look, fleet.place_version,
                    fleet.release_version, fleet.retire_version, traffic.refresh_route,
                    registry.resolve_alert],
        interceptors=worker_interceptors(),
        max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
        default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE)


async def main() -> None:
    setup_logging(os.environ.get("TURNOUT_LOG_LEVEL", "INFO"))
    settings = ModelSwitchingConfig.from_env()
    setup_tracing("control-worker")
    store = Store.from_url(settings.database_url)
    admin = GatewayAdmin(settings.gateway_admin_token)
    client = await connect_temporal(settings)
    health = HealthActivities(store, settings=settings, admin=admin)
    fleet = FleetActivities(settings, store)
    worker = build_worker(client, settings, store, admin, health=health, fleet=fleet)
    stop = stop_event()
    log.info("control worker on task queue %s", settings.control_task_queue)
    async with worker:
        # Monitors on a queue of their own are kept by their worker (`workers.monitor`).
        # This worker still runs MonitorWorkflow for those started on its queue before.
        if settings.monitors_on_control_worker:
            await keep_monitors(client, settings, store, stop)
        await stop.wait()
        log.info("control worker stopping")
    await health.close()
    await fleet.close()
    await admin.close()
    await store.close()
    shutdown_tracing()


if __name__ == "__main__":
    asyncio.run(main())
