"""OpenAI-style error bodies.

Clients of the gateway are OpenAI SDKs; they parse `{"error": {...}}` into typed
exceptions, so even a 404 on an unknown path or an unexpected bug must answer in that shape
(and never with a stack trace): handlers answer `error_response`, the server's own errors
(unknown path or method, malformed request, a handler's bug) go through `server_error`.
"""

from __future__ import annotations

from gateway.http import Response, json_response


def error_response(status: int, message: str, *, type: str, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return json_response(body, status, headers)


def server_error(status: int, message: str, code: str) -> Response:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return error_response(status, message, type=kind, code=code)
