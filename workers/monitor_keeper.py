"""Keeps one `MonitorWorkflow` running per registered model, next to the worker that runs
the monitors (the control worker, or `python -m workers.monitor` when
`VLLM_MODEL_SWITCHING_MONITOR_TASK_QUEUE` gives them a queue of their own).

Starting is idempotent (the workflow id is the model's, and an already running monitor is
kept), so several control workers may run this side by side, and a restarted one simply
finds the monitors still running in Temporal. A model registered later gets its monitor
within one `period_s`, and a monitor that ended is started again within one `period_s`.
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


async def start_monitor(client: Client, settings: ModelSwitchingConfig,
                        model_id: str) -> str | None:
    """Start the model's monitor, or find it running; the id of its run."""
    handle = await client.start_workflow(
        c.MONITOR_WORKFLOW,
        c.MonitorInput(model_id=model_id, interval_s=settings.monitoring_interval_s),
        id=c.monitor_workflow_id(model_id), task_queue=settings.resolved_monitor_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        static_summary=f"health monitor of {model_id}")
    return handle.result_run_id


async def keep_monitors(client: Client, settings: ModelSwitchingConfig, store: Store,
                        stop: asyncio.Event, *,
                        period_s: float = c.MONITOR_KEEPER_PERIOD_S) -> None:
    """Until `stop`: make sure every registered model's monitor runs, every `period_s`.

    A model registered since the last round gets its monitor; a monitor that ended (its
    workflow failed, was terminated, or stopped because monitoring was switched off and
    is on again) is started again, and that is logged. Which monitors run is one
    visibility query per round, however many models.
    """
    if not settings.enable_health_monitoring:
        log.info("health monitoring is switched off; no monitors started")
        return
    runs: dict[str, str | None] = {}  # model id -> the run of its monitor we know of
    while not stop.is_set():
        try:
            running = await running_monitors(client)
            # Model ids only: one query, however many models (their versions are not needed).
            for model_id in await store.live_versions():
                if c.monitor_workflow_id(model_id) in running:
                    continue
                # Not listed: new, ended, or just started and not yet visible (then the
                # start finds the same run running).
                run = await start_monitor(client, settings, model_id)
                if model_id not in runs:
                    log.info("monitoring %s every %g s", model_id,
                             settings.monitoring_interval_s)
                elif runs[model_id] != run:
                    log.warning("the monitor of %s had ended: started it again", model_id)
                runs[model_id] = run
        except Exception as exc:  # Temporal or the store briefly away: try again later.
            log.warning("could not make sure every model is monitored: %r", exc)
        try:
            await asyncio.wait_for(stop.wait(), timeout=period_s)
        except TimeoutError:
            pass


async def running_monitors(client: Client) -> set[str]:
    """Workflow ids of the monitors running now."""
    query = (f"WorkflowType = '{c.MONITOR_WORKFLOW}' AND ExecutionStatus = 'Running'")
    return {execution.id async for execution in client.list_workflows(query)}
