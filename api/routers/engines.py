"""The engine fleet and its cache: `GET /engines`, and preloading a version.

`GET /engines` lists the engine hosts with what they offer and what is free, and every
engine with its role (serving, candidate, standby, preloaded, shadow, idle) and who holds
it. `POST /models/{model_id}/versions/{version}/preload` loads a version without traffic
(the guide's `cache.preload_model`), so a later switch to it needs no cold start; a load
that cannot fit is refused at once, naming what would have to be evicted.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.auth import Operator, Viewer
from api.deps import SettingsDep, StoreDep, TemporalDep
from api.errors import ERROR_RESPONSES, ErrorBody
from api.params import ModelIdPath, VersionPath
from api.switching import running_run
from turnout import contracts as c
from turnout.domain import AuditEntry, EngineState
from turnout.fleet import FleetReport, LoadRequest, PlacementError, place
from turnout.limits import MAX_REPLICAS
from turnout.store.fleet import read_fleet
from turnout.store.schema import utcnow

router = APIRouter(tags=["engines"], responses=ERROR_RESPONSES)


class PreloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: int = Field(0, ge=0, le=c.MAX_PRELOAD_PRIORITY,
                          description="Cached engines of a lower priority may be evicted "
                                      "to make room; higher ones are kept")
    replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS,
                                 description="Engines to load (default: the version's)")
    requested_by: str | None = Field(None, max_length=256,
                                     description="A free note for the audit log")


class ReleasePreload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requested_by: str | None = Field(None, max_length=256,
                                     description="A free note for the audit log")
    reason: str | None = Field(None, max_length=2000)


@router.get("/engines", response_model=FleetReport)
async def list_engines(principal: Viewer, store: StoreDep,
                       settings: SettingsDep) -> FleetReport:
    """Engine hosts (capacity, used, free, live) and engines (role, state, memory, since,
    last used, priority, holders)."""
    return (await read_fleet(store)).report(utcnow(), settings.engine_host_live_after_s)


def _handle(client: TemporalDep, model_id: str, version: str) -> WorkflowHandle:
    return client.get_workflow_handle(c.preload_workflow_id(model_id, version))


async def _running_status(handle: WorkflowHandle) -> c.PreloadStatus | None:
    if await running_run(handle) is None:
        return None
    return await handle.query(c.STATUS_QUERY, result_type=c.PreloadStatus)


@router.post(
    "/models/{model_id}/versions/{version}/preload", status_code=status.HTTP_202_ACCEPTED,
    response_model=c.PreloadStatus,
    responses={200: {"model": c.PreloadStatus,
                     "description": "Already preloaded, or already loaded (the preload "
                                    "now holds the loaded engines)"},
               409: {"model": ErrorBody,
                     "description": "No host can take it without evicting engines this "
                                    "preload may not evict (named), or an external "
                                    "endpoint"}})
async def preload(model_id: ModelIdPath, version: VersionPath, principal: Operator,
                  client: TemporalDep, store: StoreDep, settings: SettingsDep,
                  body: PreloadRequest | None = None) -> c.PreloadStatus | JSONResponse:
    """Load a version without traffic and keep it loaded until released; poll the status
    with `GET` (phase `loading`, then `ready`)."""
    body = body or PreloadRequest()
    info = await store.get_version(model_id, version)
    if info.config.endpoint:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"version: {version!r} is an external endpoint; turnout loads "
                            f"nothing for it")
    handle = _handle(client, model_id, version)
    running = await _running_status(handle)
    if running is not None:
        return JSONResponse(running.model_dump(mode="json"), status_code=status.HTTP_200_OK)
    state = await read_fleet(store)
    loaded = sorted(e.host for e in state.engines
                    if (e.model_id, e.version) == (model_id, version)
                    and e.state is EngineState.READY)
    if not loaded:
        try:
            place(LoadRequest(model_id, version, state.weights.get((model_id, version), 0),
                              replicas=body.replicas or info.config.replicas,
                              priority=body.priority),
                  state.host_views(utcnow(), settings.engine_host_live_after_s),
                  state.views())
        except PlacementError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, f"version: {exc}") from None
    try:
        await client.start_workflow(
            c.PRELOAD_WORKFLOW,
            c.PreloadInput(model_id=model_id, version=version, priority=body.priority,
                           replicas=body.replicas, requested_by=principal.name),
            id=c.preload_workflow_id(model_id, version), task_queue=settings.control_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=f"preload {version} of {model_id} (priority {body.priority})")
    except WorkflowAlreadyStartedError:  # another request started it a moment ago
        started = await handle.query(c.STATUS_QUERY, result_type=c.PreloadStatus)
        return JSONResponse(started.model_dump(mode="json"), status_code=status.HTTP_200_OK)
    await store.audit(AuditEntry(actor=principal.name, action="preload_started",
                                 model_id=model_id,
                                 details={"version": version, "priority": body.priority,
                                          "replicas": body.replicas,
                                          "requested_by": body.requested_by}))
    accepted = c.PreloadStatus(model_id=model_id, version=version, priority=body.priority,
                               phase="ready" if loaded else "loading", warm=bool(loaded),
                               hosts=loaded, started_at=utcnow())
    if loaded:
        return JSONResponse(accepted.model_dump(mode="json"), status_code=status.HTTP_200_OK)
    return accepted


@router.get("/models/{model_id}/versions/{version}/preload", response_model=c.PreloadStatus)
async def get_preload(model_id: ModelIdPath, version: VersionPath, principal: Viewer,
                      client: TemporalDep) -> c.PreloadStatus:
    """The version's current (or last) preload: `loading`, `ready`, `released`, `evicted`
    or `failed`, with the hosts it is loaded on."""
    try:
        return await _handle(client, model_id, version).query(
            c.STATUS_QUERY, result_type=c.PreloadStatus)
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"version: {version!r} of {model_id!r} was never "
                                f"preloaded") from None
        raise


@router.delete("/models/{model_id}/versions/{version}/preload",
               status_code=status.HTTP_202_ACCEPTED, response_model=c.PreloadStatus)
async def release_preload(model_id: ModelIdPath, version: VersionPath, principal: Operator,
                          client: TemporalDep, store: StoreDep,
                          body: ReleasePreload | None = None) -> c.PreloadStatus:
    """Let go of the preload: its engines stop unless something else holds them (a switch
    to the version, say). 404 when no preload of the version is running."""
    body = body or ReleasePreload()
    handle = _handle(client, model_id, version)
    if await _running_status(handle) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"version: no preload of {version!r} of {model_id!r} is running")
    await handle.signal(c.RELEASE_PRELOAD, body.reason or f"released by {principal.name}")
    await store.audit(AuditEntry(actor=principal.name, action="preload_released",
                                 model_id=model_id,
                                 details={"version": version, "reason": body.reason,
                                          "requested_by": body.requested_by}))
    return await handle.query(c.STATUS_QUERY, result_type=c.PreloadStatus)
