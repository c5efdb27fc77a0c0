"""The control-plane REST API: a thin layer over the store and the Temporal client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from temporalio.client import Client

from api import errors, records
from api.auth import OPEN_PATHS, AuthenticationMiddleware, FailureAudit, Viewer, route_role
from api.limits import BodyLimitMiddleware
from api.params import single_query_values
from api.routers import alerts, audit, engines, health, meta, models, rules, shadow, switch
from turnout import tracing
from turnout.auth import KeyRing, keyring_from_settings
from turnout.config import ModelSwitchingConfig
from turnout.runtime import connect_temporal
from turnout.store import Store

log = logging.getLogger("turnout.api")

TITLE, VERSION = "turnout", "0.1.0"
DESCRIPTION = "Durable, zero-downtime switches between model versions."


def create_app(settings: ModelSwitchingConfig | None = None, *, store: Store | None = None,
               temporal: Client | None = None) -> FastAPI:
    """Build the app; store and Temporal client are made in the lifespan unless given.

    Raises `turnout.auth.AuthConfigError` (naming the settings) when authentication is on
    and no usable key is configured: the API does not start without one.
    """
    settings = settings or ModelSwitchingConfig.from_env()
    keyring = keyring_from_settings(settings)
    _log_access(settings, keyring)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.store = store or Store.from_url(settings.database_url,
                                                  timeout_s=settings.api_backend_timeout_s)
        # The API serves (the store's part, probes) before Temporal answers: calls that
        # need it are 503 and `/readyz` says not ready until the connection is made.
        app.state.temporal = temporal
        connecting = None if temporal else asyncio.create_task(_connect(app, settings))
        yield
        if connecting is not None:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
        await records.finish(app.state.store, settings.api_backend_timeout_s)
        if store is None:
            await app.state.store.close()

    # The docs follow the API's rule (a key when authentication is on): served below.
    app = FastAPI(title=TITLE, version=VERSION, lifespan=lifespan, description=DESCRIPTION,
                  openapi_url=None, docs_url=None, redoc_url=None,
                  dependencies=[Depends(single_query_values)])
    app.state.auth_audit = FailureAudit(settings.api_auth_failures_audited_per_minute)
    errors.install(app)
    app.include_router(models.router)
    app.include_router(rules.router)
    app.include_router(shadow.router)
    app.include_router(switch.router)
    app.include_router(audit.router)
    app.include_router(alerts.router)
    app.include_router(health.router)
    app.include_router(engines.router)
    app.include_router(meta.router)
    # The last added runs first: authenticate, then limit what is read of the body.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.api_max_body_bytes)
    app.add_middleware(AuthenticationMiddleware, keyring=keyring, audit=app.state.auth_audit)
    tracer = tracing.tracer()
    if tracer is not None:  # outermost: refused calls are traced too
        from api.tracing import TracingMiddleware

        app.add_middleware(TracingMiddleware, tracer=tracer)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi(app, authenticated=keyring is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(principal: Viewer) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(principal: Viewer) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{TITLE} - docs")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(principal: Viewer) -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{TITLE} - ReDoc")

    return app


async def _connect(app: FastAPI, settings: ModelSwitchingConfig) -> None:
    """Connect to Temporal, trying again every second until it answers."""
    tries = 0
    while True:
        tries += 1
        try:
            app.state.temporal = await connect_temporal(
                settings, attempts=1, give_up_after_s=settings.api_backend_timeout_s)
        except Exception as exc:
            # Once a minute in the log, not every second.
            (log.warning if tries % 60 == 1 else log.debug)(
                "Temporal at %s not reachable (%s); calls that need it answer 503 until it "
                "is", settings.temporal_address, exc)
            await asyncio.sleep(1)
            continue
        if tries > 1:
            log.info("connected to Temporal at %s", settings.temporal_address)
        return


def _openapi(app: FastAPI, *, authenticated: bool) -> dict[str, Any]:
    """FastAPI's schema, plus the role each operation needs (`x-turnout-role`, and a line
    in its description) and, with authentication on, the two ways to send a key."""
    schema = get_openapi(title=TITLE, version=VERSION, description=DESCRIPTION,
                         routes=app.routes)
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        role = route_role(route)
        for method in route.methods:
            operation = schema["paths"][route.path_format][method.lower()]
            if route.path in OPEN_PATHS:
                operation["security"] = []
            elif role is not None:
                operation.setdefault("x-turnout-role", role.value)
                note = f"Role: {operation['x-turnout-role']} (or above)."
                operation["description"] = (f"{operation.get('description', '')}\n\n{note}"
                                            .strip())
    if authenticated:
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "`Authorization: Bearer <key>`"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        schema["security"] = [{"bearer": []}, {"apiKey": []}]
    return schema


def _log_access(settings: ModelSwitchingConfig, keyring: KeyRing | None) -> None:
    if keyring is None:
        log.warning("authentication is off: every caller may do everything, as `anonymous` "
                    "(set %s)", ModelSwitchingConfig.env_name("enable_authentication"))
        if settings.api_keys_file or settings.api_key:
            log.warning("API keys are configured but not checked: authentication is off")
        return
    log.info("authentication on: %d key(s): %s", len(keyring),
             ", ".join(f"{k.name} ({k.role.value})" for k in keyring.keys))
