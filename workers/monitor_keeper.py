"""Keeps one `MonitorWorkflow` running per registered model, next to the worker that runs
the monitors (the control worker, or `python -m workers.monitor` when
`VLLM_MODEL_SWITCHING_MONITOR_TASK_QUEUE` gives them a queue of their own).

Starting is idempotent (the workflow id is the model's, and an already running monitor is
kept), so several control workers may run this side by side, and a restarted one simply
finds the monitors still running in Temporal. A model registered later gets its monitor
within one `period_s`.
"""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.store import Store

log = logging.getLogger("turnout.worker.monitors")


async def start_monitor(client: Client, settings: ModelSwitchingConfig, model_id: str) -> None:
    await client.start_workflow(
        c.MONITOR_WORKFLOW, c.MonitorInput(model_id=model_id),
        id=c.monitor_workflow_id(model_id), task_queue=settings.resolved_monitor_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        static_summary=f"health monitor of {model_id}")


async def keep_monitors(client: Client, settings: ModelSwitchingConfig, store: Store,
                        stop: asyncio.Event, *, period_s: float = 10.0) -> None:
    """Until `stop`: make sure every registered model has its monitor."""
    if not settings.enable_health_monitoring:
        log.info("health monitoring is switched off; no monitors started")
        return
    started: set[str] = set()
    while not stop.is_set():
        try:
            # Model ids only: one query, however many models (their versions are not needed).
            for model_id in await store.live_versions():
                if model_id not in started:
                    await start_monitor(client, settings, model_id)
                    started.add(model_id)
                    log.info("monitoring %s every %g s", model_id,
                             settings.monitoring_interval_s)
        except Exception as exc:  # Temporal or the store briefly away: try again later.
            log.warning("could not make sure every model is monitored: %r", exc)
        try:
            await asyncio.wait_for(stop.wait(), timeout=period_s)
        except TimeoutError:
            pass
