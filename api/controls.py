"""Operator controls of running switches: rollback, pause, resume, promote, abort.

Each control is a Temporal update of `SwitchWorkflow`: the workflow's validator refuses an
action that is illegal in the current phase before anything is written, and the update
returns the switch's status once the action has been applied. Refusals become 409s; an
accepted action is written to the audit log.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from functools import partial

from fastapi import HTTPException, status
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api import records
from api.switching import (
    OperationView,
    SwitchAccepted,
    query_status,
    running_run,
    start_switch,
    workflow_id_for,
)
from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.domain import (
    AuditEntry,
    OperationStatus,
    SwitchingStrategyType,
    SwitchRequest,
    SwitchStatus,
)
from turnout.store import Store

log = logging.getLogger("turnout.api.controls")


class ControlAction(StrEnum):
    """An operator action on a running switch: the name of a `SwitchWorkflow` update."""

    ROLLBACK = c.ROLLBACK
    PAUSE = c.PAUSE
    RESUME = c.RESUME
    PROMOTE = c.PROMOTE
    ABORT = c.ABORT


assert tuple(ControlAction) == c.CONTROL_ACTIONS, "ControlAction must mirror CONTROL_ACTIONS"

# The server answers an update of a closed run (or of a chain that has ended) with these.
_CLOSED = (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION)


class ControlRefused(HTTPException):
    """409: the workflow's validator refused the action, or the switch has already ended."""

    def __init__(self, detail: str) -> None:
        super().__init__(status.HTTP_409_CONFLICT, detail)


class SwitchClosed(ControlRefused):
    """The workflow run this control was meant for is no longer running."""


async def send_control(handle: WorkflowHandle, action: str,
                       request: c.ControlRequest) -> SwitchStatus:
    """Execute the update `action`; map refusals to `ControlRefused` (409)."""
    try:
        return await handle.execute_update(action, request, result_type=SwitchStatus)
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        message = cause.message if isinstance(cause, ApplicationError) else str(cause)
        raise ControlRefused(f"{action} refused: {message}") from None
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"Temporal did not confirm the {action} in time; "
                            "check the operation's status before retrying") from None
    except RPCError as exc:
        if exc.status in _CLOSED:
            raise SwitchClosed(f"{action} refused: the switch is no longer running "
                               f"({exc.message})") from None
        raise


def _view(result: SwitchStatus, workflow_id: str) -> OperationView:
    return OperationView(**result.model_dump(), workflow_id=workflow_id,
                         success=result.status is OperationStatus.COMPLETED)


def _as_actor(request: c.ControlRequest | None, actor: str) -> c.ControlRequest:
    """What the workflow receives: the caller's key name as `requested_by` (the workflow
    records it as the actor); the body's own `requested_by` stays a note in the audit log."""
    return (request or c.ControlRequest()).model_copy(update={"requested_by": actor})


async def _audit(store: Store, action: str, actor: str, note: c.ControlRequest | None,
                 result: SwitchStatus) -> None:
    """Audit an applied control: applied, it is under way whatever the store does now
    (`api.records`). A retry after a write that committed but did not answer in time may
    write the entry twice (a control can be applied more than once per operation)."""
    entry = AuditEntry(
        actor=actor, action=action, model_id=result.model_id,
        operation_id=result.operation_id,
        details={"reason": note.reason if note else None,
                 "requested_by": note.requested_by if note else None,
                 "status": result.status.value, "phase": result.phase,
                 "weights": result.weights})

    async def write(_: bool) -> None:
        await store.audit(entry)

    await records.record(store, write, f"the {action} audit entry of operation "
                                       f"{result.operation_id}")


async def control_operation(client: Client, store: Store, operation_id: str,
                            action: ControlAction, body: c.ControlRequest | None,
                            actor: str) -> OperationView:
    """Apply `action` to the switch `operation_id` (404 if unknown, 409 if refused)."""
    request = _as_actor(body, actor)
    record = await store.get_operation(operation_id)
    if record.status.terminal:
        ended = f"{record.status.value}" + (f", {record.outcome.value}" if record.outcome else "")
        raise ControlRefused(f"{action.value} refused: operation {operation_id} has already "
                             f"ended ({ended})")
    # Address the run chain the operation started (not just its first run): a switch that
    # continued as new is still the same operation, a later switch of the model is not.
    handle = client.get_workflow_handle(record.workflow_id,
                                        first_execution_run_id=record.run_id or None)
    result = await send_control(handle, action.value, request)
    await _audit(store, f"operator_{action.value}", actor, body, result)
    log.info("operator %s of operation %s by %s: %s", action.value, operation_id,
             actor, request.reason or "no reason given")
    return _view(result, record.workflow_id)


async def emergency_rollback(client: Client, store: Store, settings: ModelSwitchingConfig,
                             model_id: str, body: c.ControlRequest | None, actor: str,
                             ) -> OperationView | SwitchAccepted:
    """Roll back the active switch of `model_id`, or switch it back to its previous version.

    Returns the active switch's `OperationView` after its rollback, or the `SwitchAccepted`
    of a new immediate switch to the previous version.
    """
    request = _as_actor(body, actor)
    note = body.requested_by if body else None
    model = await store.get_model(model_id)  # NotFound → 404
    workflow_id = workflow_id_for(model_id)
    active = await _active_run(client, workflow_id)
    if active is not None:
        try:
            result = await send_control(client.get_workflow_handle(workflow_id, run_id=active),
                                        c.ROLLBACK, request)
        except SwitchClosed:  # it ended in between: undo its result like any finished switch
            model = await store.get_model(model_id)
        else:
            await _audit(store, "emergency_rollback", actor, body, result)
            log.warning("emergency rollback of %s by %s: rolled back operation %s (%s)",
                        model_id, actor, result.operation_id,
                        request.reason or "no reason given")
            return _view(result, workflow_id)

    if not model.previous_version:
        raise HTTPException(status.HTTP_409_CONFLICT, "no previous version to roll back to")
    reason = request.reason or f"emergency rollback to {model.previous_version}"
    accepted = await start_switch(client, store, settings, SwitchRequest(
        model_id=model_id, target_version=model.previous_version,
        strategy=SwitchingStrategyType.IMMEDIATE, reason=reason,
        requested_by=note), actor)
    entry = AuditEntry(
        actor=actor, action="emergency_rollback", model_id=model_id,
        operation_id=accepted.operation_id,
        details={"reason": request.reason, "requested_by": note,
                 "from_version": model.live_version, "to_version": model.previous_version})
    # Under way: a store that did not answer the switch's record is not waited for again.
    await records.record(store, partial(records.audit_once, store, entry),
                         f"the emergency_rollback audit entry of operation "
                         f"{accepted.operation_id}", try_now=accepted.recorded)
    log.warning("emergency rollback of %s by %s: immediate switch %s -> %s, operation %s",
                model_id, actor, model.live_version, model.previous_version,
                accepted.operation_id)
    return accepted


async def _active_run(client: Client, workflow_id: str) -> str | None:
    """The run id of the model's switch if one is active (running or paused), else None.

    A switch that has already reported its end but whose run is still closing (it waits for
    its handlers to finish) is not active; `start_switch` waits for it to close.
    """
    run_id = await running_run(client.get_workflow_handle(workflow_id))
    if run_id is None:
        return None
    status = await query_status(client.get_workflow_handle(workflow_id, run_id=run_id))
    if status is not None and status.status.terminal:
        return None
    return run_id
