"""Canaries on real parts: promote, automatic rollback, operator rollback, and canaries that
survive SIGKILL of both workers and of the Temporal server (during an evaluation period and
during a traffic shift), all under client load.

Two real vLLM engines serve v1 and v2; the broken and extra candidates are external
endpoints (real HTTP servers made for the test) so that no more engines must load.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from tests.e2e import client as e2e
from tests.e2e.client import Load, api, status, wait_end, wait_phase
from tests.integration.upstream import FakeUpstream
from turnout.config import ModelSwitchingConfig
from turnout.store import Store
from turnout.telemetry.catalogue import DEFAULT_GUARDED
from workers.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

MODEL_ID = "Rollout_chat"


async def crash_orchestration(stack: Stack, client: Load, *, outage_s: float,
                              while_down: Callable[[], None] | None = None) -> None:
    """SIGKILL both workers and the Temporal server, check that the gateway keeps serving
    the current split for `outage_s` without a failure, then restart them all."""
    for name in ("control-worker", "engine-worker", "temporal"):
        stack.kill_process(name, signal.SIGKILL)
    if while_down is not None:
        while_down()
    served_before = len(client.served)
    await asyncio.sleep(outage_s)
    assert len(client.served) > served_before and client.failures == []
    stack.start_process("temporal")
    await stack.wait_for_port(stack.settings.temporal_address, "temporal")
    stack.start_process("engine-worker")
    stack.start_process("control-worker")


def load(stack: Stack) -> AbstractAsyncContextManager[Load]:
    return e2e.load(stack.gateway_url, MODEL_ID)


async def start(stack: Stack, version: str, strategy: str, config: dict[str, Any],
                **request: Any) -> str:
    return await e2e.start(stack, MODEL_ID, version, strategy, config, **request)


async def register(stack: Stack, version: str, **fields: Any) -> None:
    r = await api(stack, "POST", "/models", json={
        "model_arch": "Rollout", "model_stage": "chat", "version": version, **fields})
    assert r.status_code == 201, r.text


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fakes() -> AsyncIterator[dict[str, FakeUpstream]]:
    upstreams = {
        "v3-broken": await FakeUpstream("v3-broken", "broken", fail_fraction=0.5).start(),
        "v4": await FakeUpstream("v4", "v4").start(),
        "v5": await FakeUpstream("v5", "v5").start(),
        "v6": await FakeUpstream("v6", "v6").start(),
    }
    yield upstreams
    for upstream in upstreams.values():
        await upstream.stop()


async def test_v1_goes_live(stack: Stack, tiny_models: dict[str, Path],
                            fakes: dict[str, FakeUpstream]) -> None:
    await register(stack, "v1", model=str(tiny_models["tiny-v1"]))
    await register(stack, "v2", model=str(tiny_models["tiny-v2"]))
    for version, upstream in fakes.items():
        await register(stack, version, model=version, endpoint=upstream.url,
                       served_model_name=upstream.served_model_name)
    s = await wait_end(stack, await start(stack, "v1", "immediate", {}))
    assert s["status"] == "completed", s


async def test_the_monitor_measures_the_live_engine(stack: Stack) -> None:
    """The health monitor reads the real vLLM engine's process tree on its host and its
    own /metrics, next to the gateway's figures."""
    async with load(stack):
        for _ in range(120):
            report = (await api(stack, "GET", f"/health/models/{MODEL_ID}")).json()
            v1 = next((v for v in report["versions"] if v["version"] == "v1"), None)
            if v1 and v1["engines"] and v1["figures"]["requests"] >= 10:
                break
            await asyncio.sleep(1)
        else:
            raise AssertionError(f"no measured look at v1: {report}")
    # Judged on its figures (its state also depends on how busy this machine's cores are:
    # a CPU engine under load may cross the CPU levels, which is what they are for).
    assert v1["role"] == "live" and v1["state"] != "no_data", v1
    assert v1["figures"]["error_rate"] == 0 and v1["figures"]["latency_p95_ms"] > 0
    [engine] = v1["engines"]
    # A tiny model's engine (API process plus engine core) holds well over 100 MB.
    assert engine["memory_mb"] > 100 and 0 < engine["memory_percent"] < 100
    assert 0 <= engine["cpu_percent"] <= 100 and engine["queued_requests"] is not None
    assert v1["figures"]["memory_mb"] == engine["memory_mb"]
    assert report["thresholds"]["error_rate_warning"] == stack.settings.error_rate_warning


async def openai_answers_during(stack: Stack) -> set[str]:
    """Versions that answered the official `openai` client, streamed and not, keyed by user."""
    seen = set()
    async with openai.AsyncOpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused",
                                  max_retries=0, timeout=120) as client:
        for i in range(12):
            raw = await client.completions.with_raw_response.create(
                model=MODEL_ID, prompt="Hello", max_tokens=4, user=f"openai-{i}")
            assert raw.parse().choices[0].text is not None
            seen.add(raw.headers["x-turnout-version"])
            async with client.chat.completions.with_streaming_response.create(
                    model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=4, stream=True, user=f"openai-{i}") as response:
                lines = [line async for line in response.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            seen.add(response.headers["x-turnout-version"])
    return seen


async def test_a_healthy_canary_promotes_under_load(stack: Stack) -> None:
    """An A/A canary at the default analysis settings: v2 (other weights of the same
    architecture, on an engine started for it while v1 serves) is judged on the default
    guards, warm-up left out, and promoted."""
    async with load(stack) as client:
        operation_id = await start(stack, "v2", "canary", {
            "initial_percentage": 50, "step_percentage": 50,
            "evaluation_period_minutes": 0.4})
        await wait_phase(stack, operation_id, "evaluating")
        # 12 keyed users on a 50/50 split: both versions answer (all on one: p < 0.001).
        assert await openai_answers_during(stack) == {"v1", "v2"}
        s = await wait_end(stack, operation_id)
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), \
        f"{explain(s)}\nas the client saw it:\n{client.latency_slices()}"
    assert judged(s) == ["healthy"], explain(s)
    defaults = ModelSwitchingConfig()
    for verdict in s["verdicts"]:
        metrics = verdict["analysis"]["metrics"]
        assert tuple(metrics) == DEFAULT_GUARDED, metrics
        assert metrics["latency_p95"]["tolerance"] == defaults.latency_tolerance
        assert metrics["latency_p95"]["tolerance_ms"] == defaults.latency_tolerance_ms
    # The healthy verdict compared the target with v1 on its error rate and p95 (the
    # few streamed answers may be too few for time to first token: noted, not compared).
    [healthy] = [v for v in s["verdicts"] if v["outcome"] == "healthy"]
    assert all(healthy["analysis"]["metrics"][name]["compared"]
               for name in ("error_rate", "latency_p95")), healthy["analysis"]["metrics"]
    # The fresh engine's first requests were left out of its first judged window.
    warmup = s["verdicts"][0]["analysis"]["warmup"]
    assert warmup["requests"] == defaults.warmup_requests
    assert warmup["excluded"] > 0, warmup
    assert client.failures == []
    assert {"v1", "v2"} <= set(client.served)


async def test_an_erroring_target_is_rolled_back_automatically(stack: Stack) -> None:
    async with load(stack) as client:
        operation_id = await start(stack, "v3-broken", "canary", {
            "initial_percentage": 50, "step_percentage": 50,
            "evaluation_period_minutes": 0.2})
        s = await wait_end(stack, operation_id)
        after = len(client.served)
        await asyncio.sleep(2)
    assert (s["status"], s["outcome"]) == ("failed", "rolled_back"), explain(s)
    assert "error rate" in s["reason"] and "automatic rollback" in s["reason"]
    assert s["weights"] == {"v2": 100.0}
    alerts = (await api(stack, "GET", "/alerts", params={"model_id": MODEL_ID})).json()
    assert [(a["severity"], a["version"]) for a in alerts
            if a["operation_id"] == operation_id] == [("critical", "v3-broken")]
    # The broken version's 500s were retried on the stable version: no client saw one,
    # and the broken version was charged every failure (which rolled it back).
    assert client.failures == []
    assert set(client.served[after:]) == {"v2"}
    async with httpx.AsyncClient(base_url=stack.gateway_url) as gateway:
        metrics = (await gateway.get("/metrics")).text
    assert f'turnout_gateway_failovers_total{{model_id="{MODEL_ID}",to="v2",' \
           'version="v3-broken"}' in metrics
    # The health monitor saw it too, on its own: an error-rate alert for the candidate,
    # resolved once the rollback took it out of the route.
    monitor_alerts = []
    for state in ("firing", "resolved"):
        monitor_alerts += (await api(stack, "GET", "/alerts", params={
            "model_id": MODEL_ID, "state": state})).json()
    assert any(a["type"] == "error_rate" and a["version"] == "v3-broken"
               for a in monitor_alerts), monitor_alerts


async def test_an_operator_rollback_mid_canary(stack: Stack) -> None:
    async with load(stack) as client:
        operation_id = await start(stack, "v4", "canary", {
            "initial_percentage": 30, "step_percentage": 30,
            "evaluation_period_minutes": 30})
        await wait_phase(stack, operation_id, "evaluating")
        # The rollback may come within a few of the client's requests: wait for one to v4.
        await client.wait_served_by("v4")
        r = await api(stack, "POST", f"/switch/operations/{operation_id}/rollback",
                      json={"reason": "dashboards look odd", "requested_by": "alice"})
        assert r.status_code == 200, r.text
        s = await wait_end(stack, operation_id)
        after = len(client.served)
        await asyncio.sleep(1)
    assert (s["status"], s["outcome"]) == ("failed", "rolled_back"), explain(s)
    assert "dashboards look odd" in s["reason"]
    assert client.failures == []
    assert set(client.served[after:]) == {"v2"}


def explain(status: dict[str, Any]) -> str:
    """An operation's end in a few lines: pytest cuts a long status dict before the reason."""
    verdicts = "\n".join(f"  {v['outcome']}: {v['reason']}; target {v['target']}; "
                         f"stable {v['stable']}" for v in status.get("verdicts", []))
    return (f"{status['status']}/{status.get('outcome')}: {status.get('reason')}\n"
            f"verdicts:\n{verdicts}\nweights: {status.get('weights')}")


def judged(status: dict[str, Any]) -> list[str]:
    """The verdicts that decided a step. A window spanning an outage and the restarts may
    hold too few requests at 25 %: that step is extended ("inconclusive"), which is never
    counted as healthy, so one healthy verdict per step is still required."""
    return [v["outcome"] for v in status["verdicts"] if v["outcome"] != "inconclusive"]


async def test_a_canary_survives_sigkill_of_workers_and_temporal(stack: Stack) -> None:
    store = Store.from_url(stack.settings.database_url)
    generations: list[int] = []
    async with load(stack) as client:
        operation_id = await start(stack, "v5", "canary", {
            "initial_percentage": 25, "step_percentage": 25,
            "evaluation_period_minutes": 0.5})
        await wait_phase(stack, operation_id, "evaluating")
        generations.append((await store.get_route(MODEL_ID)).generation)
        await crash_orchestration(stack, client, outage_s=5)
        s = await wait_end(stack, operation_id)
        generations.append((await store.get_route(MODEL_ID)).generation)
    await store.close()
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), explain(s)
    # 25, 50, 75, 100: four shifts after the one seen before the kill, none done twice.
    assert generations[1] - generations[0] == 3
    assert judged(s) == ["healthy"] * 3, s["verdicts"]
    assert client.failures == []


async def test_a_canary_survives_sigkill_in_the_middle_of_a_traffic_shift(
        stack: Stack) -> None:
    """A second real gateway replica is frozen (SIGSTOP) just before a step, so the shift's
    activity has written the new route but still waits for that replica to confirm it; then
    both workers and Temporal are killed. The retried shift must not apply the step again."""
    await e2e.start_gateway_replica(stack, "gateway-replica", port=18003, admin_port=18004,
                                    gateway_id="e2e-replica")
    store = Store.from_url(stack.settings.database_url)
    try:
        async with load(stack) as client:
            operation_id = await start(stack, "v6", "canary", {
                "initial_percentage": 25, "step_percentage": 25,
                "evaluation_period_minutes": 0.25})
            evaluating = await wait_phase(stack, operation_id, "evaluating")
            first = (await store.get_route(MODEL_ID)).generation
            next_check = datetime.fromisoformat(evaluating["next_check_at"]).timestamp()
            await asyncio.sleep(max(0.0, next_check - time.time() - 1))
            stack.signal_process("gateway-replica", signal.SIGSTOP)
            # The next step's route is written; the activity now waits for the replica.
            for _ in range(300):
                if (await store.get_route(MODEL_ID)).generation > first:
                    break
                await asyncio.sleep(0.1)
            assert (await store.get_route(MODEL_ID)).generation == first + 1
            assert (await status(stack, operation_id))["phase"] == "shifting"
            await crash_orchestration(stack, client, outage_s=3, while_down=lambda: (
                stack.signal_process("gateway-replica", signal.SIGCONT)))
            s = await wait_end(stack, operation_id)
            last = (await store.get_route(MODEL_ID)).generation
    finally:
        await store.close()
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), explain(s)
    # 50 (in flight at the kill, applied once), 75, 100: three generations after 25%.
    assert last - first == 3
    assert judged(s) == ["healthy"] * 3, s["verdicts"]
    assert client.failures == []
    assert {"v5", "v6"} <= set(client.served)
