"""OpenAI-style error bodies, and a middleware that keeps every error in that shape.

Clients of the gateway are OpenAI SDKs; they parse `{"error": {...}}` into typed
exceptions, so even a 404 on an unknown path or an unexpected bug must answer in that shape
(and never with a stack trace).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, *, type: str, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP exceptions and unexpected failures into OpenAI error JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason, type="invalid_request_error",
                              code=exc.reason.lower().replace(" ", "_"))
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal gateway error", type="server_error",
                              code="internal_error")
