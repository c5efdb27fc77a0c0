"""ShadowWorkflow on the time-skipping server, with activity doubles: load, mirror for the
requested time or until stopped, then remove the shadow, drain and unload — but never
unload a version that a switch has started to serve meanwhile."""

from __future__ import annotations

import uuid
from datetime import timedelta

from temporalio.client import WorkflowHandle

from turnout import contracts as c
from workflows import ShadowWorkflow

from .conftest import ENGINE_QUEUE, Harness


def shadow_input(duration_s: float = 0.0) -> c.ShadowInput:
    return c.ShadowInput(model_id="Tiny_chat", version="v2", percent=25,
                         duration_s=duration_s, engine_task_queue=ENGINE_QUEUE)


async def start(h: Harness, input: c.ShadowInput) -> WorkflowHandle:
    return await h.env.client.start_workflow(ShadowWorkflow.run, input,
                                             id=f"shadow-{uuid.uuid4()}", task_queue=h.task_queue)


async def test_mirrors_for_its_duration_then_releases_the_version(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    control, engines = harness.workers()
    async with control, engines:
        handle = await start(harness, shadow_input(duration_s=3600))
        status = await handle.result()
    assert (status.phase, status.reason) == ("completed", "mirrored for the requested time")
    assert status.ends_at is not None and status.started_at is not None
    # The hour counts from the start of mirroring (after the load).
    assert timedelta(hours=1) <= status.ends_at - status.started_at < timedelta(hours=1, minutes=1)
    assert harness.cluster.mirrors == [("v2", 25), ("v2", 0)]
    work = [n for n in harness.cluster.names()]
    assert work == [c.PLACE_VERSION, c.LOAD_VERSION, c.SET_MIRROR, c.SET_MIRROR,
                    c.RELEASE_VERSION, c.DRAIN_VERSION, c.UNLOAD_VERSION]
    [place] = [i for n, i in harness.cluster.calls if n == c.PLACE_VERSION]
    assert place.holder.kind.value == "shadow"
    [unload] = [i for n, i in harness.cluster.calls if n == c.UNLOAD_VERSION]
    assert unload.when == "unheld"
    assert "v2" not in harness.cluster.loaded


async def test_a_stop_signal_ends_mirroring(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    control, engines = harness.workers()
    async with control, engines:
        handle = await start(harness, shadow_input())
        for _ in range(100):
            if (await handle.query(ShadowWorkflow.status)).phase == "mirroring":
                break
        await handle.signal(c.STOP_SHADOW, "enough data")
        status = await handle.result()
    assert (status.phase, status.reason) == ("completed", "enough data")
    assert harness.cluster.mirrors == [("v2", 25), ("v2", 0)]


async def test_a_version_that_started_serving_keeps_its_engine(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    # A canary of v2 began while it was mirrored: the switch holds v2 too.
    harness.cluster.holders["v2"] = {("switch", "op-canary")}
    control, engines = harness.workers()
    async with control, engines:
        status = await (await start(harness, shadow_input(duration_s=60))).result()
    assert status.phase == "completed"
    assert c.UNLOAD_VERSION not in harness.cluster.names()
    assert c.DRAIN_VERSION not in harness.cluster.names()
    assert "v2" in harness.cluster.loaded


async def test_a_failed_load_never_touches_the_route(harness: Harness) -> None:
    harness.cluster.live_version = "v1"
    harness.cluster.fail_load = "v2"
    control, engines = harness.workers()
    async with control, engines:
        status = await (await start(harness, shadow_input(duration_s=60))).result()
    assert status.phase == "failed" and "config.json" in (status.reason or "")
    assert harness.cluster.mirrors == []
