"""Models and their versions: the guide's `POST /models`, plus listing."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import StoreDep
from api.errors import ERROR_RESPONSES
from turnout.domain import AuditEntry, ModelInfo, RegisterModelRequest, VersionInfo

router = APIRouter(prefix="/models", tags=["models"], responses=ERROR_RESPONSES)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=VersionInfo)
async def register_model(body: RegisterModelRequest, store: StoreDep) -> VersionInfo:
    """Register a version of a model; the model id is `{model_arch}_{model_stage}`."""
    version = await store.register_version(body)
    await store.audit(AuditEntry(action="version_registered", model_id=version.model_id,
                                 details={"version": version.version, "model": body.model}))
    return version


@router.get("", response_model=list[ModelInfo])
async def list_models(store: StoreDep) -> list[ModelInfo]:
    return await store.list_models()


@router.get("/{model_id}", response_model=ModelInfo)
async def get_model(model_id: str, store: StoreDep) -> ModelInfo:
    return await store.get_model(model_id)
