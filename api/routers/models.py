"""Models and their versions: the guide's `POST /models`, listing, and emergency rollback."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from api.auth import Operator, Viewer
from api.controls import emergency_rollback
from api.deps import SettingsDep, StoreDep, TemporalDep
from api.errors import ERROR_RESPONSES, ErrorBody, FieldErrors
from api.params import ModelIdPath
from api.switching import OperationView, SwitchAccepted
from turnout.contracts import ControlRequest
from turnout.domain import AuditEntry, ModelInfo, RegisterModelRequest, VersionInfo
from turnout.registration import check_registration

router = APIRouter(prefix="/models", tags=["models"], responses=ERROR_RESPONSES)


def registration_details(body: RegisterModelRequest) -> dict[str, Any]:
    """What the audit log keeps of a registration: what will run and where it is sent,
    never a secret. Of an external endpoint only its host and port (a URL may carry
    credentials); of its credentials only the name of the variable that holds them."""
    details: dict[str, Any] = {"version": body.version, "model": body.model,
                               "engine_args": body.engine_args, "aliases": body.aliases,
                               "served_model_name": body.served_model_name}
    if body.endpoint is not None:
        details["endpoint_host"] = _host_port(body.endpoint)
    api_key_env = getattr(body, "api_key_env", None)
    if api_key_env is not None:
        details["api_key_env"] = api_key_env
    return details


def _host_port(url: str) -> str | None:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.hostname is None:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}" if port is not None else host


@router.post("", status_code=status.HTTP_201_CREATED, response_model=VersionInfo)
async def register_model(body: RegisterModelRequest, principal: Operator, store: StoreDep,
                         settings: SettingsDep) -> VersionInfo:
    """Register a version of a model; the model id is `{model_arch}_{model_stage}`.

    422 naming the field when `engine_args` holds an option turnout does not accept, a
    local `model` lies outside the model roots, or an `endpoint` points somewhere
    prompts may not go (see the README); nothing is stored then.
    """
    errors = await check_registration(body, settings)
    if errors:
        raise FieldErrors(errors)
    version = await store.register_version(body)
    await store.audit(AuditEntry(actor=principal.name, action="version_registered",
                                 model_id=version.model_id, details=registration_details(body)))
    return version


@router.get("", response_model=list[ModelInfo])
async def list_models(principal: Viewer, store: StoreDep) -> list[ModelInfo]:
    return await store.list_models()


@router.get("/{model_id}", response_model=ModelInfo)
async def get_model(model_id: ModelIdPath, principal: Viewer, store: StoreDep) -> ModelInfo:
    return await store.get_model(model_id)


@router.post(
    "/{model_id}/rollback", response_model=OperationView,
    responses={
        200: {"description": "A switch of the model was active: it has been rolled back "
                             "(traffic is on its stable version); its status"},
        202: {"model": SwitchAccepted,
              "description": "No switch was active: an immediate switch back to the "
                             "previous version has started; poll its operation"},
        409: {"model": ErrorBody,
              "description": "No previous version to roll back to, or the active switch "
                             "refuses a rollback in its current phase"},
    })
async def rollback_model(model_id: ModelIdPath, principal: Operator, client: TemporalDep,
                         store: StoreDep, settings: SettingsDep,
                         body: ControlRequest | None = None) -> OperationView | JSONResponse:
    """Emergency rollback: undo whatever is happening to this model, as fast as possible.

    If a switch of the model is running or paused it is rolled back (200). Otherwise the
    model is switched immediately back to its previous version (202). Audited as
    `emergency_rollback`.
    """
    result = await emergency_rollback(client, store, settings, model_id, body,
                                      principal.name)
    if isinstance(result, SwitchAccepted):
        return JSONResponse(result.model_dump(mode="json"),
                            status_code=status.HTTP_202_ACCEPTED)
    return result
