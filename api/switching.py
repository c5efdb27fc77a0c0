"""Starting switches and reading their state: shared by the switch router's endpoints."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import timedelta
from functools import partial

from fastapi import HTTPException
from pydantic import BaseModel, Field
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api import records
from api.errors import ActiveSwitchConflict
from turnout.config import ModelSwitchingConfig
from turnout.contracts import STATUS_QUERY, SWITCH_WORKFLOW
from turnout.domain import (
    AuditEntry,
    HealthThresholds,
    OperationRecord,
    OperationStatus,
    SwitchInput,
    SwitchRequest,
    SwitchStatus,
)
from turnout.store import NotFound, Store
from turnout.strategies import (
    StrategyConfigError,
    first_version_problem,
    planned_looks,
    validate_strategy_config,
)

log = logging.getLogger("turnout.api.switch")
_QUERY_TIMEOUT = timedelta(seconds=5)
# How long a switch that has reported its end may take to close its run.
# A busy worker (engines saturating the CPU) has taken over 10 s to close a finished run.
_CLOSE_WAIT_S = 60.0


class FieldError(BaseModel):
    field: str
    message: str
    status_code: int = 422


class Validation(BaseModel):
    """The guide's `validate_switch_request` result."""

    valid: bool
    errors: list[str] = Field(default_factory=list)
    fields: list[FieldError] = Field(default_factory=list)


class SwitchAccepted(BaseModel):
    operation_id: str
    workflow_id: str
    status: OperationStatus = OperationStatus.PENDING
    success: bool = True
    message: str
    # False: the switch has started but the store did not answer the API; the operation's
    # record appears once it does (the switch writes it), the API's audit entry follows.
    recorded: bool = True


class OperationView(SwitchStatus):
    """`GET /switch/operations/{id}`: the workflow's status plus where to find it."""

    workflow_id: str | None = None
    success: bool = False


def workflow_id_for(model_id: str) -> str:
    """One active switch per model: the workflow id is derived from the model."""
    return f"switch-{model_id}"


async def check_switch(store: Store, request: SwitchRequest) -> list[FieldError]:
    """Everything wrong with a switch request that can be known before starting it."""
    try:
        model = await store.get_model(request.model_id)
    except NotFound as exc:
        return [FieldError(field="model_id", message=str(exc), status_code=404)]
    errors: list[FieldError] = []
    if model.version(request.target_version) is None:
        errors.append(FieldError(
            field="target_version", status_code=404,
            message=f"version {request.target_version!r} of {model.model_id!r} is not registered"))
    try:
        validate_strategy_config(request.strategy, request.strategy_config)
    except StrategyConfigError as exc:
        errors += [FieldError(field=".".join(map(str, e["loc"])), message=e["msg"])
                   for e in exc.errors]
    problem = first_version_problem(request.strategy, model.live_version)
    if problem:
        errors.append(FieldError(field="strategy", status_code=409,
                                 message=f"{model.model_id!r} {problem}"))
    if model.live_version is not None and model.live_version == request.target_version:
        errors.append(FieldError(field="target_version", status_code=409,
                                 message=f"{request.target_version!r} is already live"))
    target = model.version(request.target_version)
    if target is not None and not target.config.endpoint:
        replicas = request.replicas or target.config.replicas
        hosts = len(await store.list_hosts())
        if replicas > max(1, hosts):
            errors.append(FieldError(
                field="replicas", message=f"{replicas} replicas need {replicas} engine hosts "
                                          f"(one engine per host); the fleet has {hosts}"))
    return errors


async def validate(store: Store, request: SwitchRequest) -> Validation:
    errors = await check_switch(store, request)
    active = await store.list_operations(model_id=request.model_id, limit=20)
    running = next((op for op in active if not op.status.terminal), None)
    if running is not None:
        errors.append(FieldError(field="model_id", status_code=409,
                                 message=f"a switch of {request.model_id} is already active: "
                                         f"operation {running.operation_id}"))
    return Validation(valid=not errors, errors=[f"{e.field}: {e.message}" for e in errors],
                      fields=errors)


def switch_thresholds(settings: ModelSwitchingConfig, request: SwitchRequest
                      ) -> HealthThresholds:
    """Thresholds of one switch: the settings, the request's `analysis` over them, and the
    number of looks its plan takes (so the rollout as a whole keeps its confidence)."""
    thresholds = HealthThresholds(error_rate_max=settings.error_rate_warning,
                                  latency_p95_ms_max=settings.latency_warning_ms,
                                  latency_tolerance=settings.latency_tolerance,
                                  latency_tolerance_ms=settings.latency_tolerance_ms,
                                  min_requests=settings.min_requests,
                                  warmup_requests=settings.warmup_requests,
                                  warmup_seconds=settings.warmup_seconds)
    if request.analysis is not None:
        thresholds = request.analysis.apply(thresholds)
    return thresholds.model_copy(update={
        "looks": planned_looks(request.strategy, request.strategy_config)})


async def start_switch(client: Client, store: Store, settings: ModelSwitchingConfig,
                       request: SwitchRequest, actor: str) -> SwitchAccepted:
    """Validate, start `SwitchWorkflow`, and record the operation.

    `actor` (the caller's key name) is who the workflow and the audit log record as having
    requested the switch; the body's `requested_by` is only a note kept in the audit
    entry's details."""
    errors = await check_switch(store, request)
    if errors:
        worst = min(errors, key=lambda e: {404: 0, 422: 1, 409: 2}.get(e.status_code, 3))
        if worst.status_code == 422:
            raise StrategyConfigError([{"loc": tuple(e.field.split(".")), "msg": e.message,
                                        "type": "value_error"}
                                       for e in errors if e.status_code == 422])
        raise HTTPException(worst.status_code, f"{worst.field}: {worst.message}")

    operation_id = uuid.uuid4().hex
    workflow_id = workflow_id_for(request.model_id)
    switch_input = SwitchInput(
        operation_id=operation_id, model_id=request.model_id,
        target_version=request.target_version, strategy=request.strategy,
        strategy_config=request.strategy_config, engine_task_queue=settings.engine_task_queue,
        requested_by=actor, reason=request.reason,
        thresholds=switch_thresholds(settings, request), replicas=request.replicas)
    for attempt in range(2):
        try:
            handle = await client.start_workflow(
                SWITCH_WORKFLOW, switch_input, id=workflow_id,
                task_queue=settings.control_task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                memo={"requested_by": actor, "note": request.requested_by,
                      "reason": request.reason},
                static_summary=f"{request.strategy.value} switch of {request.model_id} "
                               f"to {request.target_version}")
            break
        except WorkflowAlreadyStartedError:
            running = client.get_workflow_handle(workflow_id)
            status = await query_status(running)
            # A switch that has reported its end may still be closing its run: wait for it.
            if attempt == 0 and status is not None and status.status.terminal:
                await wait_closed(running)
                continue
            raise ActiveSwitchConflict(request.model_id,
                                       status.operation_id if status else None) from None
    record = OperationRecord(
        operation_id=operation_id, workflow_id=workflow_id, run_id=handle.first_execution_run_id,
        model_id=request.model_id, target_version=request.target_version,
        strategy=request.strategy, strategy_config=request.strategy_config,
        requested_by=actor)
    entry = AuditEntry(actor=actor, action="switch_requested", model_id=request.model_id,
                       operation_id=operation_id, details=request.model_dump(mode="json"))
    message = f"{request.strategy.value} switch of {request.model_id} to " \
              f"{request.target_version} started"
    # The switch is under way whatever the store does now: the answer says so.
    recorded = await records.record(store, partial(_record_start, store, record, entry),
                                    f"the record of operation {operation_id} ({message}, "
                                    f"workflow {workflow_id})")
    if not recorded:
        message += "; the store did not answer: its record appears once it does"
    log.info("started %s switch of %s to %s for %s: operation %s", request.strategy.value,
             request.model_id, request.target_version, actor, operation_id)
    return SwitchAccepted(operation_id=operation_id, workflow_id=workflow_id, message=message,
                          recorded=recorded)


async def _record_start(store: Store, record: OperationRecord, entry: AuditEntry,
                        again: bool) -> None:
    """What the API records of a switch it started: the operation (also created by the
    switch's first activity, whichever comes first), its run and the request's audit
    entry (`switch_started`, written by the switch, names the actor too)."""
    await store.create_operation(record)
    await store.set_operation_run(record.operation_id, record.run_id or "")
    await records.audit_once(store, entry, again)


async def operation_view(client: Client, store: Store, operation_id: str) -> OperationView:
    record = await store.get_operation(operation_id)
    status = await query_status(client.get_workflow_handle(record.workflow_id,
                                                           run_id=record.run_id))
    if status is None or status.operation_id != operation_id:
        status = _from_record(record)
    return OperationView(**status.model_dump(), workflow_id=record.workflow_id,
                         success=status.status is OperationStatus.COMPLETED)


async def running_run(handle: WorkflowHandle) -> str | None:
    """The run id of the workflow if it is running now; None if it never ran or has
    ended (a switch, shadow or preload of that id is not under way)."""
    try:
        description = await handle.describe()
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            return None
        raise
    if description.status is not WorkflowExecutionStatus.RUNNING:
        return None
    return description.run_id


async def wait_closed(handle: WorkflowHandle, timeout_s: float = _CLOSE_WAIT_S) -> None:
    """Wait (briefly) until a workflow that has ended its work has closed its run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            description = await handle.describe()
        except RPCError as exc:
            if exc.status is RPCStatusCode.NOT_FOUND:
                return
            raise
        if description.status is not WorkflowExecutionStatus.RUNNING:
            return
        await asyncio.sleep(0.1)


async def query_status(handle: WorkflowHandle) -> SwitchStatus | None:
    """The workflow's `status` query, or None when it cannot answer."""
    try:
        return await handle.query(STATUS_QUERY, result_type=SwitchStatus,
                                  rpc_timeout=_QUERY_TIMEOUT)
    except (RPCError, Exception) as exc:  # the store answers when the workflow cannot
        log.debug("status query of %s failed: %s", handle.id, exc)
        return None


def _from_record(record: OperationRecord) -> SwitchStatus:
    done = record.status is OperationStatus.COMPLETED
    return SwitchStatus(
        operation_id=record.operation_id, model_id=record.model_id,
        target_version=record.target_version, strategy=record.strategy, status=record.status,
        phase=record.status.value, progress=1.0 if done else 0.0, outcome=record.outcome,
        reason=record.reason, started_at=record.created_at, finished_at=record.finished_at)
