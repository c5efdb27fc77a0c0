"""Traffic mirroring: copy a share of a model's requests to a shadow version.

`POST /models/{model_id}/shadow` starts a `ShadowWorkflow` (load the version, mirror, and
release it at the end), `GET` reads its status, `DELETE` stops it. The shadow's answers are
measured by the gateways like any version's (so `GET /health/models` and the alerts cover
it) and never reach a client.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.auth import Operator, Viewer
from api.deps import SettingsDep, StoreDep, TemporalDep
from api.errors import ERROR_RESPONSES
from api.params import ModelIdPath
from api.switching import running_run
from turnout import contracts as c
from turnout.domain import NAME_PATTERN, AuditEntry
from turnout.limits import ACTOR_MAX, REASON_MAX

router = APIRouter(prefix="/models", tags=["shadow"], responses=ERROR_RESPONSES)


class ShadowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=NAME_PATTERN,
                         description="A registered version that is not live")
    percentage: float = Field(100.0, gt=0, le=100, strict=True,
                              description="Share of the model's requests copied to it")
    duration_minutes: float | None = Field(
        None, gt=0, le=60 * 24 * 30, strict=True,
        description="How long to mirror (default: until stopped)")
    requested_by: str | None = Field(None, max_length=ACTOR_MAX,
                                     description="A free note for the audit log")
    reason: str | None = Field(None, max_length=REASON_MAX)


class StopShadow(BaseModel):
    requested_by: str | None = Field(None, max_length=ACTOR_MAX,
                                     description="A free note for the audit log")
    reason: str | None = Field(None, max_length=REASON_MAX)


def _handle(client: TemporalDep, model_id: str) -> WorkflowHandle:
    return client.get_workflow_handle(c.shadow_workflow_id(model_id))


@router.post("/{model_id}/shadow", status_code=status.HTTP_202_ACCEPTED,
             response_model=c.ShadowStatus)
async def start_shadow(model_id: ModelIdPath, body: ShadowRequest, principal: Operator,
                       client: TemporalDep, store: StoreDep,
                       settings: SettingsDep) -> c.ShadowStatus:
    """Start mirroring. 404: unknown model or version; 409: the version is live, the model
    serves nothing yet, or a shadow of this model is already running."""
    model = await store.get_model(model_id)
    if model.version(body.version) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"version: {body.version!r} of {model_id!r} is not registered")
    if model.live_version is None:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"model_id: {model_id!r} serves nothing yet: nothing to mirror")
    if body.version == model.live_version:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"version: {body.version!r} is live; mirror another version")
    shadow_input = c.ShadowInput(
        model_id=model_id, version=body.version, percent=body.percentage,
        duration_s=(body.duration_minutes or 0) * 60,
        engine_task_queue=settings.engine_task_queue, requested_by=principal.name)
    try:
        await client.start_workflow(
            c.SHADOW_WORKFLOW, shadow_input, id=c.shadow_workflow_id(model_id),
            task_queue=settings.control_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=f"mirror {body.percentage:g}% of {model_id} to {body.version}")
    except WorkflowAlreadyStartedError:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"model_id: a shadow of {model_id!r} is already running; "
                            f"stop it first (DELETE /models/{model_id}/shadow)") from None
    await store.audit(AuditEntry(actor=principal.name, action="shadow_started",
                                 model_id=model_id, details=body.model_dump()))
    return c.ShadowStatus(model_id=model_id, version=body.version, percent=body.percentage)


@router.get("/{model_id}/shadow", response_model=c.ShadowStatus)
async def get_shadow(model_id: ModelIdPath, principal: Viewer,
                     client: TemporalDep) -> c.ShadowStatus:
    """The model's current (or last) shadow: phase `loading`, `mirroring`, `completed` or
    `failed`, with the reason it ended."""
    handle = _handle(client, model_id)
    try:
        return await handle.query(c.STATUS_QUERY, result_type=c.ShadowStatus)
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"model_id: {model_id!r} has no shadow") from None
        raise


@router.delete("/{model_id}/shadow", status_code=status.HTTP_202_ACCEPTED,
               response_model=c.ShadowStatus)
async def stop_shadow(model_id: ModelIdPath, principal: Operator, client: TemporalDep,
                      store: StoreDep, body: StopShadow | None = None) -> c.ShadowStatus:
    """Stop mirroring: the shadow leaves the route, its copies finish, its engine stops.
    404 when no shadow of the model is running."""
    handle = _handle(client, model_id)
    if await running_run(handle) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"model_id: {model_id!r} has no running shadow")
    body = body or StopShadow()
    reason = body.reason or f"stopped by {principal.name}"
    await handle.signal(c.STOP_SHADOW, reason)
    await store.audit(AuditEntry(actor=principal.name, action="shadow_stopped",
                                 model_id=model_id,
                                 details={"reason": body.reason,
                                          "requested_by": body.requested_by}))
    return await handle.query(c.STATUS_QUERY, result_type=c.ShadowStatus)
