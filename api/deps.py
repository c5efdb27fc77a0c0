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


class TemporalUnavailable(Exception):
    """The API has not (yet) connected to Temporal: a 503."""


def get_temporal(request: Request) -> Client:
    client = request.app.state.temporal
    if client is None:
        raise TemporalUnavailable("Temporal is not available: the API is not connected to "
                                  "it yet")
    return client


SettingsDep = Annotated[ModelSwitchingConfig, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
