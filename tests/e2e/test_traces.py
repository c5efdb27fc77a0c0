"""Traces over OTLP from the stack's own processes: with `OTEL_EXPORTER_OTLP_ENDPOINT` set,
the API, the control worker and the gateway (each its own process, started as `make run`
starts them) export their spans to a collector, and one switch is one trace across them.

The collector is a real OTLP/HTTP endpoint made for the test (it decodes the protobuf
export requests); the versions are fake external engines, so no vLLM engine runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from tests.integration.plane import wait_done
from tests.integration.upstream import FakeUpstream, register_fakes
from turnout.config import ModelSwitchingConfig
from workers.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

MODEL_ID = "Traced_chat"
# Ports of this module only (below the ephemeral range, apart from the other modules').
PORTS = {"temporal": 19333, "api": 19301, "gateway": 19300, "admin": 19302,
         "collector": 19318}


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


class Collector:
    """An OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf), keeping every span."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._runner: web.AppRunner | None = None

    async def start(self, port: int) -> str:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "?")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(ReceivedSpan(
                        service, span.name, span.trace_id.hex(), span.span_id.hex(),
                        span.parent_span_id.hex(),
                        {a.key: _value(a.value) for a in span.attributes}))
        return web.Response(body=b"", content_type="application/x-protobuf")


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    receiver = Collector()
    url = await receiver.start(PORTS["collector"])
    yield receiver, url
    await receiver.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def traced_stack(tmp_path_factory: pytest.TempPathFactory,
                       collector: tuple[Collector, str]) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("traced-stack")
    settings = ModelSwitchingConfig.from_env(
        {}, state_dir=str(root), database_url=f"sqlite+aiosqlite:///{root}/turnout.db",
        allow_private_endpoints=True, temporal_address=f"127.0.0.1:{PORTS['temporal']}",
        api_port=PORTS["api"], gateway_port=PORTS["gateway"],
        gateway_admin_port=PORTS["admin"], engine_port_start=19310, engine_port_end=19317,
        engine_host="traced", gateway_trace_sample=0.01)
    stack = Stack(settings=settings, temporal_db=root / "temporal.db", log_dir=root / "logs",
                  temporal_ui_port=19334, headless=True,
                  extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector[1],
                             "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                             "OTEL_BSP_SCHEDULE_DELAY": "200"})
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


async def until(check: Any, what: str, timeout_s: float = 60) -> Any:
    for _ in range(int(timeout_s * 5)):
        found = check()
        if found:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"never: {what}")


async def test_one_switch_is_one_trace_across_the_stacks_processes(
        traced_stack: Stack, collector: tuple[Collector, str]) -> None:
    received = collector[0]
    upstreams = {v: await FakeUpstream(v, f"served-{v}").start() for v in ("v1", "v2")}
    try:
        async with httpx.AsyncClient(base_url=traced_stack.api_url, timeout=30) as client:
            await register_fakes(client, upstreams, "Traced", "chat")
            response = await client.post("/switch", json={"model_id": MODEL_ID,
                                                           "target_version": "v1"})
            assert response.status_code == 202, response.text
            status = await wait_done(client, response.json()["operation_id"])
        assert status["outcome"] == "promoted", status

        request = await until(lambda: next(
            (s for s in received.spans if s.name == "POST /switch"), None),
            "the API's POST /switch span")
        assert request.service == "turnout-api"
        assert request.attributes["http.response.status_code"] == 202

        def services() -> dict[str, set[str]]:
            found: dict[str, set[str]] = {}
            for span in received.spans:
                if span.trace_id == request.trace_id:
                    found.setdefault(span.service, set()).add(span.name)
            return found

        wanted = {"turnout-api": "StartWorkflow:SwitchWorkflow",
                  "turnout-control-worker": "RunActivity:set_traffic",
                  "turnout-gateway": "POST /admin/routes/refresh"}
        await until(lambda: all(name in services().get(service, set())
                                for service, name in wanted.items()),
                    f"spans {wanted} in one trace; got {services()}")
        assert "RunWorkflow:SwitchWorkflow" in services()["turnout-control-worker"]
        shift = next(s for s in received.spans
                     if s.trace_id == request.trace_id and s.name == "RunActivity:set_traffic")
        assert shift.attributes["turnout.model_id"] == MODEL_ID
        assert shift.attributes["turnout.step"] == 1

        # A client request that brings its own trace is traced by the gateway whatever its
        # share (1% here), and its engine call carries the trace on.
        trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        async with httpx.AsyncClient(base_url=traced_stack.gateway_url, timeout=30) as gw:
            answer = await gw.post("/v1/completions", json={"model": MODEL_ID, "prompt": "hi"},
                                   headers={"traceparent": f"00-{trace_id}-{parent}-01"})
        assert answer.status_code == 200, answer.text
        served = await until(lambda: next(
            (s for s in received.spans if s.trace_id == trace_id), None),
            "the gateway's span of the client's trace")
        assert served.service == "turnout-gateway" and served.name == "POST /v1/completions"
        assert served.parent_span_id == parent
        assert served.attributes["turnout.version"] == "v1"
        sent = {k.lower(): v for k, v in upstreams["v1"].headers[-1].items()}
        assert sent["traceparent"].split("-")[1:3] == [trace_id, served.span_id]
    finally:
        for upstream in upstreams.values():
            await upstream.stop()
