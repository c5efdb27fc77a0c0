"""The control-plane REST API: a thin layer over the store and the Temporal client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from temporalio.client import Client

from api import errors
from api.deps import require_api_key
from api.routers import alerts, audit, engines, health, models, rules, shadow, switch
from turnout.config import ModelSwitchingConfig
from turnout.runtime import connect_temporal
from turnout.store import Store


def create_app(settings: ModelSwitchingConfig | None = None, *, store: Store | None = None,
               temporal: Client | None = None) -> FastAPI:
    """Build the app; store and Temporal client are made in the lifespan unless given."""
    settings = settings or ModelSwitchingConfig.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.store = store or Store.from_url(settings.database_url)
        app.state.temporal = temporal or await connect_temporal(settings)
        yield
        if store is None:
            await app.state.store.close()

    app = FastAPI(title="turnout", version="0.1.0", lifespan=lifespan,
                  description="Durable, zero-downtime switches between model versions.",
                  dependencies=[Depends(require_api_key)])
    errors.install(app)
    app.include_router(models.router)
    app.include_router(rules.router)
    app.include_router(shadow.router)
    app.include_router(switch.router)
    app.include_router(audit.router)
    app.include_router(alerts.router)
    app.include_router(health.router)
    app.include_router(engines.router)

    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
