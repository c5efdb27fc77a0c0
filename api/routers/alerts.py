"""Alerts: the guide's `GET /alerts`, plus acknowledging one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from api.auth import Operator, Viewer
from api.deps import StoreDep
from api.errors import ERROR_RESPONSES
from api.params import MAX_ROW_ID, DateTimeQuery
from turnout.contracts import ControlRequest
from turnout.domain import Alert, AlertSeverity, AlertState, AuditEntry

router = APIRouter(prefix="/alerts", tags=["alerts"], responses=ERROR_RESPONSES)


@router.get("", response_model=list[Alert])
async def list_alerts(principal: Viewer, store: StoreDep,
                      model_id: str | None = Query(None, max_length=300),
                      severity: AlertSeverity | None = None,
                      state: AlertState | None = AlertState.FIRING,
                      since: DateTimeQuery | None = None,
                      limit: int = Query(500, ge=1, le=5000)) -> list[Alert]:
    """Active (firing) alerts by default; `state=resolved` for past ones."""
    return await store.list_alerts(model_id=model_id, severity=severity, state=state,
                                   since=since, limit=limit)


@router.post("/{alert_id}/acknowledge", response_model=Alert)
async def acknowledge(alert_id: Annotated[int, Path(ge=1, le=MAX_ROW_ID)],
                      principal: Operator, store: StoreDep,
                      body: ControlRequest | None = None) -> Alert:
    """Mark an alert as seen: `acknowledged_by` is the caller's key name; the body's
    `requested_by` is a note kept in the audit log."""
    alert = await store.acknowledge_alert(alert_id, principal.name)
    await store.audit(AuditEntry(actor=principal.name, action="alert_acknowledged",
                                 model_id=alert.model_id,
                                 details={"alert_id": alert_id,
                                          "reason": body.reason if body else None,
                                          "requested_by": body.requested_by if body else None}))
    return alert
