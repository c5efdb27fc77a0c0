"""FastAPI dependencies: settings, store and Temporal client (roles: `api.auth`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from temporalio.client import Client

from turnout.config import ModelSwitchingConfig
from turnout.store import Store


def get_settings(request: Request) -> ModelSwitchingConfig:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_temporal(request: Request) -> Client:
    return request.app.state.temporal


SettingsDep = Annotated[ModelSwitchingConfig, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
