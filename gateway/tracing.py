"""Spans of the gateway when tracing is on (`turnout.tracing`).

- Admin listener: every call (`POST /admin/routes/refresh` from a traffic activity,
  `GET /admin/stats` from a verdict), joined to the caller's trace by its `traceparent`:
  a switch's trace shows each gateway applying its routes.
- Client listener: only with `GATEWAY_TRACE_SAMPLE` > 0, a sampled share of requests
  (and every request that arrives with a `traceparent`), each span naming the model and
  the version that answered; the engine call carries the span's `traceparent` on, so an
  engine that traces (vLLM's `--otlp-traces-endpoint`) continues the trace. With a share
  of 0 the middleware is not installed at all.

aiohttp middlewares over the OpenTelemetry API (the contrib aiohttp instrumentation on
the package index cannot be installed beside the SDK vLLM brings, see `api.tracing`).
"""

from __future__ import annotations

import random

from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from gateway.errors import Handler
from gateway.proxy import MODEL_KEY, VERSION_HEADER
from turnout import tracing


def traced_requests(tracer: Tracer, sample: float) -> web.Middleware:
    """A span for `sample` of the requests (1.0: all); the others pass untouched."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if "traceparent" not in request.headers and random.random() >= sample:
            return await handler(request)
        return await _in_span(tracer, request, handler)

    return middleware


def traced_admin(tracer: Tracer) -> web.Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _in_span(tracer, request, handler)

    return middleware


async def _in_span(tracer: Tracer, request: web.Request,
                   handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.resource
    path = route.canonical if route is not None else request.path
    with tracer.start_as_current_span(
            f"{request.method} {path}", context=tracing.extract(request.headers),
            kind=SpanKind.SERVER, record_exception=True,
            attributes={"http.request.method": request.method, "url.path": request.path,
                        "http.route": path}) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        model_id = request.get(MODEL_KEY)
        if model_id is not None:
            span.set_attribute(tracing.MODEL_ID, model_id)
        version = response.headers.get(VERSION_HEADER)
        if version is not None:
            span.set_attribute(tracing.VERSION, version)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return response
