"""Spans of the gateway when tracing is on (`turnout.tracing`).

- Admin listener: every call (`POST /admin/routes/refresh` from a traffic
  activity, `GET /admin/stats` from a verdict), joined to the caller's trace by its
  `traceparent`: a switch's trace shows each gateway applying its routes.
- Client listener: only with `GATEWAY_TRACE_SAMPLE` > 0, a sampled share
  of requests (and every request that arrives with a `traceparent`), each span naming the
  model and the version that answered; the engine call carries the span's `traceparent`
  on, so an engine that traces (vLLM's `--otlp-traces-endpoint`) continues the trace. With
  a share of 0 the middleware is not installed at all.

A middleware of `gateway.http` over the OpenTelemetry API.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from gateway.http import AnyResponse, Handler, Middleware, Request
from gateway.proxy import MODEL_KEY, VERSION_HEADER
from turnout import tracing


def traced_requests(tracer: Tracer, sample: float) -> Middleware:
    """A span for `sample` of the requests (1.0: all, as on the admin listener); the others
    pass untouched."""

    async def middleware(request: Request, handler: Handler) -> AnyResponse:
        if "traceparent" not in request.headers and random.random() >= sample:
            return await handler(request)
        # The gateway's paths are fixed: each is its own route.
        with tracer.start_as_current_span(
                f"{request.method} {request.path}", context=tracing.extract(request.headers),
                kind=SpanKind.SERVER, record_exception=True,
                attributes={"http.request.method": request.method, "url.path": request.path,
                            "http.route": request.path}) as span:
            response = await handler(request)
            _answered(span, response.status, response.headers, request.state.get(MODEL_KEY))
            return response

    return middleware


def _answered(span: Span, status: int, headers: Mapping[str, str],
              model_id: str | None) -> None:
    span.set_attribute("http.response.status_code", status)
    if model_id is not None:
        span.set_attribute(tracing.MODEL_ID, model_id)
    version = headers.get(VERSION_HEADER)
    if version is not None:
        span.set_attribute(tracing.VERSION, version)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
