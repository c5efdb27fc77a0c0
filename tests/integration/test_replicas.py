"""Two gateway replicas on one store: a route change reaches both before the traffic activity
returns, a restarted replica resumes with the routes from the store, a retried shift does
not apply twice, and draining a version waits for its requests in flight at every replica.
Concurrent shifts and mirror changes of one model, from two processes' store pools,
compose. Real gateways over HTTP, the real traffic activities, SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from temporalio.testing import ActivityEnvironment

from activities.gateway_admin import GatewayAdmin
from activities.traffic import TrafficActivities
from gateway.app import RunningGateway, start_gateway
from tests.integration.upstream import FakeUpstream
from tests.support import free_port
from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.domain import EngineInfo, EngineState, RegisterModelRequest
from turnout.store import Store, upgrade_async

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

MODEL = "replica_default"
TOKEN = "replica-admin-token"


@dataclass
class Replicas:
    store: Store
    db_url: str
    gateways: dict[str, RunningGateway]
    traffic: TrafficActivities
    upstreams: dict[str, FakeUpstream]

    async def start(self, name: str) -> RunningGateway:
        settings = ModelSwitchingConfig(gateway_port=free_port(), gateway_admin_port=free_port(),
                                        database_url=self.db_url, gateway_admin_token=TOKEN)
        running = await start_gateway(settings, self.store, name)
        self.gateways[name] = running
        return running

    async def shift(self, weights: dict[str, float], key: str) -> c.SetTrafficResult:
        return await ActivityEnvironment().run(
            self.traffic.set_traffic,
            c.SetTrafficInput(model_id=MODEL, weights=weights, change_key=key))

    async def drain(self, version: str, timeout_s: float) -> c.DrainVersionResult:
        return await ActivityEnvironment().run(
            self.traffic.drain_version,
            c.DrainVersionInput(model_id=MODEL, version=version, timeout_s=timeout_s))

    async def served_by(self, name: str) -> str:
        async with httpx.AsyncClient(base_url=self.gateways[name].client_url) as client:
            answer = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
            assert answer.status_code == 200, answer.text
            return answer.headers["x-turnout-version"]


@pytest_asyncio.fixture(loop_scope="session")
async def replicas(tmp_path: Path, new_database: Callable[[Path], str]
                   ) -> AsyncIterator[Replicas]:
    db_url = new_database(tmp_path)
    await upgrade_async(db_url)
    store = Store.from_url(db_url)
    upstreams = {v: await FakeUpstream(v, f"served-{v}").start() for v in ("v1", "v2", "v3")}
    for version, upstream in upstreams.items():
        await store.register_version(RegisterModelRequest(
            model=f"org/{version}", model_arch="replica", model_stage="default",
            version=version))
        await store.save_engine(EngineInfo(
            model_id=MODEL, version=version, host="external", url=upstream.url,
            served_model_name=upstream.served_model_name, state=EngineState.READY,
            external=True))
    admin = GatewayAdmin(TOKEN)
    settings = ModelSwitchingConfig(database_url=db_url, gateway_admin_token=TOKEN)
    r = Replicas(store, db_url, {}, TrafficActivities(settings, store, admin), upstreams)
    yield r
    for running in r.gateways.values():
        await running.stop()
    await admin.close()
    for upstream in upstreams.values():
        await upstream.stop()
    await store.close()


async def wait_live(store: Store, count: int) -> None:
    for _ in range(100):
        if len(await store.live_gateways(15)) == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} live gateways: {await store.live_gateways(15)}")


async def test_replicas_converge_and_a_restarted_one_resumes(replicas: Replicas) -> None:
    await replicas.start("gw-a")
    await replicas.start("gw-b")
    await wait_live(replicas.store, 2)

    first = await replicas.shift({"v1": 100}, "op/step-0")
    assert sorted(first.gateways) == ["gw-a", "gw-b"]
    # Confirmed means applied: both replicas serve the new route at once, no reconcile wait.
    assert {await replicas.served_by("gw-a"), await replicas.served_by("gw-b")} == {"v1"}

    second = await replicas.shift({"v2": 100}, "op/step-1")
    assert second.generation == first.generation + 1
    assert {await replicas.served_by("gw-a"), await replicas.served_by("gw-b")} == {"v2"}
    # A retried shift (same change key) confirms the same generation, never a new one.
    again = await replicas.shift({"v2": 100}, "op/step-1")
    assert again.generation == second.generation

    # gw-b stops cleanly: it leaves the store, so the next shift does not wait for it.
    await replicas.gateways.pop("gw-b").stop()
    await wait_live(replicas.store, 1)
    third = await replicas.shift({"v1": 100}, "op/step-2")
    assert third.gateways == ["gw-a"]
    # Restarted, it resumes with the routes from the store before serving anything.
    await replicas.start("gw-b")
    assert await replicas.served_by("gw-b") == "v1"
    await wait_live(replicas.store, 2)
    fourth = await replicas.shift({"v1": 50, "v2": 50}, "op/step-3")
    assert sorted(fourth.gateways) == ["gw-a", "gw-b"]
    async with httpx.AsyncClient(base_url=replicas.gateways["gw-b"].admin_url,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
        state = (await admin.get("/admin/state")).json()
    assert state["generations"][MODEL] == fourth.generation


async def test_draining_waits_for_requests_in_flight_at_every_replica(
        replicas: Replicas) -> None:
    await replicas.start("gw-a")
    await replicas.start("gw-b")
    await wait_live(replicas.store, 2)
    await replicas.shift({"v1": 100}, "drain/step-0")
    replicas.upstreams["v1"].delay_s = 1.5
    slow = [asyncio.create_task(replicas.served_by(name)) for name in ("gw-a", "gw-b")]
    await asyncio.sleep(0.3)  # both requests are now in flight to v1
    await replicas.shift({"v2": 100}, "drain/step-1")
    assert await replicas.served_by("gw-a") == "v2"  # new requests already go to v2

    drained = await replicas.drain("v1", timeout_s=30)
    assert drained.drained and drained.inflight_left == 0 and drained.waited_s >= 0.8
    assert all(task.done() for task in slow)
    assert [task.result() for task in slow] == ["v1", "v1"]  # finished, not cut off

    # A request that outlives the deadline: reported, not waited for forever.
    await replicas.shift({"v1": 100}, "drain/step-2")
    replicas.upstreams["v1"].delay_s = 3
    late = asyncio.create_task(replicas.served_by("gw-b"))
    await asyncio.sleep(0.3)
    await replicas.shift({"v2": 100}, "drain/step-3")
    cut = await replicas.drain("v1", timeout_s=0.5)
    assert (cut.drained, cut.inflight_left) == (False, 1) and cut.waited_s < 2
    assert await late == "v1"


async def test_concurrent_shifts_and_mirror_changes_compose(replicas: Replicas) -> None:
    """A switch shifting traffic while a shadow changes its share, each through its own
    store pool (two processes' worth): each write gets its own generation, and the final
    route has the last shift's split and the last mirror change's shadow; neither
    overwrote the other."""
    await replicas.start("gw-a")
    await wait_live(replicas.store, 1)
    await replicas.shift({"v1": 100}, "compose/start")
    other = Store.from_url(replicas.db_url)
    mirrors = TrafficActivities(replicas.traffic.settings, other, replicas.traffic.admin)
    try:
        splits = [{"v1": 100.0}, {"v1": 50.0, "v2": 50.0}]
        shifts = [replicas.shift(splits[i % 2], f"compose/shift-{i}") for i in range(12)]
        mirrored = [ActivityEnvironment().run(mirrors.set_mirror, c.SetMirrorInput(
            model_id=MODEL, version="v3", percent=5.0 * (i + 1), change_key=f"compose/m-{i}"))
            for i in range(12)]
        results = await asyncio.gather(*shifts, *mirrored)
    finally:
        await other.close()
    generations = [r.generation for r in results]
    assert len(set(generations)) == len(generations)
    last_shift = max(range(12), key=lambda i: results[i].generation)
    last_mirror = max(range(12), key=lambda i: results[12 + i].generation)
    route = await replicas.store.get_route(MODEL)
    assert route is not None and route.generation == max(generations)
    assert route.weights() == splits[last_shift % 2]
    shadow = route.shadow()
    assert shadow is not None and (shadow.version, shadow.mirror_percent) == \
        ("v3", 5.0 * (last_mirror + 1))
