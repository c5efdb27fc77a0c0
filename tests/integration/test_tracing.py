"""One switch, one trace: with tracing on, `POST /switch` in the API, the workflow on the
control worker, each of its activities (with model, version and step) and the gateway
applying the routes those activities write are spans of one trace; a sampled client
request through the gateway is traced with its model and version, and its engine call
carries the trace on.

A real control plane (`tests/integration/plane.py`: Temporal dev server, API, workers and
gateway in this process, fake external engines) with the OpenTelemetry SDK's in-memory
exporter in place of OTLP. The trace context crosses Temporal (headers through the
server), HTTP into the API, and HTTP from the activities to the gateway's admin listener.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.integration.plane import (
    ControlPlane,
    control_plane,
    first_version_live,
    traffic,
    wait_done,
)
from turnout import tracing

pytestmark = pytest.mark.asyncio(loop_scope="session")

ARCH, STAGE = "TracedArch", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"
EXPORTER = InMemorySpanExporter()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    assert tracing.setup_tracing("test", exporter=EXPORTER)
    try:
        async with control_plane(tmp_path_factory.mktemp("traced"), latency_tolerance=3.0,
                                 gateway_trace_sample=1.0) as plane:
            yield plane
    finally:
        tracing.shutdown_tracing()


def _trace(trace_id: int) -> list[ReadableSpan]:
    return [s for s in EXPORTER.get_finished_spans() if s.context.trace_id == trace_id]


def _root_of(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> ReadableSpan:
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
    return span


async def test_a_switch_is_one_trace_from_its_request_to_the_gateways(
        plane: ControlPlane) -> None:
    async with plane.http() as client:
        await first_version_live(plane, client, ARCH, STAGE)
        EXPORTER.clear()
        async with traffic(plane.gateway_url, MODEL_ID):
            response = await client.post("/switch", json={
                "model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
                "strategy_config": {"initial_percentage": 50, "step_percentage": 50,
                                    "evaluation_period_minutes": 0.05}})
            assert response.status_code == 202, response.text
            operation_id = response.json()["operation_id"]
            status = await wait_done(client, operation_id)
    assert status["outcome"] == "promoted", status

    requests = [s for s in EXPORTER.get_finished_spans()
                if s.name == "POST /switch" and s.kind is SpanKind.SERVER]
    assert len(requests) == 1, [s.name for s in EXPORTER.get_finished_spans()]
    request = requests[0]
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 202
    spans = _trace(request.context.trace_id)
    by_id = {s.context.span_id: s for s in spans}
    names = [s.name for s in spans]
    # Every span of the trace hangs from the request: nothing is an orphan.
    assert {_root_of(s, by_id).name for s in spans} == {"POST /switch"}, names
    for name in ("StartWorkflow:SwitchWorkflow", "RunWorkflow:SwitchWorkflow",
                 "RunActivity:describe_model", "RunActivity:set_traffic",
                 "RunActivity:mark_live", "RunActivity:record_operation"):
        assert name in names, (name, names)
    start = next(s for s in spans if s.name == "StartWorkflow:SwitchWorkflow")
    assert start.parent is not None and start.parent.span_id == request.context.span_id

    # Activities name the model, the version and the plan step they work on.
    shifts = [s for s in spans if s.name == "RunActivity:set_traffic"]
    steps = sorted(s.attributes["turnout.step"] for s in shifts  # type: ignore[index]
                   if s.attributes and "turnout.step" in s.attributes)
    assert steps == [1, 2], [(s.start_time, dict(s.attributes or {})) for s in shifts]
    for span in shifts:
        assert span.attributes is not None
        assert span.attributes["turnout.model_id"] == MODEL_ID
        assert span.attributes["turnout.operation_id"] == f"switch-{MODEL_ID}"
    mark_live = next(s for s in spans if s.name == "RunActivity:mark_live")
    assert mark_live.attributes is not None
    assert mark_live.attributes["turnout.version"] == "v2"
    describe = next(s for s in spans if s.name == "RunActivity:describe_model")
    assert describe.attributes is not None and describe.attributes["turnout.version"] == "v2"

    # The gateway applied each route in the same trace, called by a set_traffic activity.
    refreshes = [s for s in spans if s.name == "POST /admin/routes/refresh"]
    assert len(refreshes) >= 2, names
    for refresh in refreshes:
        assert refresh.kind is SpanKind.SERVER
        assert refresh.parent is not None
        caller = by_id[refresh.parent.span_id]
        assert caller.name in ("RunActivity:set_traffic", "RunActivity:set_mirror",
                               "RunActivity:drain_version", "RunActivity:refresh_route"), \
            caller.name


async def test_a_sampled_client_request_is_traced_to_the_engine(plane: ControlPlane) -> None:
    import httpx

    EXPORTER.clear()
    upstream = plane.upstreams["v2"]
    seen = len(upstream.headers)
    async with httpx.AsyncClient(base_url=plane.gateway_url, timeout=30) as gateway:
        answer = await gateway.post("/v1/completions", json={"model": MODEL_ID,
                                                             "prompt": "hi"})
    assert answer.status_code == 200, answer.text
    spans = [s for s in EXPORTER.get_finished_spans() if s.name == "POST /v1/completions"]
    assert len(spans) == 1, [s.name for s in EXPORTER.get_finished_spans()]
    span = spans[0]
    assert span.attributes is not None
    assert span.attributes["turnout.model_id"] == MODEL_ID
    assert span.attributes["turnout.version"] == "v2"
    assert span.attributes["http.response.status_code"] == 200
    # The engine got the span's trace context (W3C traceparent: version-trace-span-flags).
    sent = upstream.headers[seen:]
    assert len(sent) == 1
    traceparent = {k.lower(): v for k, v in sent[0].items()}["traceparent"]
    assert traceparent.split("-")[1] == f"{span.context.trace_id:032x}"
    assert traceparent.split("-")[2] == f"{span.context.span_id:016x}"
