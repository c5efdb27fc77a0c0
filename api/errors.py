"""Error mapping: every failure is a JSON body with a 4xx/5xx status, never a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from temporalio.service import RPCError

from api.deps import TemporalUnavailable
from turnout.store import Conflict, NotFound, is_unavailable
from turnout.strategies import StrategyConfigError

log = logging.getLogger("turnout.api")


class ErrorBody(BaseModel):
    """The shape of every error: a message, plus fields at fault or the active operation."""

    detail: Any
    active_operation_id: str | None = None


# What any call may answer when authentication is on.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing, malformed or unknown API key"},
    403: {"model": ErrorBody, "description": "The key's role does not allow this call; "
                                             "`detail` names the role needed"},
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    400: {"model": ErrorBody, "description": "The body cannot be read (e.g. not UTF-8)"},
    404: {"model": ErrorBody, "description": "Unknown model, version or operation"},
    409: {"model": ErrorBody, "description": "Conflicts with the current state"},
    422: {"model": ErrorBody, "description": "Invalid body or strategy options; `detail` "
                                             "lists each field at fault with its `loc`"},
    413: {"model": ErrorBody, "description": "The body is larger than "
                                             "`VLLM_MODEL_SWITCHING_API_MAX_BODY_BYTES`"},
    503: {"model": ErrorBody, "description": "The store or Temporal is not reachable; "
                                             "`detail` says which"},
}


class FieldErrors(Exception):
    """A request that is well formed but names something that does not fit (an unknown
    version, say): a 422 whose `detail` lists each field at fault, like pydantic's."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e["msg"]) for e in errors))


class ActiveSwitchConflict(Exception):
    def __init__(self, model_id: str, operation_id: str | None) -> None:
        self.model_id = model_id
        self.operation_id = operation_id
        super().__init__(f"a switch of {model_id} is already active"
                         + (f": operation {operation_id}" if operation_id else ""))


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route of this path answers (Starlette's 405 names only those of
    the first route whose path matched, though each method has a route of its own)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": ""})
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            allow = ", ".join(allowed_methods(app, request.scope))
            return JSONResponse({"detail": "Method Not Allowed"}, exc.status_code,
                                headers={**(exc.headers or {}), "Allow": allow})
        return await http_exception_handler(request, exc)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_404_NOT_FOUND)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_409_CONFLICT)

    @app.exception_handler(ActiveSwitchConflict)
    async def _active(_: Request, exc: ActiveSwitchConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "active_operation_id": exc.operation_id},
                            status.HTTP_409_CONFLICT)

    @app.exception_handler(FieldErrors)
    async def _fields(_: Request, exc: FieldErrors) -> JSONResponse:
        return JSONResponse({"detail": exc.errors}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(StrategyConfigError)
    async def _strategy(_: Request, exc: StrategyConfigError) -> JSONResponse:
        return JSONResponse({"detail": exc.errors}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(RPCError)
    async def _temporal(request: Request, exc: RPCError) -> JSONResponse:
        log.error("Temporal call failed on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": f"Temporal is not available: {exc.message}"},
                            status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.exception_handler(TemporalUnavailable)
    async def _no_temporal(_: Request, exc: TemporalUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_503_SERVICE_UNAVAILABLE)

    async def _store(request: Request, exc: Exception) -> JSONResponse:
        if not is_unavailable(exc):
            return await _unexpected(request, exc)
        log.error("the store failed on %s %s: %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc)
        return JSONResponse({"detail": "the store is not available; try again shortly"},
                            status.HTTP_503_SERVICE_UNAVAILABLE)

    # Not Exception: what they catch is answered here, without the traceback Starlette's
    # last-resort handler logs.
    app.add_exception_handler(SQLAlchemyError, _store)
    app.add_exception_handler(OSError, _store)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the API server's log"},
                            status.HTTP_500_INTERNAL_SERVER_ERROR)
