"""`judge_health` against a real gateway: real traffic, real windows, real SQLite store.

The gateway runs in-process in front of two fake OpenAI engines (v1 stable, v2 target);
requests go through it over HTTP, and the activity reads the windows back through
`/admin/stats` of every live gateway found in the store, as it does in production.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest_asyncio
from temporalio.testing import ActivityEnvironment

from activities.gateway_admin import GatewayAdmin
from activities.health import HealthActivities
from gateway.app import Gateway, RunningGateway, start_gateway
from tests.integration.stores import TINY_MODEL, tiny_store
from tests.integration.upstream import FakeUpstream
from tests.support import free_port
from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.domain import Backend
from turnout.store import Store
from turnout.telemetry.catalogue import Source

MODEL = TINY_MODEL
# Both fakes take 20 ms, so latency is dominated by the same sleep on either side and a
# healthy target is not failed by scheduling noise of the test machine.
DELAY_S = 0.02


@dataclass
class Env:
    store: Store
    v1: FakeUpstream
    v2: FakeUpstream
    gateway: Gateway
    running: RunningGateway
    url: str
    http: aiohttp.ClientSession
    admin: GatewayAdmin
    health: HealthActivities

    async def traffic(self, n: int, concurrency: int = 8) -> Counter[tuple[str, int]]:
        """Send n completions through the gateway; count (version, status) answers."""
        seen: Counter[tuple[str, int]] = Counter()
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate, self.http.post(f"{self.url}/v1/completions",
                                            json={"model": MODEL, "prompt": "hi"}) as resp:
                await resp.read()
                seen[(resp.headers["X-Turnout-Version"], resp.status)] += 1

        await asyncio.gather(*(one() for _ in range(n)))
        return seen

    async def judge(self, since: float, until: float, **thresholds: float) -> c.Verdict:
        input = c.JudgeHealthInput(
            model_id=MODEL, target_version="v2", stable_version="v1", window_start=since,
            window_end=until, thresholds=c.HealthThresholds(**thresholds))
        return await ActivityEnvironment().run(self.health.judge_health, input)


@pytest_asyncio.fixture(loop_scope="session")
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    db_url, store = await tiny_store(tmp_path)
    v1 = await FakeUpstream("v1", "tiny-v1", delay_s=DELAY_S).start()
    v2 = await FakeUpstream("v2", "tiny-v2", delay_s=DELAY_S).start()
    await store.write_route(MODEL, [
        Backend(version="v1", weight=50, url=v1.url, served_model_name="tiny-v1"),
        Backend(version="v2", weight=50, url=v2.url, served_model_name="tiny-v2")], "half")
    port = free_port()
    settings = ModelSwitchingConfig(gateway_host="127.0.0.1", gateway_port=port,
                                    gateway_admin_port=free_port(), database_url=db_url)
    running = await start_gateway(settings, store, f"health-gw-{port}")
    for _ in range(100):  # the first heartbeat makes the gateway live in the store
        if await store.live_gateways(settings.gateway_live_after_s):
            break
        await asyncio.sleep(0.02)
    admin = GatewayAdmin(None)
    e = Env(store=store, v1=v1, v2=v2, gateway=running.gateway, running=running,
            url=running.client_url, http=aiohttp.ClientSession(), admin=admin,
            health=HealthActivities(store, settings=settings, admin=admin))
    yield e
    await e.http.close()
    await admin.close()
    await running.stop()
    await v1.stop()
    await v2.stop()
    await store.close()


async def test_healthy_target(env: Env) -> None:
    since = time.time()
    seen = await env.traffic(160)
    verdict = await env.judge(since, time.time())
    assert verdict.outcome == "healthy", verdict.reason
    assert verdict.target.version == "v2" and verdict.stable is not None
    assert verdict.target.requests == seen[("v2", 200)] >= 20
    assert verdict.stable.requests == seen[("v1", 200)] >= 20
    assert verdict.target.errors == 0 and verdict.target.error_rate == 0
    p95 = verdict.target.latency_p95_ms
    # Within the 1% of the windows' histograms.
    assert p95 is not None and p95 >= DELAY_S * 1000 * 0.99
    assert verdict.reason.startswith(f"p95 {p95:.0f} ms, errors 0.0% over ")
    assert verdict.window_start == since and verdict.window_end > since
    assert verdict.analysis["gateways"] == {"answered": [env.gateway.gateway_id],
                                            "skipped": []}


async def test_failing_target_is_unhealthy(env: Env) -> None:
    env.v2.fail_fraction = 0.5
    since = time.time()
    seen = await env.traffic(160)
    verdict = await env.judge(since, time.time())
    assert verdict.outcome == "unhealthy"
    assert verdict.reason.startswith("error rate ")
    assert "> 5.0% limit" in verdict.reason
    assert verdict.target.requests == seen[("v2", 200)] + seen[("v2", 500)]
    assert verdict.target.errors == seen[("v2", 500)] == env.v2.failed
    assert 0.4 <= (verdict.target.error_rate or 0) <= 0.6
    assert verdict.stable is not None and verdict.stable.errors == 0
    err = verdict.analysis["error_rate"]
    assert err["over_limit"] and err["worse"] and err["p_value"] < 0.001


async def test_no_traffic_is_inconclusive(env: Env) -> None:
    now = time.time()
    verdict = await env.judge(now - 60, now)
    assert verdict.outcome == "inconclusive"
    assert verdict.reason == "only 0 requests to v2, need 20"
    assert verdict.target.requests == 0 and not verdict.healthy


async def test_window_bounds_exclude_outside_requests(env: Env) -> None:
    start = time.time()
    env.v2.fail_fraction = 0.5
    bad = await env.traffic(120)
    await asyncio.sleep(0.05)
    middle = time.time()
    await asyncio.sleep(0.05)
    env.v2.fail_fraction = 0.0
    good = await env.traffic(120)
    end = time.time()
    await env.traffic(40)  # after the window: must not count

    before = await env.judge(start, middle)
    assert before.outcome == "unhealthy", before.reason
    assert before.target.requests == bad[("v2", 200)] + bad[("v2", 500)]
    after = await env.judge(middle, end)
    assert after.outcome == "healthy", after.reason
    assert after.target.requests == good[("v2", 200)] and after.target.errors == 0
    assert after.stable is not None and after.stable.requests == good[("v1", 200)]

    # The raw admin answer: windowed entries carry the window, plain ones are unchanged.
    [gateway] = await env.store.live_gateways(15)
    body = await env.admin.stats(gateway, middle, end)
    window = body.stats[MODEL]["v2"].window
    assert window is not None
    assert window.requests == good[("v2", 200)] == window.histogram(Source.LATENCY).count
    plain = await env.admin.stats(gateway)
    assert plain.stats[MODEL]["v2"].window is None
    assert sum(v.requests for v in plain.stats[MODEL].values()) == 280
    async with env.http.get(f"{env.running.admin_url}/admin/stats") as resp:
        assert set((await resp.json())["stats"][MODEL]["v2"]) == {
            "requests", "errors", "inflight", "latency_ms", "ttfb_ms", "itl_ms",
            "tokens_per_s", "output_tokens"}
    async with env.http.get(f"{env.running.admin_url}/admin/stats?since=yesterday") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "since"


async def test_unreachable_gateway_is_skipped(env: Env) -> None:
    await env.store.heartbeat_gateway("dead-gw", f"http://127.0.0.1:{free_port()}")
    since = time.time()
    await env.traffic(100)
    verdict = await env.judge(since, time.time())
    assert verdict.outcome == "healthy", verdict.reason
    assert verdict.analysis["gateways"]["skipped"] == ["dead-gw"]
    assert "(1 of 2 gateways unreachable)" in verdict.reason


async def test_a_fresh_targets_warm_up_is_left_out_of_its_first_verdict(env: Env) -> None:
    """A target whose first answers are slow (a fresh engine warming up) beside a warm
    stable version: judged with them it fails, with its warm-up left out (the first
    judged window of a switch) it passes, and the verdict says what was left out."""
    env.v2._answered, env.v2.cold_requests, env.v2.cold_delay_s = 0, 12, 0.4
    since = time.time()
    await env.traffic(240)
    until = time.time()
    plain = await env.judge(since, until)
    assert plain.outcome == "unhealthy", plain.reason
    assert plain.reason.startswith("p95 latency ")
    input = c.JudgeHealthInput(
        model_id=MODEL, target_version="v2", stable_version="v1", window_start=since,
        window_end=until, warmup=True,
        thresholds=c.HealthThresholds(warmup_requests=12))
    warmed = await ActivityEnvironment().run(env.health.judge_health, input)
    assert warmed.outcome == "healthy", warmed.reason
    warmup = warmed.analysis["warmup"]
    assert (warmup["requests"], warmup["excluded"]) == (12, 12)
    assert since < warmup["judged_since"] < until
    assert "warm-up left out: the first 12 requests of v2" in warmed.reason
    # Both sides were judged over the same span: v1's requests before the cut are out too.
    assert warmed.stable is not None and plain.stable is not None
    assert warmed.stable.requests < plain.stable.requests
    assert warmed.target.requests == plain.target.requests - 12
