"""FastAPI dependencies: settings, store, Temporal client, and the API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status
from temporalio.client import Client

from turnout.config import ModelSwitchingConfig
from turnout.store import Store


def get_settings(request: Request) -> ModelSwitchingConfig:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_temporal(request: Request) -> Client:
    return request.app.state.temporal


async def require_api_key(
    settings: Annotated[ModelSwitchingConfig, Depends(get_settings)],
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """With `enable_authentication`, every call needs the key (Bearer token or X-API-Key)."""
    if not settings.enable_authentication:
        return
    given = x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:]
    if not given or not settings.api_key or not secrets.compare_digest(given, settings.api_key):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong API key",
                            headers={"WWW-Authenticate": "Bearer"})


SettingsDep = Annotated[ModelSwitchingConfig, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
