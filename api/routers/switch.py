"""Switching operations: the guide's `POST /switch` and `GET /switch/operations/{id}`, and
the operator controls `POST /switch/operations/{id}/{action}`."""

from __future__ import annotations

from fastapi import APIRouter, Query, status

from api.auth import Operator, Viewer
from api.controls import ControlAction, control_operation
from api.deps import SettingsDep, StoreDep, TemporalDep
from api.errors import ERROR_RESPONSES, ErrorBody
from api.params import OperationIdPath
from api.switching import (
    OperationView,
    SwitchAccepted,
    Validation,
    operation_view,
    start_switch,
    validate,
)
from turnout.contracts import ControlRequest
from turnout.domain import OperationRecord, OperationStatus, SwitchRequest

router = APIRouter(prefix="/switch", tags=["switch"], responses=ERROR_RESPONSES)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=SwitchAccepted)
async def switch(body: SwitchRequest, principal: Operator, client: TemporalDep,
                 store: StoreDep, settings: SettingsDep) -> SwitchAccepted:
    """Start a switch; poll `GET /switch/operations/{operation_id}` for its progress.
    The caller's key name is the switch's actor; `requested_by` is kept as a note."""
    return await start_switch(client, store, settings, body, principal.name)


@router.post("/validate", response_model=Validation)
async def validate_switch(body: SwitchRequest, principal: Viewer,
                          store: StoreDep) -> Validation:
    """What `POST /switch` would refuse, without starting anything (so a viewer may ask)."""
    return await validate(store, body)


@router.get("/operations", response_model=list[OperationRecord])
async def list_operations(principal: Viewer, store: StoreDep,
                          model_id: str | None = Query(None, max_length=300),
                          status: OperationStatus | None = None,
                          limit: int = Query(100, ge=1, le=1000)) -> list[OperationRecord]:
    return await store.list_operations(model_id=model_id, status=status, limit=limit)


@router.get("/operations/{operation_id}", response_model=OperationView)
async def get_operation(operation_id: OperationIdPath, principal: Viewer,
                        client: TemporalDep, store: StoreDep) -> OperationView:
    """Status (`pending`, `running`, `paused`, `completed`, `failed`), progress 0..1, outcome."""
    return await operation_view(client, store, operation_id)


@router.post("/operations/{operation_id}/{action}", response_model=OperationView,
             responses={409: {"model": ErrorBody,
                              "description": "The switch refuses this action in its current "
                                             "phase (e.g. resume when not paused), or it has "
                                             "already ended; `detail` says why"}})
async def control(operation_id: OperationIdPath, action: ControlAction, principal: Operator,
                  client: TemporalDep, store: StoreDep,
                  body: ControlRequest | None = None) -> OperationView:
    """Roll back, pause, resume, promote (jump to 100%) or abort a running switch.

    Answers once the switch has applied the action, with its status then. Every accepted
    action is written to the audit log as `operator_<action>` with the caller's key name as
    actor, its reason and the body's `requested_by` note.
    """
    return await control_operation(client, store, operation_id, action, body,
                                   principal.name)
