"""OpenAI-style error bodies, on both listeners.

Clients of the gateway are OpenAI SDKs; they parse `{"error": {...}}` into typed
exceptions, so even a 404 on an unknown path or an unexpected bug must answer in that shape
(and never with a stack trace). The client listener runs on `gateway.http` (its answers
are `error_response`; its server's own errors go through `server_error`), the admin
listener on aiohttp (`admin_error`, and the `openai_errors` middleware).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.http import Response, json_response

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(message: str, *, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, type: str, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    """An error answer of the client listener."""
    return json_response(error_body(message, type=type, param=param, code=code), status,
                         headers)


def server_error(status: int, message: str, code: str) -> Response:
    """The client listener's server's own errors (malformed request, head too long, a
    handler's bug) in the same shape."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return error_response(status, message, type=kind, code=code)


def admin_error(status: int, message: str, *, type: str, param: str | None = None,
                code: str | None = None) -> web.Response:
    """An error answer of the admin listener."""
    return web.json_response(error_body(message, type=type, param=param, code=code),
                             status=status)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP exceptions and unexpected failures into OpenAI error JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return admin_error(exc.status, exc.reason, type="invalid_request_error",
                           code=exc.reason.lower().replace(" ", "_"))
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return admin_error(500, "internal gateway error", type="server_error",
                           code="internal_error")
