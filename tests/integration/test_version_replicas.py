"""One version with two engines on two engine hosts, behind the real gateway.

Two fake engines (real HTTP servers) are recorded in a real SQLite store as engines of
`v1` on hosts `host-a` and `host-b`, the hosts claimed with `Store.claim_host` and kept
heartbeating as engine workers do; the route is written by the real traffic activity
(`TrafficActivities.set_traffic`), and draining goes through the real `drain_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import update
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio.testing import ActivityEnvironment

from activities.gateway_admin import GatewayAdmin
from activities.traffic import TrafficActivities
from gateway.app import RunningGateway, start_gateway
from tests.integration.stores import TINY_MODEL, tiny_store
from tests.integration.upstream import FakeUpstream
from tests.support import free_port
from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.domain import EngineInfo, EngineState
from turnout.fleet import EngineHost, HostCapacity
from turnout.store import Store
from turnout.store.schema import EngineHostRow, utcnow

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

MODEL = TINY_MODEL
TOKEN = "fleet-admin-token"
HOSTS = ("host-a", "host-b")
LIVE_AFTER_S = 3.0


@dataclass
class Fleet:
    store: Store
    db_url: str
    gateway: RunningGateway
    traffic: TrafficActivities
    ups: dict[str, FakeUpstream]  # by host
    http: httpx.AsyncClient
    admin: httpx.AsyncClient
    beating: set[str] = field(default_factory=lambda: set(HOSTS))

    async def shift(self, weights: dict[str, float], key: str) -> c.SetTrafficResult:
        return await ActivityEnvironment().run(
            self.traffic.set_traffic,
            c.SetTrafficInput(model_id=MODEL, weights=weights, change_key=key))

    async def drain(self, replica: str, timeout_s: float) -> c.DrainVersionResult:
        return await ActivityEnvironment().run(
            self.traffic.drain_version,
            c.DrainVersionInput(model_id=MODEL, version="v1", timeout_s=timeout_s,
                                replica=replica))

    async def ask(self, **extra: Any) -> httpx.Response:
        answer = await self.http.post("/v1/completions",
                                      json={"model": MODEL, "prompt": "x", **extra})
        assert answer.status_code == 200, answer.text
        return answer

    async def replicas(self) -> dict[str, dict[str, Any]]:
        """This gateway's replicas of v1, by host, from `/admin/state`."""
        state = (await self.admin.get("/admin/state")).json()
        return {r["host"]: r for r in state["replicas"].get(MODEL, {}).get("v1", [])}

    async def age_host(self, host: str, seconds: float) -> None:
        """The host's engine worker went quiet `seconds` ago."""
        self.beating.discard(host)
        engine = create_async_engine(self.db_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(update(EngineHostRow).where(EngineHostRow.host_id == host)
                                   .values(last_seen=utcnow() - timedelta(seconds=seconds)))
        finally:
            await engine.dispose()

    async def set_engine_state(self, host: str, state: EngineState) -> None:
        engine = await self.store.get_engine(MODEL, "v1", host)
        assert engine is not None
        await self.store.save_engine(engine.model_copy(update={"state": state}))


async def heartbeat(fleet: Fleet) -> None:
    """What each host's engine worker does: heartbeat (here every 0.5 s)."""
    while True:
        for host in list(fleet.beating):
            await fleet.store.heartbeat_host(host, f"instance-{host}")
        await asyncio.sleep(0.5)


async def until(check: Any, timeout_s: float = 5.0) -> float:
    """Wait for `check()` (async) to hold; return how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        if loop.time() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(0.05)
    return loop.time() - started


@pytest_asyncio.fixture(loop_scope="session")
async def fleet(tmp_path: Path, new_database: Callable[[Path], str]) -> AsyncIterator[Fleet]:
    db_url, store = await tiny_store(tmp_path, database_url=new_database(tmp_path))
    ups = {host: await FakeUpstream("v1", "tiny-v1").start() for host in HOSTS}
    for i, (host, upstream) in enumerate(ups.items()):
        await store.claim_host(EngineHost(
            host_id=host, task_queue=f"turnout-engines-{host}", instance_id=f"instance-{host}",
            capacity=HostCapacity(memory_bytes=8 << 30, port_start=8100 + 10 * i,
                                  port_end=8109 + 10 * i)), live_after_s=LIVE_AFTER_S)
        await store.save_engine(EngineInfo(
            model_id=MODEL, version="v1", host=host, url=upstream.url,
            served_model_name="tiny-v1", port=upstream.port, state=EngineState.READY))
    settings = ModelSwitchingConfig(
        gateway_host="127.0.0.1", gateway_port=free_port(), gateway_admin_port=free_port(),
        database_url=db_url, gateway_admin_token=TOKEN, engine_host_live_after_s=LIVE_AFTER_S)
    gateway = await start_gateway(settings, store, "fleet-gw")
    admin = GatewayAdmin(TOKEN)
    fleet = Fleet(store, db_url, gateway, TrafficActivities(settings, store, admin), ups,
                  httpx.AsyncClient(base_url=gateway.client_url, timeout=30),
                  httpx.AsyncClient(base_url=gateway.admin_url, timeout=30,
                                    headers={"Authorization": f"Bearer {TOKEN}"}))
    beat = asyncio.create_task(heartbeat(fleet))
    for _ in range(100):
        if await store.live_gateways(15):
            break
        await asyncio.sleep(0.05)
    await fleet.shift({"v1": 100}, "v1-on-two-hosts")
    yield fleet
    beat.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beat
    await fleet.http.aclose()
    await fleet.admin.aclose()
    await gateway.stop()
    await admin.close()
    for upstream in ups.values():
        await upstream.stop()
    await store.close()


async def test_the_route_names_both_replicas_and_requests_spread_over_them(
        fleet: Fleet) -> None:
    [backend] = (await fleet.store.get_route(MODEL)).backends  # type: ignore[union-attr]
    assert [(r.host, r.url) for r in backend.replicas] == [
        (h, fleet.ups[h].url) for h in HOSTS]
    assert backend.url == fleet.ups["host-a"].url  # older readers see the first replica

    for _ in range(40):  # one after another: nothing in flight, ties go round-robin
        assert (await fleet.ask()).headers["x-turnout-version"] == "v1"
    counts = [len(fleet.ups[h].received) for h in HOSTS]
    assert counts == [20, 20]
    # Stickiness is per version: a user's requests still spread over the replicas.
    for _ in range(10):
        await fleet.ask(user="alice")
    assert [len(fleet.ups[h].received) for h in HOSTS] == [25, 25]


async def test_least_in_flight_sends_most_requests_to_the_fast_replica(fleet: Fleet) -> None:
    fleet.ups["host-b"].delay_s = 0.3
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0

    async def client() -> None:
        while loop.time() < deadline:
            await fleet.ask()

    await asyncio.gather(*(client() for _ in range(6)))
    fast, slow = (len(fleet.ups[h].received) for h in HOSTS)
    # Round-robin would give the slow replica half of them; it gets a small share.
    assert slow >= 1 and slow / (fast + slow) < 0.25, (fast, slow)
    replicas = await fleet.replicas()
    assert {h: (r["inflight"], r["routed"]) for h, r in replicas.items()} == {
        "host-a": (0, True), "host-b": (0, True)}
    stats = (await fleet.admin.get("/admin/stats")).json()["stats"][MODEL]["v1"]
    assert stats["errors"] == 0 and stats["requests"] == fast + slow


async def test_a_replica_refusing_connections_fails_over_to_the_other_one(
        fleet: Fleet) -> None:
    await fleet.ups["host-b"].stop()  # its host still heartbeats: only failover helps
    for _ in range(20):
        await fleet.ask()  # every one answered
    streamed = await fleet.http.post("/v1/completions", json={
        "model": MODEL, "prompt": "x", "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert len(fleet.ups["host-a"].received) == 21 and fleet.ups["host-b"].received == []
    metrics = (await fleet.admin.get("/metrics")).text
    failovers = [line for line in metrics.splitlines()
                 if line.startswith("turnout_gateway_failovers_total{")]
    # About half the requests picked the dead replica first (round-robin ties).
    assert len(failovers) == 1 and f'model_id="{MODEL}",to="v1",version="v1"' in failovers[0]
    assert 5 <= float(failovers[0].split()[-1]) <= 16
    stats = (await fleet.admin.get("/admin/stats")).json()["stats"][MODEL]["v1"]
    assert stats["errors"] == float(failovers[0].split()[-1])  # charged to the version
    assert stats["inflight"] == 0


async def test_a_host_that_stops_heartbeating_loses_its_replica(fleet: Fleet) -> None:
    await fleet.age_host("host-b", 60)

    async def out() -> bool:
        return not (await fleet.replicas())["host-b"]["routed"]

    assert await until(out, timeout_s=3.0) <= 2.5  # within a reconcile or two
    before = len(fleet.ups["host-b"].received)
    for _ in range(10):
        await fleet.ask()
    assert len(fleet.ups["host-b"].received) == before
    # A new route leaves the silent host out too.
    await fleet.shift({"v1": 100}, "after-b-went-silent")
    [backend] = (await fleet.store.get_route(MODEL)).backends  # type: ignore[union-attr]
    assert [r.host for r in backend.replicas] == ["host-a"]

    # The host is back: the route is rewritten with it (the old one never named it).
    fleet.beating.add("host-b")
    await asyncio.sleep(0.6)
    await fleet.shift({"v1": 100}, "b-back")

    async def back() -> bool:
        return (await fleet.replicas()).get("host-b", {}).get("routed", False)

    await until(back)
    for _ in range(10):
        await fleet.ask()
    assert len(fleet.ups["host-b"].received) == before + 5


async def test_a_failed_engine_is_out_and_a_version_is_never_left_without_replicas(
        fleet: Fleet) -> None:
    await fleet.set_engine_state("host-a", EngineState.FAILED)

    async def a_out() -> bool:
        return not (await fleet.replicas())["host-a"]["routed"]

    await until(a_out, timeout_s=3.0)
    for _ in range(6):
        await fleet.ask()
    assert fleet.ups["host-a"].received == [] and len(fleet.ups["host-b"].received) == 6

    # Both hosts silent: both replicas kept (a route with none would refuse everyone).
    await fleet.set_engine_state("host-a", EngineState.READY)
    await fleet.age_host("host-a", 60)
    await fleet.age_host("host-b", 60)
    await asyncio.sleep(1.5)  # a reconcile or more

    async def both_in() -> bool:
        return all(r["routed"] for r in (await fleet.replicas()).values())

    await until(both_in)
    for _ in range(10):
        await fleet.ask()
    assert len(fleet.ups["host-a"].received) == 5 and len(fleet.ups["host-b"].received) == 11
    # So does a new route.
    await fleet.shift({"v1": 100}, "all-silent")
    [backend] = (await fleet.store.get_route(MODEL)).backends  # type: ignore[union-attr]
    assert [r.host for r in backend.replicas] == list(HOSTS)


async def test_draining_one_replica_waits_for_that_replica_only(fleet: Fleet) -> None:
    for upstream in fleet.ups.values():
        upstream.delay_s = 1.5
    first = asyncio.create_task(fleet.ask(prompt="first"))

    async def one_active() -> bool:
        return sum(u.active for u in fleet.ups.values()) == 1

    await until(one_active)
    stopping = next(h for h, u in fleet.ups.items() if u.active)
    serving = next(h for h in HOSTS if h != stopping)
    fleet.ups[serving].delay_s = 4.0
    second = asyncio.create_task(fleet.ask(prompt="second"))  # none in flight there

    async def both_active() -> bool:
        return all(u.active == 1 for u in fleet.ups.values())

    await until(both_active)
    assert fleet.ups[serving].received[-1]["prompt"] == "second"
    # One host's engine is being stopped while the other's keeps serving.
    await fleet.set_engine_state(stopping, EngineState.STOPPING)
    drained = await fleet.drain(stopping, timeout_s=30)
    assert drained.drained and drained.inflight_left == 0 and drained.routed_at == []
    assert 0.8 <= drained.waited_s < 2.5, drained
    assert not second.done()  # the other replica's request was not waited for
    assert (await first).status_code == 200
    # New requests all go to the serving replica meanwhile.
    fleet.ups[serving].delay_s = 0
    received = len(fleet.ups[stopping].received)
    for _ in range(4):
        await fleet.ask()
    assert len(fleet.ups[stopping].received) == received
    assert (await second).status_code == 200

    # A replica the gateway still routes to is not drained, even with nothing in flight:
    # the drain says where it is still routed (by URL here).
    cut = await fleet.drain(fleet.ups[serving].url, timeout_s=0.6)
    assert (cut.drained, cut.inflight_left, cut.routed_at) == (False, 0, ["fleet-gw"])
