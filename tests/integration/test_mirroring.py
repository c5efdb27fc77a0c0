"""Traffic mirroring: a real gateway copies a share of requests to a shadow version.

Two fake engines (v1 serves, v2 is the shadow) behind the real gateway with a real SQLite
store; clients are real HTTP clients (aiohttp, and the `openai` package once). What the
clients get must never depend on the shadow; what the shadow does must show in the
gateway's metrics under its own version, as any served version's would.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai

from gateway.app import RunningGateway, start_gateway
from tests.integration.stores import TINY_MODEL, tiny_store
from tests.integration.upstream import FakeUpstream
from tests.support import free_port
from turnout.config import ModelSwitchingConfig
from turnout.domain import Backend
from turnout.store import Store

MODEL = TINY_MODEL
PATHS = {False: "/v1/completions", True: "/v1/chat/completions"}


@dataclass
class Answer:
    status: int
    version: str | None
    text: str
    seconds: float


@dataclass
class Env:
    store: Store
    v1: FakeUpstream
    v2: FakeUpstream
    running: RunningGateway
    http: aiohttp.ClientSession

    async def route(self, mirror_percent: float | None, key: str) -> None:
        """v1 serves everything; v2 is a shadow at `mirror_percent` (None: not in the route)."""
        backends = [Backend(version="v1", weight=100, url=self.v1.url,
                            served_model_name=self.v1.served_model_name)]
        if mirror_percent is not None:
            backends.append(Backend(version="v2", weight=0, mirror_percent=mirror_percent,
                                    url=self.v2.url,
                                    served_model_name=self.v2.served_model_name))
        await self.store.write_route(MODEL, backends, key)
        async with self.http.post(f"{self.running.admin_url}/admin/routes/refresh") as resp:
            assert resp.status == 200, await resp.text()

    async def ask(self, *, chat: bool = False, stream: bool = False, tag: str = "hi",
                  timeout_s: float = 30.0) -> Answer:
        """One client request; the whole answer is read (a stream to its end)."""
        body: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": tag}]
        else:
            body["prompt"] = tag
        started = time.monotonic()
        async with self.http.post(f"{self.running.client_url}{PATHS[chat]}", json=body,
                                  timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            text = await resp.text()
            return Answer(resp.status, resp.headers.get("X-Turnout-Version"), text,
                          time.monotonic() - started)

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.running.admin_url}/admin/stats",
                                 params={"model_id": MODEL, "since": "0"}) as resp:
            assert resp.status == 200
            return (await resp.json())["stats"].get(MODEL, {})

    async def inflight(self) -> dict[str, int]:
        async with self.http.get(f"{self.running.admin_url}/admin/state") as resp:
            return (await resp.json())["inflight"].get(MODEL, {})

    async def metric(self, name: str, version: str = "v2", **labels: str) -> float:
        """A sample of the gateway's client `/metrics` (0 when the series does not exist)."""
        async with self.http.get(f"{self.running.client_url}/metrics") as resp:
            text = await resp.text()
        wanted = {"model_id": MODEL, "version": version, **labels}
        for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if found == wanted:
                return float(match.group(2))
        return 0.0

    async def shadow_settled(self, requests: int, timeout_s: float = 10.0) -> dict[str, Any]:
        """v2's stats once it counted `requests` copies and none is in flight."""
        async def done() -> bool:
            v2 = (await self.stats()).get("v2")
            return v2 is not None and v2["requests"] == requests and v2["inflight"] == 0

        await wait_until(done, timeout_s)
        return (await self.stats())["v2"]


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def mirrored(tmp_path: Path, mirror_percent: float | None, *, v1_delay_s: float = 0.0,
                   shadow: dict[str, Any] | None = None, **settings: Any
                   ) -> AsyncIterator[Env]:
    """A gateway in front of v1 (served) and v2 (shadow at `mirror_percent`)."""
    db_url, store = await tiny_store(tmp_path)
    v1 = await FakeUpstream("v1", "tiny-v1", delay_s=v1_delay_s, chunk_delay_s=0.005).start()
    v2 = await FakeUpstream("v2", "tiny-v2", chunk_delay_s=0.005, **(shadow or {})).start()
    config = ModelSwitchingConfig(gateway_port=free_port(), gateway_admin_port=free_port(),
                                  database_url=db_url, **settings)
    running = await start_gateway(config, store, f"mirror-gw-{config.gateway_port}")
    env = Env(store, v1, v2, running, aiohttp.ClientSession())
    try:
        await env.route(mirror_percent, "mirror-test")
        yield env
    finally:
        await env.http.close()
        await running.stop()
        await v1.stop()
        await v2.stop()
        await store.close()


def _prompt(body: dict[str, Any]) -> str:
    return body["messages"][0]["content"] if "messages" in body else body["prompt"]


async def test_every_request_copied_at_100_percent_and_clients_only_see_v1(
        tmp_path: Path) -> None:
    async with mirrored(tmp_path, 100) as env:
        answers = [await env.ask(chat=chat, stream=stream, tag=f"q{i}-{chat}-{stream}")
                   for i in range(3) for chat in (False, True) for stream in (False, True)]
        async with openai.AsyncOpenAI(base_url=f"{env.running.client_url}/v1",
                                      api_key="unused", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "sdk"}])
        assert raw.headers["x-turnout-version"] == "v1"
        assert raw.parse().choices[0].message.content == "hello from v1"
        for answer in answers:
            assert (answer.status, answer.version) == (200, "v1")
            # v1's answer (its served name is in every plain body and streamed event)...
            assert '"model": "tiny-v1"' in answer.text
            assert "tiny-v2" not in answer.text and "from v2" not in answer.text  # ...alone

        v2 = await env.shadow_settled(13)
        assert {b["model"] for b in env.v2.received} == {"tiny-v2"}
        assert {b["model"] for b in env.v1.received} == {"tiny-v1"}
        assert sorted(map(_prompt, env.v2.received)) == sorted(map(_prompt, env.v1.received))
        assert sum(1 for b in env.v2.received if b.get("stream")) == 6
        assert env.v2.completed == 13  # every copy was read to the end, not cut off
        assert v2["errors"] == 0 and v2["window"]["requests"] == 13
        assert v2["ttfb_ms"]["count"] == 6  # the streamed copies were measured
        assert v2["output_tokens"] > 0 and v2["latency_ms"]["count"] == 13
        assert await env.metric("turnout_gateway_mirrored_total") == 13
        assert await env.metric("turnout_gateway_mirror_skipped_total") == 0
        assert await env.metric("turnout_gateway_requests_total", "v1") == 13


async def test_mirrors_about_the_configured_share(tmp_path: Path) -> None:
    async with mirrored(tmp_path, 30) as env:
        n = 400
        for start in range(0, n, 20):
            batch = await asyncio.gather(*(env.ask(tag=f"q{i}")
                                           for i in range(start, start + 20)))
            assert {(a.status, a.version) for a in batch} == {(200, "v1")}
        copied = await env.metric("turnout_gateway_mirrored_total")
        assert 0.20 * n <= copied <= 0.40 * n, copied
        await env.shadow_settled(int(copied))
        assert len(env.v2.received) == copied


async def test_failing_shadow_changes_nothing_for_clients(tmp_path: Path) -> None:
    async with mirrored(tmp_path, 100, shadow={"fail_status": 500}) as env:
        answers = [await env.ask(chat=i % 2 == 1, stream=i % 3 == 0) for i in range(20)]
        assert {(a.status, a.version) for a in answers} == {(200, "v1")}
        v2 = await env.shadow_settled(20)
        assert v2["errors"] == 20 and v2["window"]["errors"] == 20
        assert (await env.stats())["v1"]["errors"] == 0
        assert await env.metric("turnout_gateway_upstream_errors_total", **{"class": "5xx"}) \
            == 20
        assert await env.metric("turnout_gateway_failovers_total", to="v1") == 0


async def test_slow_shadow_does_not_slow_clients(tmp_path: Path) -> None:
    delay_s = 1.5
    async with mirrored(tmp_path, 100, shadow={"delay_s": delay_s}) as env:
        started = time.monotonic()
        answers = [await env.ask(stream=i % 2 == 0) for i in range(8)]
        assert time.monotonic() - started < delay_s  # all eight before one copy answered
        assert {(a.status, a.version) for a in answers} == {(200, "v1")}
        assert max(a.seconds for a in answers) < delay_s / 3
        assert (await env.inflight())["v2"] == 8  # draining would wait for the copies
        v2 = await env.shadow_settled(8)
        assert v2["latency_ms"]["p50"] >= delay_s * 1000


async def test_client_disconnect_does_not_cancel_the_copy(tmp_path: Path) -> None:
    async with mirrored(tmp_path, 100, v1_delay_s=2.0, shadow={"delay_s": 0.5}) as env:
        try:
            await env.ask(timeout_s=0.2)
        except TimeoutError:
            pass
        else:
            raise AssertionError("the client should have given up on the slow v1")
        await wait_until(lambda: _true(env.v1.cancelled == 1), 5.0)
        v2 = await env.shadow_settled(1)
        assert v2["errors"] == 0 and v2["latency_ms"]["count"] == 1
        assert (env.v2.completed, env.v2.cancelled) == (1, 0)


async def _true(value: bool) -> bool:
    return value


async def test_inflight_cap_skips_and_counts_copies(tmp_path: Path) -> None:
    async with mirrored(tmp_path, 100, shadow={"delay_s": 30.0},
                        gateway_mirror_max_inflight=2) as env:
        answers = [await env.ask() for _ in range(10)]
        assert {(a.status, a.version) for a in answers} == {(200, "v1")}
        assert await env.metric("turnout_gateway_mirrored_total") == 2
        assert await env.metric("turnout_gateway_mirror_skipped_total") == 8
        assert (await env.inflight())["v2"] == 2
        await wait_until(lambda: _true(len(env.v2.received) == 2), 5.0)
        gateway = env.running.gateway
    # Stopping the gateway cancelled the two copies still waiting on the shadow.
    assert gateway.proxy.mirrors == set()
    assert gateway.metrics.inflight_by_model()[MODEL]["v2"] == 0
    assert env.v2.completed == 0


async def test_route_without_shadow_mirrors_nothing(tmp_path: Path) -> None:
    async with mirrored(tmp_path, None) as env:
        answers = [await env.ask(stream=i % 2 == 0) for i in range(10)]
        assert {(a.status, a.version) for a in answers} == {(200, "v1")}
        await env.route(0, "v2-weight-0-no-mirror")  # in the route, but not a shadow
        answers = [await env.ask() for _ in range(10)]
        assert {(a.status, a.version) for a in answers} == {(200, "v1")}
        assert env.running.gateway.table.shadows == {}
        assert env.v2.received == []
        assert "v2" not in await env.stats()
        assert await env.metric("turnout_gateway_mirrored_total") == 0
