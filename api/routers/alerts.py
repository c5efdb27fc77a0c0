"""Alerts: the guide's `GET /alerts`, plus acknowledging one."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query

from api.deps import StoreDep
from api.errors import ERROR_RESPONSES
from turnout.contracts import ControlRequest
from turnout.domain import Alert, AlertSeverity, AlertState, AuditEntry

router = APIRouter(prefix="/alerts", tags=["alerts"], responses=ERROR_RESPONSES)


@router.get("", response_model=list[Alert])
async def list_alerts(store: StoreDep, model_id: str | None = None,
                      severity: AlertSeverity | None = None,
                      state: AlertState | None = AlertState.FIRING,
                      since: datetime | None = None,
                      limit: int = Query(500, ge=1, le=5000)) -> list[Alert]:
    """Active (firing) alerts by default; `state=resolved` for past ones."""
    return await store.list_alerts(model_id=model_id, severity=severity, state=state,
                                   since=since, limit=limit)


@router.post("/{alert_id}/acknowledge", response_model=Alert)
async def acknowledge(alert_id: int, store: StoreDep,
                      body: ControlRequest | None = None) -> Alert:
    by = body.requested_by if body else None
    alert = await store.acknowledge_alert(alert_id, by)
    await store.audit(AuditEntry(actor=by, action="alert_acknowledged",
                                 model_id=alert.model_id,
                                 details={"alert_id": alert_id,
                                          "reason": body.reason if body else None}))
    return alert
