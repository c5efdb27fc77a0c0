"""The stack's health monitor on real parts: a MonitorWorkflow per model on a Temporal dev
server, the real gateway's figures, the store's alerts, `GET /health/models`,
`PUT /health/thresholds`, and the webhook handler POSTing to a real local receiver."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from temporalio.client import WorkflowExecutionStatus

from tests.integration.plane import (
    ControlPlane,
    control_plane,
    record_workflow_history,
    register_upstreams,
    traffic,
)
from tests.integration.plane import wait_done as wait_switch
from tests.support import free_port
from turnout.contracts import monitor_workflow_id
from turnout.domain import AlertState
from turnout.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="session")

ARCH, STAGE = "MonitoredForCausalLM", "chat"
MODEL = f"{ARCH}_{STAGE}"


class Receiver:
    """A webhook endpoint (think Slack) that keeps what it was sent."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/T000/B000/secret-token"

    async def start(self) -> Receiver:
        async def hook(request: web.Request) -> web.Response:
            self.received.append(await request.json())
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hooks/{a}/{b}/{c}", hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def receiver() -> AsyncIterator[Receiver]:
    hook = await Receiver().start()
    yield hook
    await hook.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory,
                receiver: Receiver) -> AsyncIterator[ControlPlane]:
    async with control_plane(tmp_path_factory.mktemp("monitoring"), monitoring_interval_s=1,
                             alert_webhook_urls=[receiver.url]) as plane:
        async with plane.http() as client:
            await register_upstreams(plane, client, ARCH, STAGE)
            started = await client.post("/switch", json={
                "model_id": MODEL, "target_version": "v1", "strategy": "immediate"})
            assert started.status_code == 202, started.text
            assert (await wait_switch(client, started.json()["operation_id"]))["status"] \
                == "completed"
        yield plane


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = 30) -> Any:
    """Poll an async `check` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.3)


def version_health(report: dict[str, Any], version: str) -> dict[str, Any] | None:
    for model in report["models"]:
        if model["model_id"] == MODEL:
            return next((v for v in model["versions"] if v["version"] == version), None)
    return None


async def test_health_models_reports_figures_of_the_live_version(plane: ControlPlane) -> None:
    async with plane.http() as client, traffic(plane.gateway_url, MODEL):
        async def healthy() -> dict[str, Any] | None:
            v1 = version_health((await client.get("/health/models")).json(), "v1")
            return v1 if v1 and v1["state"] == "healthy" else None

        v1 = await eventually(healthy, "v1 healthy with figures")
        report = (await client.get("/health/models")).json()
    assert v1["role"] == "live"
    figures = v1["figures"]
    assert figures["requests"] >= 10 and figures["errors"] == 0
    assert figures["error_rate"] == 0 and figures["latency_p95_ms"] > 0
    assert report["monitoring_enabled"] is True and report["interval_s"] == 1
    model = next(m for m in report["models"] if m["model_id"] == MODEL)
    assert model["thresholds"]["error_rate_warning"] == plane.settings.error_rate_warning


async def test_an_erroring_version_raises_one_alert_then_resolves_it(
        plane: ControlPlane, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    upstream = plane.upstreams["v1"]
    async with plane.http() as client, traffic(plane.gateway_url, MODEL, may_fail=("v1",)):
        upstream.fail_fraction = 0.5

        async def firing() -> list[dict[str, Any]]:
            alerts = (await client.get("/alerts", params={"model_id": MODEL})).json()
            return [a for a in alerts if a["type"] == "error_rate" and a["count"] >= 3]

        [alert] = await eventually(firing, "an error-rate alert seen on three looks")
        assert (alert["version"], alert["severity"], alert["state"]) == \
            ("v1", "critical", "firing")
        assert "error_rate" in alert["title"] and alert["figures"]["error_rate"] > 0.25
        state = version_health((await client.get("/health/models")).json(), "v1")
        assert state is not None and state["state"] == "unhealthy"

        upstream.fail_fraction = 0.0

        async def resolved() -> list[dict[str, Any]]:
            alerts = (await client.get("/alerts", params={"model_id": MODEL,
                                                          "state": "resolved"})).json()
            return [a for a in alerts if a["id"] == alert["id"]]

        await eventually(resolved, "the alert resolved after recovery")
    await record_workflow_history(plane, "monitor-fire-and-resolve",
                                  monitor_workflow_id(MODEL))
    # The webhook heard of each change, not of every look: when it fired, when its severity
    # changed (a look that caught only the start or the end of the fault is a warning),
    # and when it resolved.
    about = [m["alert"] for m in receiver.received if m["alert"]["id"] == alert["id"]]
    fired = [a["severity"] for a in about if a["state"] == "firing"]
    assert "critical" in fired and len(fired) <= 3, about
    assert all(a != b for a, b in zip(fired, fired[1:], strict=False)), about
    assert [a["state"] for a in about][-1] == "resolved" and len(about) == len(fired) + 1
    assert receiver.received[0]["text"].startswith("Model Alert: ")
    assert "secret-token" not in caplog.text
    # Alerts are stored: a fresh store on the same database (a restarted API) sees them.
    store = Store.from_url(plane.settings.database_url)
    try:
        [stored] = [a for a in await store.list_alerts(model_id=MODEL)
                    if a.id == alert["id"]]
    finally:
        await store.close()
    assert stored.state is AlertState.RESOLVED and stored.count >= 3
    assert stored.first_seen is not None and stored.last_seen > stored.first_seen


async def test_thresholds_are_validated_and_applied(plane: ControlPlane) -> None:
    async with plane.http() as client:
        above = await client.put("/health/thresholds",
                                 json={"model_id": MODEL, "error_rate_warning": 0.9})
        assert above.status_code == 422, above.text
        assert above.json()["detail"][0]["loc"] == ["body", "error_rate_warning"]
        typo = await client.put("/health/thresholds", json={"error_rate_warnin": 0.01})
        assert typo.status_code == 422
        assert typo.json()["detail"][0]["loc"] == ["body", "error_rate_warnin"]
        unknown = await client.put("/health/thresholds",
                                   json={"model_id": "nope", "error_rate_warning": 0.01})
        assert unknown.status_code == 404
        assert (await client.get("/health/thresholds")).json()["error_rate_warning"] == \
            plane.settings.error_rate_warning

        # The guide's update: for every model, then a tighter latency level for one model.
        every = await client.put("/health/thresholds", json={
            "error_rate_warning": 0.03, "latency_p95_warning": 3000})
        assert every.status_code == 200, every.text
        one = await client.put("/health/thresholds",
                               json={"model_id": MODEL, "latency_p95_warning": 5})
        assert one.json()["error_rate_warning"] == 0.03
        applied = (await client.get("/health/thresholds", params={"model_id": MODEL})).json()
        assert (applied["error_rate_warning"], applied["latency_p95_warning"]) == (0.03, 5)
        assert (await client.get("/health/thresholds")).json()["latency_p95_warning"] == 3000

        # The fake now waits 20 ms before every answer (a sleep is never shorter than asked,
        # however fast the machine), so every answer is slower than the 5 ms level: a
        # latency warning fires.
        upstream = plane.upstreams["v1"]
        upstream.delay_s = 0.02
        try:
            async with traffic(plane.gateway_url, MODEL):
                async def latency_alert() -> list[dict[str, Any]]:
                    alerts = (await client.get("/alerts", params={"model_id": MODEL})).json()
                    return [a for a in alerts if a["type"] == "latency"]

                [alert] = await eventually(latency_alert, "a latency alert")
        finally:
            upstream.delay_s = 0.0
        assert alert["severity"] == "warning" and "latency_p95_ms" in alert["title"]
        audit = (await client.get("/audit", params={"model_id": MODEL})).json()
        assert any(e["action"] == "thresholds_updated" for e in audit)



async def test_monitors_run_on_a_worker_of_their_own_when_given_a_queue(
        tmp_path: Path) -> None:
    queue = f"monitors-{uuid.uuid4()}"
    async with control_plane(tmp_path, monitoring_interval_s=1,
                             monitor_task_queue=queue) as plane:
        async with plane.http() as client:
            await register_upstreams(plane, client, ARCH, STAGE)
            started = await client.post("/switch", json={
                "model_id": MODEL, "target_version": "v1", "strategy": "immediate"})
            assert (await wait_switch(client, started.json()["operation_id"]))["status"] \
                == "completed"
            async with traffic(plane.gateway_url, MODEL):
                async def looked() -> dict[str, Any] | None:
                    v1 = version_health((await client.get("/health/models")).json(), "v1")
                    return v1 if v1 and v1["figures"]["requests"] > 0 else None

                await eventually(looked, "a look with figures, made on the monitor queue")
        handle = plane.env.client.get_workflow_handle(monitor_workflow_id(MODEL))
        assert (await handle.describe()).task_queue == queue


async def test_a_model_registered_a_moment_ago_is_listed_as_no_data(
        plane: ControlPlane) -> None:
    """Every registered model is in `GET /health/models` from the start: its versions
    `no_data` with why, and when the monitor looks."""
    arch = f"Fresh{uuid.uuid4().hex[:6]}"
    async with plane.http() as client:
        await register_upstreams(plane, client, arch, STAGE)
        report = (await client.get("/health/models")).json()
    [model] = [m for m in report["models"] if m["model_id"] == f"{arch}_{STAGE}"]
    assert {(v["version"], v["state"]) for v in model["versions"]} == {
        ("v1", "no_data"), ("v2", "no_data")}
    assert all(v["reason"] for v in model["versions"]), model
    assert model["next_look_at"] is not None


def _hold_the_store(db_path: str, seconds: float, held: threading.Event) -> None:
    """A real store outage for writers: another process's write transaction on the SQLite
    file (readers still read, as they do in WAL mode), for `seconds`."""
    connection = sqlite3.connect(db_path, timeout=60, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        connection.execute("ROLLBACK")
    finally:
        connection.close()


async def test_monitoring_survives_a_store_outage_and_a_stopped_monitor(
        plane: ControlPlane) -> None:
    """The store refuses every write for 80 s, longer than a look (a write waits out the
    store's 30 s busy timeout; a failed look is tried again at the next interval) and the
    store's own retries: the looks fail, `GET /health/models`
    says `unknown` with the reason, the monitor keeps running, and when the store is back
    the next look succeeds and says how many failed. A monitor that ended is started again
    by the keeper."""
    handle = plane.env.client.get_workflow_handle(monitor_workflow_id(MODEL))
    db_path = plane.settings.database_url.split("///", 1)[1]
    held = threading.Event()
    async with plane.http() as client:
        async def looked() -> bool:
            report = (await client.get("/health/models")).json()
            model = next(m for m in report["models"] if m["model_id"] == MODEL)
            return model["checked_at"] is not None

        await eventually(looked, "a first look at v1")
        outage = asyncio.create_task(asyncio.to_thread(_hold_the_store, db_path, 80, held))
        await asyncio.to_thread(held.wait, 10)

        async def unknown() -> dict[str, Any] | None:
            v1 = version_health((await client.get("/health/models")).json(), "v1")
            return v1 if v1 and v1["state"] == "unknown" else None

        v1 = await eventually(unknown, "v1 unknown while no look succeeds", timeout_s=60)
        assert v1["reason"].startswith("no look since ")
        assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING
        await outage

        async def recovered() -> dict[str, Any] | None:
            report = (await client.get("/health/models")).json()
            model = next(m for m in report["models"] if m["model_id"] == MODEL)
            v1 = version_health(report, "v1")
            if v1 and v1["state"] != "unknown" and model["failed_looks"] >= 1:
                return model
            return None

        model = await eventually(recovered, "a good look after the outage", timeout_s=90)
        assert "locked" in model["last_failure"], model
        assert (await handle.describe()).status is WorkflowExecutionStatus.RUNNING

        # The keeper restarts a monitor that ended (here: terminated by hand).
        first_run = (await handle.describe()).run_id
        await handle.terminate("a test stops the monitor")

        async def restarted() -> bool:
            now = await plane.env.client.get_workflow_handle(
                monitor_workflow_id(MODEL)).describe()
            return now.run_id != first_run and \
                now.status is WorkflowExecutionStatus.RUNNING

        await eventually(restarted, "the monitor started again by the keeper")
