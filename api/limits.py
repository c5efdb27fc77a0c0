"""The API's request body limit: a body over `api_max_body_bytes` is a 413 before it is read
into memory.

ASGI middleware, so it holds for every route: a declared `Content-Length` over the limit
is answered at once; a body sent without one (chunked) is counted chunk by chunk as the
app reads it, and reading stops at the first chunk past the limit.
"""

from __future__ import annotations

from fastapi import HTTPException, status
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        # The rest of the body is not read: the connection is closed after the answer.
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE,
                         f"the request body is larger than the API's limit of {limit} bytes "
                         f"(VLLM_MODEL_SWITCHING_API_MAX_BODY_BYTES)",
                         headers={"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:  # raised where no exception handler turned it into a response
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = BodyTooLarge(self.limit)
        response = JSONResponse({"detail": error.detail}, error.status_code,
                                headers=error.headers)
        await response(scope, receive, send)
