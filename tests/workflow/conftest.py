"""Time-skipping Temporal test server and activity doubles: the one place doubles belong."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest_asyncio
from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from turnout import contracts as c
from turnout.domain import Alert, EngineInfo, EngineState
from turnout.runtime import installed_binary
from workers.stack import SEARCH_ATTRIBUTES
from workflows import WORKFLOWS

ENGINE_QUEUE = "turnout-engines-test"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def time_env() -> AsyncIterator[WorkflowEnvironment]:
    async with time_skipping_server() as env:
        yield env


@asynccontextmanager
async def time_skipping_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=installed_binary("temporal-test-server"),
        data_converter=pydantic_data_converter)
    # The workflow upserts these; without them it would hang on "not defined".
    await env.client.operator_service.add_search_attributes(AddSearchAttributesRequest(
        namespace=env.client.namespace,
        search_attributes={name: getattr(IndexedValueType, f"INDEXED_VALUE_TYPE_{kind.upper()}")
                           for name, kind in SEARCH_ATTRIBUTES.items()}))
    try:
        yield env
    finally:
        await env.shutdown()


@dataclass
class FakeCluster:
    """Records what the workflow asked for; `fail_load` / `unhealthy` inject failures."""

    live_version: str | None = None
    fail_load: str | None = None
    unhealthy: bool = False
    # Outcomes `judge_health` returns in turn; "healthy" once they run out.
    verdicts: list[str] = field(default_factory=list)
    slow_load: bool = False
    # A verdict as a real judgment returns it (figures, analysis): its outcome and
    # window are replaced; None: a small one.
    real_verdict: c.Verdict | None = None
    # Set: `judge_health` answers only once it is set (a look still being judged).
    judging: asyncio.Event | None = None
    alerts: list[Alert] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    routes: list[dict[str, float]] = field(default_factory=list)
    loaded: set[str] = field(default_factory=set)
    change_keys: set[str] = field(default_factory=set)
    # (version, percent) of each mirror change applied, and versions the route serves.
    mirrors: list[tuple[str, float]] = field(default_factory=list)
    serving: list[str] = field(default_factory=list)
    # Holders per version, as the store would count them; the replaced version stands by
    # for this long after a switch (0: it is let go at once).
    holders: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    standby_minutes: float = 0
    warm: set[str] = field(default_factory=set)
    # Injected failures: (activity name, which inputs, the error, how many times left).
    faults: list[list[Any]] = field(default_factory=list)

    def fail(self, name: str, error: Exception, *, times: int = 1,
             when: Callable[[Any], bool] = lambda _input: True) -> None:
        """Make the next `times` calls of activity `name` whose input `when` accepts raise
        `error` (the call is still recorded)."""
        self.faults.append([name, when, error, times])

    def _fault(self, name: str, input: Any) -> None:
        self.calls.append((name, input))
        for fault in self.faults:
            if fault[0] == name and fault[3] > 0 and fault[1](input):
                fault[3] -= 1
                raise fault[2]

    def _slot(self, version: str) -> c.EngineSlot:
        return c.EngineSlot(model_id="m", version=version, host_id="test",
                            task_queue=ENGINE_QUEUE)

    def _unheld(self, version: str) -> list[c.EngineSlot]:
        return [] if self.holders.get(version) else [self._slot(version)]

    def activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name=c.DESCRIBE_MODEL)
        async def describe_model(input: c.DescribeModelInput) -> c.ModelSnapshot:
            self._fault(c.DESCRIBE_MODEL, input)
            return c.ModelSnapshot(model_id=input.model_id, live_version=self.live_version,
                                   target_exists=True, serving_versions=self.serving)

        @activity.defn(name=c.LOAD_VERSION)
        async def load_version(input: c.LoadVersionInput) -> c.LoadVersionResult:
            self.calls.append((c.LOAD_VERSION, input))
            while self.slow_load:  # until cancelled, like a big model loading
                activity.heartbeat()
                await asyncio.sleep(0.1)
            if input.version == self.fail_load:
                raise ApplicationError("config.json is not valid JSON", type="ModelLoadError",
                                       non_retryable=True)
            self.loaded.add(input.version)
            return c.LoadVersionResult(engine=EngineInfo(
                model_id=input.model_id, version=input.version, host="test",
                url="http://127.0.0.1:1", served_model_name="x", state=EngineState.READY))

        @activity.defn(name=c.UNLOAD_VERSION)
        async def unload_version(input: c.UnloadVersionInput) -> None:
            self.calls.append((c.UNLOAD_VERSION, input))
            if input.when == "unheld" and self.holders.get(input.version):
                return
            self.loaded.discard(input.version)

        @activity.defn(name=c.PLACE_VERSION)
        async def place_version(input: c.PlaceVersionInput) -> c.PlaceVersionResult:
            self._fault(c.PLACE_VERSION, input)
            if input.holder is not None:
                self.holders.setdefault(input.version, set()).add(
                    (input.holder.kind.value, input.holder.holder_id))
            return c.PlaceVersionResult(replicas=[self._slot(input.version)],
                                        warm=input.version in self.warm)

        @activity.defn(name=c.RELEASE_VERSION)
        async def release_version(input: c.ReleaseVersionInput) -> c.ReleaseVersionResult:
            self.calls.append((c.RELEASE_VERSION, input))
            self.holders.get(input.version, set()).discard(
                (input.kind.value, input.holder_id))
            return c.ReleaseVersionResult(stop=self._unheld(input.version))

        @activity.defn(name=c.RETIRE_VERSION)
        async def retire_version(input: c.RetireVersionInput) -> c.RetireVersionResult:
            self.calls.append((c.RETIRE_VERSION, input))
            held = self.holders.setdefault(input.version, set())
            held.discard(("serving", "m"))
            if self.standby_minutes <= 0:
                return c.RetireVersionResult(stop=self._unheld(input.version))
            held.add(("standby", input.operation_id))
            now = activity.info().current_attempt_scheduled_time  # the server's clock
            return c.RetireVersionResult(standby_until=now + timedelta(
                minutes=self.standby_minutes))

        @activity.defn(name=c.SET_TRAFFIC)
        async def set_traffic(input: c.SetTrafficInput) -> c.SetTrafficResult:
            self._fault(c.SET_TRAFFIC, input)
            if input.change_key not in self.change_keys:
                self.change_keys.add(input.change_key)
                self.routes.append(dict(input.weights))
            return c.SetTrafficResult(generation=len(self.routes))

        @activity.defn(name=c.SET_MIRROR)
        async def set_mirror(input: c.SetMirrorInput) -> c.SetTrafficResult:
            self.calls.append((c.SET_MIRROR, input))
            if input.change_key not in self.change_keys:
                self.change_keys.add(input.change_key)
                self.mirrors.append((input.version, input.percent))
            return c.SetTrafficResult(generation=len(self.mirrors))

        @activity.defn(name=c.DRAIN_VERSION)
        async def drain_version(input: c.DrainVersionInput) -> c.DrainVersionResult:
            self._fault(c.DRAIN_VERSION, input)
            return c.DrainVersionResult()

        @activity.defn(name=c.CHECK_HEALTH)
        async def check_health(input: c.CheckHealthInput) -> c.HealthVerdict:
            self.calls.append((c.CHECK_HEALTH, input))
            return c.HealthVerdict(healthy=not self.unhealthy,
                                   reason="HTTP 500" if self.unhealthy else "answered")

        @activity.defn(name=c.JUDGE_HEALTH)
        async def judge_health(input: c.JudgeHealthInput) -> c.Verdict:
            self._fault(c.JUDGE_HEALTH, input)
            if self.judging is not None:
                await self.judging.wait()
            outcome = self.verdicts.pop(0) if self.verdicts else "healthy"
            reason = {"healthy": "p95 800 ms, errors 0.1% over 300 requests",
                      "unhealthy": "error rate 12.0% > 5.0% limit",
                      "inconclusive": "only 3 requests, need 20"}[outcome]
            if self.real_verdict is not None:
                return self.real_verdict.model_copy(update={
                    "outcome": outcome, "reason": reason, "window_start": input.window_start,
                    "window_end": input.window_end})
            return c.Verdict(outcome=outcome, reason=reason,
                             window_start=input.window_start, window_end=input.window_end,
                             analysis={"compared": input.compare})

        @activity.defn(name=c.RAISE_ALERT)
        async def raise_alert(alert: Alert) -> Alert:
            self._fault(c.RAISE_ALERT, alert)
            self.alerts.append(alert)
            return alert

        @activity.defn(name=c.MARK_LIVE)
        async def mark_live(input: c.MarkLiveInput) -> None:
            self._fault(c.MARK_LIVE, input)
            self.live_version = input.version
            self.holders[input.version] = {("serving", "m")}

        @activity.defn(name=c.RECORD_OPERATION)
        async def record_operation(input: c.RecordOperationInput) -> None:
            self._fault(c.RECORD_OPERATION, input)

        @activity.defn(name=c.REFRESH_ROUTE)
        async def refresh_route(input: c.RefreshRouteInput) -> c.SetTrafficResult:
            self.calls.append((c.REFRESH_ROUTE, input))
            return c.SetTrafficResult(generation=len(self.routes))

        @activity.defn(name=c.RESOLVE_ALERT)
        async def resolve_alert(input: c.ResolveAlertInput) -> Alert | None:
            self.calls.append((c.RESOLVE_ALERT, input))
            self.alerts = [a for a in self.alerts
                           if (a.model_id, a.version, a.type) !=
                           (input.model_id, input.version, input.type)]
            return None

        return [describe_model, load_version, unload_version, set_traffic, set_mirror,
                drain_version, check_health, judge_health, raise_alert, mark_live,
                record_operation, place_version, release_version, retire_version,
                refresh_route, resolve_alert]

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@dataclass
class Harness:
    env: WorkflowEnvironment
    cluster: FakeCluster
    task_queue: str

    def workers(self) -> tuple[Worker, Worker]:
        acts = self.cluster.activities()
        engine = [a for a in acts if a.__name__ in (c.LOAD_VERSION, c.UNLOAD_VERSION)]
        control = Worker(self.env.client, task_queue=self.task_queue, workflows=WORKFLOWS,
                         activities=[a for a in acts if a not in engine])
        engines = Worker(self.env.client, task_queue=ENGINE_QUEUE, activities=engine)
        return control, engines


@pytest_asyncio.fixture(loop_scope="session")
async def harness(time_env: WorkflowEnvironment) -> Harness:
    return Harness(time_env, FakeCluster(), f"control-{uuid.uuid4()}")


@pytest_asyncio.fixture(loop_scope="session")
async def own_harness() -> AsyncIterator[Harness]:
    """A harness on a time-skipping server of its own, for a test that mixes real time
    (`auto_time_skipping_disabled`) with skipped time: the server has been seen to stay
    locked after such a test (later tests then ran their timers in real time)."""
    async with time_skipping_server() as env:
        yield Harness(env, FakeCluster(), f"control-{uuid.uuid4()}")
