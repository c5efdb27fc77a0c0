"""The audit log: every switching operation and every admin call."""

from __future__ import annotations

from fastapi import APIRouter, Query

from api.deps import StoreDep
from api.errors import ERROR_RESPONSES
from turnout.domain import AuditEntry

router = APIRouter(prefix="/audit", tags=["audit"], responses=ERROR_RESPONSES)


@router.get("", response_model=list[AuditEntry])
async def list_audit(store: StoreDep, model_id: str | None = None,
                     operation_id: str | None = None,
                     limit: int = Query(500, ge=1, le=5000)) -> list[AuditEntry]:
    return await store.list_audit(model_id=model_id, operation_id=operation_id, limit=limit)
