"""OpenTelemetry traces of turnout's processes: on when an OTLP endpoint is configured
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), off otherwise.

Off means nothing is installed: no tracer, no interceptor on the Temporal client or the
workers, no middleware in the API or the gateway, and the OpenTelemetry packages are not
even imported. On, each process exports its spans over OTLP (`OTEL_EXPORTER_OTLP_PROTOCOL`
`http/protobuf`, the default, or `grpc`) under the service name `turnout-<role>`
(`OTEL_SERVICE_NAME` overrides it), and one switch reads as one trace: `POST /switch` in
the API, the workflow and each of its activities on the workers (Temporal's
`TracingInterceptor` carries the context through the server), the gateways' route
refreshes those activities ask for, and a sampled share of client requests through the
gateway (`GATEWAY_TRACE_SAMPLE`) with their engine calls.

This module holds the process-wide switch and W3C trace-context helpers; the Temporal
interceptors are set up in `turnout.runtime` and `workers.tracing`, the HTTP middlewares
in `api.tracing` and `gateway.tracing`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported only when tracing is on
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# Span attributes turnout adds, beside OpenTelemetry's HTTP ones.
MODEL_ID, VERSION, STEP, OPERATION = ("turnout.model_id", "turnout.version",
                                      "turnout.step", "turnout.operation_id")

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint is set and the SDK is
    not disabled (`OTEL_SDK_DISABLED=true`)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def setup_tracing(role: str, *, exporter: SpanExporter | None = None,
                  env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on for this process if the environment asks for it (or an `exporter`
    is given: tests pass the SDK's in-memory one, whose spans are exported at once).
    Returns whether tracing is on. Idempotent: a second call changes nothing."""
    global _provider, _tracer
    if _tracer is not None:
        return True
    if exporter is None and not wanted(env):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"turnout-{role}"}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(env or os.environ)))
    _provider, _tracer = provider, provider.get_tracer("turnout")
    log.info("tracing on: spans of turnout-%s exported over OTLP", role)
    return True


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )
    return HttpExporter()


def shutdown_tracing() -> None:
    """Flush and end tracing (a process that stops; a test that is done)."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def tracer() -> Tracer | None:
    """This process's tracer, or None when tracing is off."""
    return _tracer


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's W3C `traceparent` (and `tracestate`) to outgoing headers;
    nothing when tracing is off or no span is current."""
    if _tracer is None:
        return
    from opentelemetry.propagate import inject as otel_inject

    otel_inject(headers)


def extract(headers: Mapping[str, str]) -> Any:
    """The context an incoming request's `traceparent` carries (for a server span)."""
    from opentelemetry.propagate import extract as otel_extract

    return otel_extract(headers)
