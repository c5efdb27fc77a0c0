"""Probes and the caller's identity: `/healthz` (liveness, open), `/readyz` (readiness,
open) and `GET /auth/whoami`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import timedelta
from typing import Literal

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.auth import Viewer
from api.deps import SettingsDep, StoreDep
from api.errors import AUTH_RESPONSES
from turnout.auth import Role

log = logging.getLogger("turnout.api.meta")

router = APIRouter(tags=["meta"])

CheckResult = Literal["ok", "timeout", "failed"]


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Whether each part the API needs answers; nothing more (no addresses, no errors:
    those are in the API's log)."""

    status: Literal["ready", "not_ready"]
    checks: dict[Literal["store", "temporal"], CheckResult]


class WhoAmI(BaseModel):
    name: str
    role: Role
    authenticated: bool


@router.get("/healthz", response_model=Liveness)
async def healthz() -> Liveness:
    """Liveness: the API process answers. Open (no key), and says nothing else."""
    return Liveness()


async def _check(name: str, call: Awaitable[object], timeout_s: float) -> CheckResult:
    try:
        await asyncio.wait_for(call, timeout_s)
    except TimeoutError:
        log.warning("readiness: %s did not answer within %gs", name, timeout_s)
        return "timeout"
    except Exception as exc:
        log.warning("readiness: %s failed: %s", name, exc)
        return "failed"
    return "ok"


async def _not_connected() -> CheckResult:
    return "failed"


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness,
                             "description": "The store or Temporal does not answer"}})
async def readyz(request: Request, store: StoreDep,
                 settings: SettingsDep) -> Readiness | JSONResponse:
    """Readiness: the store and Temporal each answer within `API_READY_TIMEOUT_S`.
    Open (no key); 503 names the part that failed (Temporal: until the API has connected
    to it, too)."""
    timeout = settings.api_ready_timeout_s
    client = request.app.state.temporal
    store_ok, temporal_ok = await asyncio.gather(
        _check("store", store.ping(), timeout),
        _check("temporal", client.service_client.check_health(
            timeout=timedelta(seconds=timeout)), timeout) if client is not None
        else _not_connected())
    ready = store_ok == temporal_ok == "ok"
    body = Readiness(status="ready" if ready else "not_ready",
                     checks={"store": store_ok, "temporal": temporal_ok})
    if ready:
        return body
    return JSONResponse(body.model_dump(), status.HTTP_503_SERVICE_UNAVAILABLE)


@router.get("/auth/whoami", response_model=WhoAmI, responses=AUTH_RESPONSES)
async def whoami(principal: Viewer) -> WhoAmI:
    """The key this call was made with: its name (the actor in the audit log) and role.
    With authentication off: `anonymous`, not authenticated."""
    return WhoAmI(name=principal.name, role=principal.role,
                  authenticated=principal.authenticated)
