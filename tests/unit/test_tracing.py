"""Tracing is on only when an OTLP endpoint is configured, and off installs nothing: no
interceptor, no middleware, not even an OpenTelemetry import in turnout's processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from turnout import tracing


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"},
     False),
])
def test_traces_are_wanted_only_with_an_endpoint(env: dict[str, str], on: bool) -> None:
    assert tracing.wanted(env) is on


def test_off_installs_nothing() -> None:
    """Built as each process builds itself, with no endpoint in the environment."""
    code = """
import os, sys
for name in list(os.environ):
    if name.startswith("OTEL_"):
        del os.environ[name]
from turnout import tracing
from turnout.config import ModelSwitchingConfig
from turnout.runtime import temporal_interceptors
from workers.tracing import worker_interceptors
import api.app, gateway.app, workers.control, workers.engine, workers.monitor
assert not tracing.setup_tracing("unit")
assert tracing.tracer() is None
assert temporal_interceptors() == [] and worker_interceptors() == []
settings = ModelSwitchingConfig.from_env({}, gateway_trace_sample=1.0)
app = api.app.create_app(settings)
assert not [m for m in app.user_middleware if m.cls.__name__ == "TracingMiddleware"]
client = gateway.app.create_app(settings, store=None, gateway_id="unit")
assert client.middlewares == []  # no client keys, no tracing: none
assert not gateway.app.gateway_of(client).proxy.traced
admin = gateway.app.create_admin_app(gateway.app.gateway_of(client), None)
assert len(admin.middlewares) == 1  # admin auth only: no tracing
headers = {}
tracing.inject(headers)
assert headers == {}
assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_trace_share_without_tracing_on_changes_nothing() -> None:
    """`GATEWAY_TRACE_SAMPLE` alone (no endpoint) must not put tracing on the hot path."""
    from gateway.app import create_app, gateway_of
    from turnout.config import ModelSwitchingConfig

    assert tracing.tracer() is None
    app = create_app(ModelSwitchingConfig.from_env({}, gateway_trace_sample=0.5),
                     store=None, gateway_id="unit")  # type: ignore[arg-type]
    assert gateway_of(app).tracer is None and not gateway_of(app).proxy.traced
