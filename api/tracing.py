"""Server spans of the REST API when tracing is on (`turnout.tracing`): one span per HTTP
request, named by method and route template (`POST /switch`), joined to the caller's
trace when it sends a W3C `traceparent`. The Temporal client's `TracingInterceptor` makes
the workflow it starts a child of this span, so a switch is one trace from its request on.

A plain ASGI middleware over the OpenTelemetry API, added only when tracing is on. (The
contrib FastAPI instrumentation on the package index, 0.66b1, pins opentelemetry-api
1.45.1 and semantic-conventions 0.66b1, while the SDK installed beside vLLM, 1.45.2, pins
1.45.2 and 0.66b2: they cannot be installed together.)
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from turnout import tracing

Scope = dict[str, Any]


class TracingMiddleware:
    def __init__(self, app: Any, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        status = 500  # what the client sees if the app fails before it answers

        async def send_traced(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
                f"{method} {scope['path']}", context=tracing.extract(headers),
                kind=SpanKind.SERVER, record_exception=True,
                attributes={"http.request.method": method, "url.path": scope["path"]}) as span:
            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:  # the template (`/switch/operations/{operation_id}`), once routed
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
