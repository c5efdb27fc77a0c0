"""The paths of the workflows that no other real run takes, each run on the real plane,
checked for what a user sees, and recorded for the replay tests (RECORD_HISTORIES=1): a
rollback while the target waits for an engine host, a load that fails, a target that
fails its check after the switch, an aborted gradual rollout, a shadow that expires and
one whose version fails to load, and a monitor after it has continued as new."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from activities.host import HostMembership
from tests.integration.plane import (
    ControlPlane,
    control_plane,
    first_version_live,
    record_history,
    record_workflow_history,
    wait_done,
)
from tests.integration.upstream import FakeUpstream
from turnout import contracts as c

pytestmark = pytest.mark.asyncio(loop_scope="session")

ARCH, STAGE = "Paths", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory,
                tiny_models: dict[str, Path]) -> AsyncIterator[ControlPlane]:
    """A plane of this module's own whose model roots hold a tiny model and the broken
    copy made here. The plane runs no engine host: a local model waits to be placed."""
    root = tmp_path_factory.mktemp("paths")
    roots = sorted({str(root / "models"), *(str(p.parent) for p in tiny_models.values())})
    async with control_plane(root, model_roots=roots, monitoring_interval_s=2) as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine_host(plane: ControlPlane) -> AsyncIterator[None]:
    """The plane's engine worker claims its host and heartbeats, as `workers.engine` does:
    from the first test that asks for it on, local versions are placed on it."""
    membership = HostMembership(plane.settings, plane.store)
    await membership.claim()
    stop = asyncio.Event()
    beating = asyncio.create_task(membership.keep(stop))
    yield
    stop.set()
    await beating


async def register(client: httpx.AsyncClient, version: str, **fields: Any) -> None:
    r = await client.post("/models", json={"model_arch": ARCH, "model_stage": STAGE,
                                           "version": version, **fields})
    assert r.status_code == 201, r.text


async def switch(client: httpx.AsyncClient, version: str, strategy: str = "immediate",
                 config: dict[str, Any] | None = None) -> str:
    r = await client.post("/switch", json={"model_id": MODEL_ID, "target_version": version,
                                           "strategy": strategy,
                                           "strategy_config": config or {}})
    assert r.status_code == 202, r.text
    return str(r.json()["operation_id"])


async def until_phase(client: httpx.AsyncClient, operation_id: str, phase: str) -> None:
    for _ in range(600):
        s = (await client.get(f"/switch/operations/{operation_id}")).json()
        if s["phase"] == phase:
            return
        assert s["status"] == "running", s
        await asyncio.sleep(0.1)
    raise AssertionError(f"{operation_id} never reached {phase}: {s}")


async def live(client: httpx.AsyncClient) -> str | None:
    return (await client.get(f"/models/{MODEL_ID}")).json()["live_version"]


async def test_v1_goes_live(plane: ControlPlane, tiny_models: dict[str, Path]) -> None:
    async with plane.http() as client:
        await first_version_live(plane, client, ARCH, STAGE)
        await register(client, "tiny", model=str(tiny_models["tiny-v1"]))
        broken = Path(plane.settings.state_dir) / "models" / "broken"
        broken.mkdir(parents=True)
        (broken / "config.json").write_text("{ not json")
        await register(client, "broken", model=str(broken))
        failing = await FakeUpstream("failing", "served-failing", fail_status=500,
                                     fail_fraction=1.0).start()
        plane.upstreams["failing"] = failing
        await register(client, "failing", model="tiny/failing", endpoint=failing.url,
                       served_model_name=failing.served_model_name)


async def test_a_rollback_while_the_target_waits_for_a_host_is_carried_out_at_once(
        plane: ControlPlane) -> None:
    """Placing the target retries for minutes while no engine host is live; an operator's
    rollback meanwhile answers at once (the plane's client gives up after 5 s)."""
    async with plane.http() as client:
        operation_id = await switch(client, "tiny", "canary", {
            "initial_percentage": 10, "step_percentage": 90, "evaluation_period_minutes": 5})
        await until_phase(client, operation_id, "loading")
        r = await client.post(f"/switch/operations/{operation_id}/rollback",
                              json={"reason": "wrong build"})
        assert r.status_code == 200, r.text
        s = await wait_done(client, operation_id)
        assert (s["status"], s["outcome"]) == ("failed", "rolled_back"), s
        assert await live(client) == "v1"
        engines = (await client.get("/engines")).json()["engines"]
        assert [e for e in engines if e["version"] == "tiny"] == []
        await record_history(plane, operation_id, "canary-rollback-while-placing")


async def test_a_load_that_fails_leaves_traffic_on_the_live_version(
        plane: ControlPlane, engine_host: None) -> None:
    async with plane.http() as client:
        operation_id = await switch(client, "broken")
        s = await wait_done(client, operation_id)
        assert (s["status"], s["outcome"]) == ("failed", "load_failed"), s
        assert "config.json" in s["reason"]
        assert await live(client) == "v1"
        await record_history(plane, operation_id, "immediate-load-failed")


async def test_a_target_that_fails_its_check_after_the_switch_is_rolled_back(
        plane: ControlPlane) -> None:
    async with plane.http() as client:
        operation_id = await switch(client, "failing")
        s = await wait_done(client, operation_id)
        assert (s["status"], s["outcome"]) == ("failed", "rolled_back"), s
        assert "did not answer after the switch" in s["reason"], s["reason"]
        assert await live(client) == "v1"
        assert s["weights"] == {"v1": 100.0}
        await record_history(plane, operation_id, "immediate-failed-check")


async def test_an_aborted_gradual_rollout_ends_on_the_live_version(
        plane: ControlPlane) -> None:
    async with plane.http() as client:
        operation_id = await switch(client, "v2", "gradual",
                                    {"duration_minutes": 60, "steps": 4})
        await until_phase(client, operation_id, "evaluating")
        r = await client.post(f"/switch/operations/{operation_id}/abort",
                              json={"reason": "change freeze"})
        assert r.status_code == 200, r.text
        s = await wait_done(client, operation_id)
        assert (s["status"], s["outcome"]) == ("failed", "aborted"), s
        assert s["weights"] == {"v1": 100.0}
        await record_history(plane, operation_id, "gradual-abort")


async def shadow_ends(client: httpx.AsyncClient) -> dict[str, Any]:
    for _ in range(600):
        shadow = dict((await client.get(f"/models/{MODEL_ID}/shadow")).json())
        if shadow.get("finished_at"):
            return shadow
        await asyncio.sleep(0.1)
    raise AssertionError(f"the shadow did not end: {shadow}")


async def test_a_shadow_expires_after_its_duration(plane: ControlPlane) -> None:
    async with plane.http() as client:
        r = await client.post(f"/models/{MODEL_ID}/shadow", json={
            "version": "v2", "percentage": 100, "duration_minutes": 0.05})
        assert r.status_code == 202, r.text
        shadow = await shadow_ends(client)
        assert (shadow["phase"], shadow["reason"]) == (
            "completed", "mirrored for the requested time"), shadow
        await record_workflow_history(plane, "shadow-expired", c.shadow_workflow_id(MODEL_ID))


async def test_a_shadow_whose_version_fails_to_load_ends_saying_so(
        plane: ControlPlane, engine_host: None) -> None:
    async with plane.http() as client:
        r = await client.post(f"/models/{MODEL_ID}/shadow", json={"version": "broken"})
        assert r.status_code == 202, r.text
        shadow = await shadow_ends(client)
        assert shadow["phase"] == "failed" and "config.json" in shadow["reason"], shadow
        await record_workflow_history(plane, "shadow-load-failed",
                                      c.shadow_workflow_id(MODEL_ID))


async def test_a_monitor_after_it_continued_as_new(plane: ControlPlane) -> None:
    """A monitor of one look a run continues as new and looks on; a stop signalled to it
    then ends it, although it comes in the run's last pause."""
    workflow_id = f"monitor-paths-{uuid.uuid4().hex[:8]}"
    handle = await plane.env.client.start_workflow(
        c.MONITOR_WORKFLOW, c.MonitorInput(model_id=MODEL_ID, interval_s=2, looks_per_run=1),
        id=workflow_id, task_queue=plane.settings.resolved_monitor_task_queue)
    first = handle.first_execution_run_id
    latest = plane.env.client.get_workflow_handle(workflow_id)
    for _ in range(600):
        described = await latest.describe()
        if described.run_id != first:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the monitor never continued as new")
    await asyncio.sleep(2.5)  # a look of the new run
    await latest.signal(c.STOP_MONITOR)
    assert await asyncio.wait_for(latest.result(), 60) == "stopped by signal"
    ended = await latest.describe()
    await record_workflow_history(plane, "monitor-after-continue-as-new", workflow_id,
                                  ended.run_id)
