"""Two gateway processes on one port (`GATEWAY_WORKERS=2`): both serve clients, both apply
a route change before the traffic activity returns, and a version's requests are counted
once, in the verdicts' merged windows and in the merged Prometheus metrics.

A real `python -m gateway` supervisor with two workers beside the `plane` fixture's own
gateway (real Temporal, API, workers, store; fake external engines), all on real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from temporalio.testing import ActivityEnvironment

from activities.gateway_admin import GatewayAdmin
from activities.traffic import TrafficActivities
from tests.integration.plane import ControlPlane, first_version_live
from tests.support import free_port
from turnout import contracts as c

pytestmark = pytest.mark.asyncio(loop_scope="session")

ARCH, STAGE = "WorkersArch", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"
GATEWAY_ID = "two-workers"
WORKER_IDS = {f"{GATEWAY_ID}-w0", f"{GATEWAY_ID}-w1"}


def two_free_ports() -> int:
    """A port p such that p and p + 1 are free (the workers' admin ports)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


class Workers:
    def __init__(self, process: asyncio.subprocess.Process, url: str,
                 admin_ports: list[int]) -> None:
        self.process, self.url = process, url
        self.admin_urls = [f"http://127.0.0.1:{p}" for p in admin_ports]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def workers(plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[Workers]:
    port, admin = free_port(), two_free_ports()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODEL_SWITCHING_")}
    env.update(VLLM_MODEL_SWITCHING_DATABASE_URL=plane.settings.database_url,
               VLLM_MODEL_SWITCHING_GATEWAY_PORT=str(port),
               VLLM_MODEL_SWITCHING_GATEWAY_ADMIN_PORT=str(admin),
               VLLM_MODEL_SWITCHING_GATEWAY_WORKERS="2")
    log = (tmp_path_factory.mktemp("workers") / "gateway.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--gateway-id", GATEWAY_ID, "--log-level", "INFO",
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while {g.gateway_id for g in await plane.store.live_gateways(30)} < WORKER_IDS:
            assert process.returncode is None, "the gateway supervisor exited"
            assert time.monotonic() < deadline, "the two workers never heartbeat"
            await asyncio.sleep(0.2)
        found = Workers(process, f"http://127.0.0.1:{port}", [admin, admin + 1])
        async with httpx.AsyncClient(timeout=2) as client:
            for url in (found.url, *found.admin_urls):  # each listener up
                while True:
                    assert time.monotonic() < deadline, f"nothing answers at {url}"
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{url}/health" if url == found.url
                                             else f"{url}/admin/state")).status_code == 200:
                            break
                    await asyncio.sleep(0.2)
        yield found
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)
        log.close()
        # Both workers left the store on their way out: switches stop waiting for them.
        assert not WORKER_IDS & {g.gateway_id for g in await plane.store.live_gateways(30)}


async def stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"{url}/admin/stats")).json()["stats"].get(MODEL_ID, {})


async def send(url: str, n: int) -> None:
    """`n` completions, each on a connection of its own (the kernel spreads connections,
    not requests, over the workers)."""
    for i in range(n):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            answer = await client.post("/v1/completions", json={
                "model": MODEL_ID, "prompt": "hi", "user": f"u{i}"})
            assert answer.status_code == 200, answer.text


async def test_both_workers_serve_one_port(plane: ControlPlane, workers: Workers) -> None:
    async with plane.http() as client:
        await first_version_live(plane, client, ARCH, STAGE)
    await send(workers.url, 40)
    served = [sum(v["requests"] for v in (await stats(url)).values())
              for url in workers.admin_urls]
    assert sum(served) == 40 and min(served) > 0, served


async def test_both_apply_a_route_change_before_the_traffic_activity_returns(
        plane: ControlPlane, workers: Workers) -> None:
    admin = GatewayAdmin(None)
    generation = (await plane.store.get_route(MODEL_ID)).generation  # type: ignore[union-attr]
    try:
        traffic = TrafficActivities(plane.settings, plane.store, admin)
        result = await ActivityEnvironment().run(traffic.set_traffic, c.SetTrafficInput(
            model_id=MODEL_ID, weights={"v1": 100}, change_key="workers-new-generation"))
        assert result.generation == generation + 1, result  # a new route, not a no-op
        assert WORKER_IDS <= set(result.gateways), result
        for url in workers.admin_urls:  # no wait: confirmed means served
            async with httpx.AsyncClient(timeout=10) as client:
                state = (await client.get(f"{url}/admin/state")).json()
            assert state["generations"][MODEL_ID] == result.generation, (url, state)
    finally:
        await admin.close()


async def test_a_versions_requests_are_counted_once_when_merged(
        plane: ControlPlane, workers: Workers) -> None:
    since = time.time()
    before = await merged_requests(workers.url)
    await send(workers.url, 30)
    until = time.time()
    # Verdicts: every gateway's window of the model, merged as the health activity does.
    admin = GatewayAdmin(None)
    try:
        windows, skipped = await admin.model_stats(await plane.store.live_gateways(30),
                                                   MODEL_ID, since, until)
    finally:
        await admin.close()
    assert skipped == []
    assert sum(v.window.requests for w in windows for v in w.values() if v.window) == 30
    # Prometheus: whichever worker a scrape lands on, it shows both workers' requests.
    for _ in range(6):
        after = await merged_requests(workers.url)
        assert sum(after.values()) - sum(before.values()) == 30, (before, after)


async def merged_requests(url: str) -> dict[str, float]:
    """`turnout_gateway_requests_total` of the model by version, from `/metrics` on the
    shared client port, on a fresh connection (so on any worker)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "turnout_gateway_requests_total" and \
                    sample.labels.get("model_id") == MODEL_ID:
                found[sample.labels["version"]] = sample.value
    return found
