"""The gateway in-process, in front of two fake engines, with a real SQLite store.

Clients are real: the official `openai` AsyncOpenAI client for the OpenAI endpoints and
aiohttp for admin calls and malformed requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import openai
import pytest
import pytest_asyncio

from gateway.app import AdminBindError, Gateway, RunningGateway, start_gateway
from gateway.proxy import MAX_JSON_DEPTH
from tests.integration.stores import TINY_MODEL, tiny_store
from tests.integration.upstream import FakeUpstream
from tests.support import free_port
from turnout.config import ModelSwitchingConfig
from turnout.domain import Backend, RegisterModelRequest
from turnout.rules import MAX_MATCHED_VALUE_CHARS, STORED, RoutingRules
from turnout.store import Store, upgrade_async
from turnout.telemetry.catalogue import Source

MODEL = TINY_MODEL
ALIAS = "org/tiny"
TOKEN = "s3cret-admin-token"
CLIENT_KEY = "client-k3y-0123456789abcdef"


@dataclass
class Env:
    store: Store
    v1: FakeUpstream
    v2: FakeUpstream
    gateway: Gateway
    running: RunningGateway
    url: str
    admin_url: str
    http: aiohttp.ClientSession
    client: openai.AsyncOpenAI
    headers: dict[str, str]

    async def route(self, weights: dict[str, float], key: str) -> int:
        ups = {"v1": self.v1, "v2": self.v2}
        backends = [Backend(version=v, weight=w, url=ups[v].url,
                            served_model_name=ups[v].served_model_name)
                    for v, w in weights.items()]
        route = await self.store.write_route(MODEL, backends, key)
        return route.generation

    async def refresh(self) -> dict[str, Any]:
        async with self.http.post(f"{self.admin_url}/admin/routes/refresh",
                                  headers=self.headers) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def get(self, path: str, *, admin: bool = False, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.get(f"{self.admin_url if admin else self.url}{path}",
                                 **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def post(self, path: str, *, admin: bool = False,
                   **kwargs: Any) -> tuple[int, Any, Any]:
        async with self.http.post(f"{self.admin_url if admin else self.url}{path}",
                                  **kwargs) as resp:
            return resp.status, await resp.json(), resp.headers


async def make_env(tmp_path: Path, *, token: str | None = None, v1_delay: float = 0.0,
                   v1_chunks: int = 3, v1_chunk_delay: float = 0.01, **settings: Any) -> Env:
    db_url, store = await tiny_store(tmp_path, aliases=(ALIAS,))
    await store.register_version(RegisterModelRequest(
        model="/models/other", model_arch="other", model_stage="default", version="v1"))
    v1 = await FakeUpstream("v1", "tiny-v1", delay_s=v1_delay, chunks=v1_chunks,
                            chunk_delay_s=v1_chunk_delay).start()
    v2 = await FakeUpstream("v2", "tiny-v2", chunk_delay_s=0.01).start()
    await store.write_route(MODEL, [Backend(version="v1", weight=100, url=v1.url,
                                            served_model_name="tiny-v1")], "initial")
    port, admin_port = free_port(), free_port()
    settings = ModelSwitchingConfig(gateway_host="127.0.0.1", gateway_port=port,
                                    gateway_admin_port=admin_port,
                                    database_url=db_url, gateway_admin_token=token,
                                    **settings)
    running = await start_gateway(settings, store, f"test-gw-{port}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Env(store=store, v1=v1, v2=v2, gateway=running.gateway, running=running,
               url=running.client_url, admin_url=running.admin_url,
               http=aiohttp.ClientSession(), headers=headers,
               client=openai.AsyncOpenAI(base_url=f"{running.client_url}/v1",
                                         api_key="unused", max_retries=0, timeout=30))


async def close_env(env: Env) -> None:
    await env.client.close()
    await env.http.close()
    await env.running.stop()
    await env.v1.stop()
    await env.v2.stop()
    await env.store.close()


@pytest_asyncio.fixture(loop_scope="session")
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await make_env(tmp_path)
    yield e
    await close_env(e)


async def test_models_and_health(env: Env) -> None:
    models = await env.client.models.list()
    assert [m.id for m in models.data] == [MODEL, ALIAS]
    assert await env.get("/health") == (200, {"status": "ok"})


async def test_completion_names_version_and_rewrites_model(env: Env) -> None:
    raw = await env.client.completions.with_raw_response.create(model=MODEL, prompt="hi",
                                                                max_tokens=4)
    assert raw.headers["x-turnout-version"] == "v1"
    completion = raw.parse()
    assert completion.choices[0].text == "hello from v1"
    assert env.v1.received[-1]["model"] == "tiny-v1"
    assert env.v1.received[-1]["prompt"] == "hi"


async def test_chat_through_alias(env: Env) -> None:
    raw = await env.client.chat.completions.with_raw_response.create(
        model=ALIAS, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-turnout-version"] == "v1"
    assert raw.parse().choices[0].message.content == "hello from v1"


async def test_streaming_completion_and_chat(env: Env) -> None:
    async with env.client.completions.with_streaming_response.create(
            model=MODEL, prompt="hi", stream=True) as response:
        assert response.headers["x-turnout-version"] == "v1"
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert len(lines) == 4

    stream = await env.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "hello from v1"
    stats = env.gateway.stats().stats[MODEL]["v1"]
    assert stats.ttfb_ms.count == 2
    # Three token events 10 ms apart per stream (the fake's pace), [DONE] not counted.
    assert stats.output_tokens == 6 and stats.itl_ms.count == 2
    assert stats.itl_ms.p50 is not None and stats.tokens_per_s.p50 is not None
    assert 8 <= stats.itl_ms.p50 <= 100 and 10 <= stats.tokens_per_s.p50 <= 125
    # The streams' inter-token latency and output rate are in the windows verdicts read.
    window = env.gateway.stats(0, time.time()).stats[MODEL]["v1"].window
    assert window is not None and window.histogram(Source.ITL).count == 2
    assert window.histogram(Source.OUTPUT_RATE).count == 2
    await env.client.completions.create(model=MODEL, prompt="hi")  # usage: 3 tokens
    assert env.gateway.stats().stats[MODEL]["v1"].output_tokens == 9
    _, text = await env.get("/metrics")
    assert "turnout_gateway_inter_token_latency_seconds_bucket" in text
    assert f'turnout_gateway_output_tokens_total{{model_id="{MODEL}",version="v1"}} 9.0' in text


async def test_route_change_and_stale_generation(env: Env) -> None:
    stale = await env.store.list_routes()
    generation = await env.route({"v1": 0, "v2": 100}, "to-v2")
    assert generation == 2
    state = await env.refresh()
    assert state["generations"] == {MODEL: 2}
    raw = await env.client.completions.with_raw_response.create(model=MODEL, prompt="x")
    assert raw.headers["x-turnout-version"] == "v2"
    assert raw.parse().choices[0].text == "hello from v2"
    assert env.v2.received[-1]["model"] == "tiny-v2"

    # A store read that lags behind (older generation) must not undo the switch.
    async def lagging_routes() -> list[Any]:
        return stale

    env.store.list_routes = lagging_routes  # type: ignore[method-assign]
    state = await env.refresh()
    assert state["generations"] == {MODEL: 2}
    raw = await env.client.completions.with_raw_response.create(model=MODEL, prompt="x")
    assert raw.headers["x-turnout-version"] == "v2"


async def test_reconcile_loop_picks_up_route_without_push(env: Env) -> None:
    await env.route({"v2": 100}, "loop")
    for _ in range(40):
        status, state = await env.get("/admin/state", admin=True)
        if state["generations"][MODEL] == 2:
            break
        await asyncio.sleep(0.1)
    assert state["generations"][MODEL] == 2


async def test_sticky_user_split(env: Env) -> None:
    await env.route({"v1": 50, "v2": 50}, "half")
    await env.refresh()
    seen: dict[str, set[str]] = {}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        for _ in range(4):
            raw = await env.client.completions.with_raw_response.create(
                model=MODEL, prompt="x", user=user)
            seen.setdefault(user, set()).add(raw.headers["x-turnout-version"])
        async with env.http.post(f"{env.url}/v1/completions",
                                 json={"model": MODEL, "prompt": "x"},
                                 headers={"X-Turnout-User": user}) as resp:
            assert resp.status == 200, await resp.text()
            seen[user].add(resp.headers["X-Turnout-Version"])
    assert all(len(versions) == 1 for versions in seen.values())
    assert set().union(*seen.values()) == {"v1", "v2"}


async def test_error_cases(env: Env) -> None:
    status, body, _ = await env.post("/v1/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}

    status, body, _ = await env.post("/v1/completions", json={"prompt": "x"})
    assert status == 400 and body["error"]["param"] == "model"

    with pytest.raises(openai.NotFoundError) as not_found:
        await env.client.completions.create(model="nope", prompt="x")
    assert not_found.value.status_code == 404

    # Registered but never routed: unavailable, not unknown.
    status, body, _ = await env.post("/v1/chat/completions",
                                     json={"model": "other_default", "messages": []})
    assert status == 503 and body["error"]["code"] == "model_unavailable"

    await env.route({"v1": 0, "v2": 0}, "nothing")
    await env.refresh()
    status, body, _ = await env.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert status == 503

    status, body = await env.get("/no/such/path")
    assert status == 404 and "error" in body


async def test_oversized_bodies_are_413_and_counted_apart(tmp_path: Path) -> None:
    env = await make_env(tmp_path, gateway_max_body_bytes=4096)
    try:
        status, body, _ = await env.post("/v1/completions",
                                         json={"model": MODEL, "prompt": "x" * 5000})
        assert status == 413 and body["error"]["code"] == "request_too_large"
        assert "4096" in body["error"]["message"]
        assert env.v1.received == []
        status, text = await env.get("/metrics")
        assert 'turnout_gateway_rejected_total{reason="too_large"} 1.0' in text
        assert MODEL not in env.gateway.stats().model_dump()["stats"]  # never charged to a version
        ok = await env.client.completions.create(model=MODEL, prompt="x" * 1000)
        assert ok.choices[0].text == "hello from v1"
    finally:
        await close_env(env)


async def test_upstream_failures(env: Env) -> None:
    dead = free_port()
    await env.store.write_route(MODEL, [Backend(version="v1", weight=100,
                                                url=f"http://127.0.0.1:{dead}",
                                                served_model_name="tiny-v1")], "dead")
    await env.refresh()
    status, body, headers = await env.post("/v1/completions",
                                           json={"model": MODEL, "prompt": "x"})
    assert status == 502 and body["error"]["type"] == "upstream_error"
    assert headers["X-Turnout-Version"] == "v1"
    # The client learns which version failed, not where it runs.
    assert "'v1'" in body["error"]["message"]
    assert str(dead) not in str(body) and "127.0.0.1" not in str(body)

    await env.route({"v2": 100}, "v2-failing")
    await env.refresh()
    env.v2.fail_status = 500
    with pytest.raises(openai.InternalServerError):
        await env.client.completions.create(model=MODEL, prompt="x")
    stats = env.gateway.stats().model_dump()["stats"][MODEL]
    assert stats["v1"]["errors"] == 1 and stats["v2"]["errors"] == 1
    assert stats["v1"]["inflight"] == 0 and stats["v2"]["inflight"] == 0


async def test_failover_to_the_stable_version_before_the_first_byte(env: Env) -> None:
    """During a rollout (v1 live, v2 taking a share), a v2 that refuses connections or
    answers 5xx costs the client nothing: the request is retried once on v1, and v2 is
    charged the error. 4xx answers are the request's fault: passed through, not retried."""
    await env.store.set_live_version(MODEL, "v1")
    await env.route({"v1": 50, "v2": 50}, "split-for-failover")
    await env.refresh()
    users = [f"user-{i}" for i in range(40)]  # sticky keys on both sides of the split

    env.v2.fail_status = 503
    answers = [await env.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                       "user": u}) for u in users]
    assert {status for status, _, _ in answers} == {200}
    assert {headers["X-Turnout-Version"] for _, _, headers in answers} == {"v1"}
    stats = env.gateway.stats().model_dump()["stats"][MODEL]
    failed_on_v2 = stats["v2"]["errors"]
    assert 5 < failed_on_v2 < 35 and stats["v1"]["errors"] == 0

    env.v2.fail_status = 400
    statuses = {(await env.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                          "user": u}))[0] for u in users}
    assert statuses == {200, 400}
    assert env.gateway.stats().model_dump()["stats"][MODEL]["v2"]["errors"] == failed_on_v2
    env.v2.fail_status = None

    await env.v2.stop()  # connection refused
    for user in users[:10]:
        async with env.client.completions.with_streaming_response.create(
                model=MODEL, prompt="hi", stream=True, user=user) as response:
            assert response.headers["x-turnout-version"] == "v1"
            lines = [line async for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and '"model": "tiny-v1"' in lines[0]
    answers = [await env.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                       "user": u}) for u in users]
    assert {status for status, _, _ in answers} == {200}
    status, text = await env.get("/metrics")
    assert f'turnout_gateway_failovers_total{{model_id="{MODEL}",to="v1",version="v2"}}' in text
    assert 'class="connect"' in text and 'class="5xx"' in text and 'class="4xx"' in text
    stats = env.gateway.stats().model_dump()["stats"][MODEL]
    assert stats["v2"]["errors"] > failed_on_v2 and stats["v2"]["inflight"] == 0


async def test_no_failover_when_the_stable_version_itself_fails(env: Env) -> None:
    await env.store.set_live_version(MODEL, "v1")
    await env.route({"v1": 100}, "stable-only")
    await env.refresh()
    env.v1.fail_status = 500
    status, body, headers = await env.post("/v1/completions",
                                           json={"model": MODEL, "prompt": "x"})
    env.v1.fail_status = None
    assert status == 500 and headers["X-Turnout-Version"] == "v1"


async def test_metrics_exposed(env: Env) -> None:
    await env.client.completions.create(model=MODEL, prompt="x")
    status, text = await env.get("/metrics")
    assert status == 200
    assert f'turnout_gateway_requests_total{{model_id="{MODEL}",version="v1"}} 1.0' in text
    assert "turnout_gateway_request_latency_seconds_bucket" in text
    assert f'turnout_gateway_route_generation{{model_id="{MODEL}"}} 1.0' in text


async def test_inflight_rises_and_falls(tmp_path: Path) -> None:
    env = await make_env(tmp_path, v1_delay=0.8)
    try:
        task = asyncio.create_task(env.client.completions.create(model=MODEL, prompt="x"))
        inflight = 0
        for _ in range(50):
            _, state = await env.get("/admin/state", admin=True)
            inflight = state["inflight"].get(MODEL, {}).get("v1", 0)
            if inflight:
                break
            await asyncio.sleep(0.02)
        assert inflight == 1
        await task
        _, state = await env.get("/admin/state", admin=True)
        assert state["inflight"] == {MODEL: {"v1": 0}}
        _, stats = await env.get("/admin/stats", admin=True)
        v1 = stats["stats"][MODEL]["v1"]
        assert v1["requests"] == 1 and v1["errors"] == 0 and v1["inflight"] == 0
        assert v1["latency_ms"]["count"] == 1 and v1["latency_ms"]["p50"] >= 800
        assert set(v1["latency_ms"]) == {"p50", "p95", "p99", "count"}
    finally:
        await close_env(env)


async def test_client_disconnect_cancels_upstream(tmp_path: Path) -> None:
    env = await make_env(tmp_path, v1_delay=2.0)
    try:
        with pytest.raises(asyncio.TimeoutError):
            async with env.http.post(f"{env.url}/v1/completions",
                                     json={"model": MODEL, "prompt": "x"},
                                     timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
        for _ in range(50):
            if env.v1.cancelled:
                break
            await asyncio.sleep(0.05)
        assert env.v1.cancelled == 1 and env.v1.completed == 0
        assert env.gateway.state().model_dump()["inflight"] == {MODEL: {"v1": 0}}
    finally:
        await close_env(env)


async def test_client_leaving_a_stream_cancels_upstream(tmp_path: Path) -> None:
    env = await make_env(tmp_path, v1_chunks=50, v1_chunk_delay=0.1)
    try:
        async with env.http.post(f"{env.url}/v1/completions",
                                 json={"model": MODEL, "prompt": "x", "stream": True}) as resp:
            assert (resp.status, resp.headers["X-Turnout-Version"]) == (200, "v1")
            first = await resp.content.readany()
            assert first.startswith(b"data: ")
            resp.close()  # drop the connection mid-stream
        for _ in range(50):
            if env.v1.cancelled:
                break
            await asyncio.sleep(0.05)
        assert env.v1.cancelled == 1 and env.v1.completed == 0
        for _ in range(50):
            if env.gateway.state().model_dump()["inflight"] == {MODEL: {"v1": 0}}:
                break
            await asyncio.sleep(0.05)
        assert env.gateway.state().model_dump()["inflight"] == {MODEL: {"v1": 0}}
        assert env.gateway.stats().model_dump()["stats"][MODEL]["v1"]["errors"] == 0
    finally:
        await close_env(env)


async def test_admin_token_enforced(tmp_path: Path) -> None:
    env = await make_env(tmp_path, token=TOKEN)
    try:
        status, body = await env.get("/admin/state", admin=True)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, body = await env.get("/admin/state", admin=True,
                                     headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, body, _ = await env.post("/admin/routes/refresh", admin=True)
        assert status == 401
        status, body = await env.get("/admin/state", admin=True, headers=env.headers)
        assert status == 200 and body["generations"] == {MODEL: 1}
        assert (await env.refresh())["gateway_id"] == env.gateway.gateway_id
        # The OpenAI endpoints stay open, and never expose an admin action.
        assert (await env.client.completions.create(model=MODEL, prompt="x")).choices
        for path in ("/admin/state", "/admin/stats"):
            assert (await env.get(path, headers=env.headers))[0] == 404
        assert (await env.post("/admin/routes/refresh", headers=env.headers))[0] == 404
    finally:
        await close_env(env)


async def test_open_admin_endpoints_only_on_loopback(tmp_path: Path) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'turnout.db'}"
    await upgrade_async(db_url)
    store = Store.from_url(db_url)
    port = free_port()
    settings = ModelSwitchingConfig(gateway_port=port, gateway_admin_host="0.0.0.0",
                                    gateway_admin_port=free_port(), database_url=db_url)
    try:
        with pytest.raises(AdminBindError, match="GATEWAY_ADMIN_TOKEN"):
            await start_gateway(settings, store, "open-admin")
        with pytest.raises(OSError):  # nothing was left listening
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        await store.close()


async def test_heartbeat_and_clean_removal(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    try:
        gateways = []
        for _ in range(40):
            gateways = await env.store.live_gateways(30)
            if gateways:
                break
            await asyncio.sleep(0.05)
        assert [(g.gateway_id, g.admin_url) for g in gateways] == [
            (env.gateway.gateway_id, env.admin_url)]
        await env.running.stop()
        assert await env.store.live_gateways(30) == []
    finally:
        await close_env(env)


async def test_store_outage_keeps_serving(env: Env) -> None:
    async def broken() -> list[Any]:
        raise ConnectionError("database is gone")

    env.store.list_routes = broken  # type: ignore[method-assign]
    async with env.http.post(f"{env.admin_url}/admin/routes/refresh") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "store_unreachable"
    await asyncio.sleep(1.2)  # at least one failing reconcile tick
    raw = await env.client.completions.with_raw_response.create(model=MODEL, prompt="x")
    assert raw.headers["x-turnout-version"] == "v1"


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


async def test_deeply_nested_bodies_are_400_and_the_deepest_allowed_passes(env: Env) -> None:
    """Python's parser raises RecursionError near 1,000 levels (a 500 before); any body
    nesting deeper than the limit is refused in OpenAI's shape before reaching an engine."""
    for depth in (MAX_JSON_DEPTH, 5000, 100_000):  # the body itself is one more level
        extra = "[" * depth + "]" * depth
        raw = f'{{"model": "{MODEL}", "prompt": "x", "extra": {extra}}}'
        status, body, _ = await env.post("/v1/completions", data=raw.encode(),
                                         headers={"Content-Type": "application/json"})
        assert status == 400, body
        assert body["error"]["code"] == "json_too_deep"
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert env.v1.received == []
    limit = {"model": MODEL, "prompt": "x", "extra": nested(MAX_JSON_DEPTH - 1)}
    status, body, _ = await env.post("/v1/completions", json=limit)
    assert status == 200 and env.v1.received[-1]["extra"] == limit["extra"]
    _, text = await env.get("/metrics")
    assert 'turnout_gateway_rejected_total{reason="bad_request"} 3.0' in text


async def test_a_catastrophic_regex_rule_does_not_slow_the_gateway(env: Env) -> None:
    """`(a+)+$` on a header, and a header value of a's ending in '!': with Python's `re`
    the gateway's event loop would backtrack for ever on it; with RE2 the request is as
    fast as one without the header (the rule is tried on every request: its version is
    in the route)."""
    await env.route({"v1": 99.99, "v2": 0.01}, "v2-a-sliver")
    await env.store.set_rules(MODEL, RoutingRules.model_validate({"rules": [
        {"name": "evil", "match": {"header": {"name": "X-Evil", "regex": "(a+)+$"}},
         "version": "v2"}]}))
    await env.refresh()
    hostile = {"X-Evil": "a" * (MAX_MATCHED_VALUE_CHARS - 1) + "!"}
    assert (await env.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                           headers={"X-Evil": "aaaa"}))[2]["X-Turnout-Version"] == "v2"

    async def timed(headers: dict[str, str]) -> float:
        started = asyncio.get_running_loop().time()
        status, _, answer = await env.post("/v1/completions", headers=headers,
                                           json={"model": MODEL, "prompt": "x",
                                                 "user": "same-user"})
        assert status == 200 and answer["X-Turnout-Version"] == "v1"
        return asyncio.get_running_loop().time() - started

    plain, evil = [], []
    for _ in range(30):  # interleaved, so both see the same machine
        plain.append(await timed({}))
        evil.append(await timed(hostile))
    plain.sort()
    evil.sort()
    assert evil[15] < plain[15] * 2, (evil[15], plain[15])
    assert evil[-1] < 1.0  # not one request stalled


async def test_a_stored_rule_re2_refuses_is_skipped_and_the_others_apply(env: Env) -> None:
    """A rule saved before RE2 (Python's lookahead) in the store: the gateway keeps
    loading the model's rules and serving; that rule never matches, the next one does."""
    await env.route({"v1": 99.99, "v2": 0.01}, "v2-a-sliver")
    legacy = RoutingRules.model_validate({"rules": [
        {"name": "old", "match": {"header": {"name": "X-Team", "regex": "^(?!ml)"}},
         "version": "v2"},
        {"name": "ml", "match": {"header": {"name": "X-Team", "regex": "^ml"}},
         "version": "v2"}]}, context=STORED)
    await env.store.set_rules(MODEL, legacy)
    await env.refresh()
    for team, version in (("search", "v1"), ("ml-infra", "v2")):
        status, _, headers = await env.post("/v1/completions", headers={"X-Team": team},
                                            json={"model": MODEL, "prompt": "x", "user": "u"})
        assert (status, headers["X-Turnout-Version"]) == (200, version)
    assert [r.name for r in (await env.store.get_rules(MODEL)).rules] == ["old", "ml"]


async def test_connections_per_upstream_are_limited(tmp_path: Path) -> None:
    env = await make_env(tmp_path, v1_delay=0.4, gateway_upstream_max_connections=2)
    try:
        answers = await asyncio.gather(*(
            env.client.completions.create(model=MODEL, prompt="x") for _ in range(5)))
        assert [a.choices[0].text for a in answers] == ["hello from v1"] * 5
        assert env.v1.max_active == 2  # the other three waited for a connection
        assert env.gateway.stats().model_dump()["stats"][MODEL]["v1"]["errors"] == 0
    finally:
        await close_env(env)


async def test_stats_of_a_version_in_no_route_are_forgotten_after_the_retention(
        tmp_path: Path) -> None:
    env = await make_env(tmp_path, gateway_stats_retention_s=1)
    try:
        await env.client.completions.create(model=MODEL, prompt="x")
        await env.route({"v2": 100}, "all-to-v2")
        await env.refresh()
        await env.client.completions.create(model=MODEL, prompt="x")
        _, stats = await env.get("/admin/stats", admin=True, params={"since": "0"})
        assert stats["stats"][MODEL]["v1"]["window"]["requests"] == 1  # still there
        for _ in range(60):
            _, stats = await env.get("/admin/stats", admin=True)
            if "v1" not in stats["stats"][MODEL]:
                break
            await asyncio.sleep(0.1)
        assert set(stats["stats"][MODEL]) == {"v2"}
        _, text = await env.get("/metrics")
        assert 'version="v1"' not in text and 'version="v2"' in text
        await asyncio.sleep(1.5)  # the routed version stays, however long
        _, stats = await env.get("/admin/stats", admin=True)
        assert stats["stats"][MODEL]["v2"]["requests"] == 1
    finally:
        await close_env(env)


async def test_client_keys_are_required_when_set(tmp_path: Path) -> None:
    env = await make_env(tmp_path, gateway_api_keys=[CLIENT_KEY, "second-key-0123456789"])
    try:
        with pytest.raises(openai.AuthenticationError) as refused:
            await env.client.completions.create(model=MODEL, prompt="x")  # key "unused"
        assert refused.value.status_code == 401
        assert refused.value.code == "invalid_api_key"
        keyed = openai.AsyncOpenAI(base_url=f"{env.url}/v1", api_key=CLIENT_KEY,
                                   max_retries=0, timeout=30)
        try:
            completion = await keyed.completions.create(model=MODEL, prompt="x")
            assert completion.choices[0].text == "hello from v1"
            stream = await keyed.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
            assert "".join([c.choices[0].delta.content or "" async for c in stream]) == \
                "hello from v1"
            assert [m.id for m in (await keyed.models.list()).data] == [MODEL, ALIAS]
        finally:
            await keyed.close()
        # The key is the gateway's: engines never see it.
        assert env.v1.headers and all("Authorization" not in h for h in env.v1.headers)

        for headers in ({}, {"Authorization": "Bearer wrong-key"},
                        {"Authorization": CLIENT_KEY}, {"Authorization": "Basic eDp5"},
                        {"Authorization": "Bearer ключ-0123456789abcdef"}):
            status, body, answer = await env.post(
                "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
            assert status == 401, headers
            assert body["error"]["code"] == "invalid_api_key"
            assert answer["WWW-Authenticate"] == "Bearer"
            assert CLIENT_KEY not in str(body)
        assert (await env.get("/no/such/path"))[0] == 401  # nothing to learn without a key
        assert await env.get("/health") == (200, {"status": "ok"})  # probes stay open
        assert (await env.get("/metrics"))[0] == 401
        status, text = await env.get("/metrics", headers={"Authorization": f"Bearer "
                                                                          f"{CLIENT_KEY}"})
        assert status == 200 and 'turnout_gateway_rejected_total{reason="unauthorized"}' \
            in text
        assert (await env.get("/metrics", admin=True))[0] == 200  # the admin listener's

        # Bytes that are not UTF-8 in the header: still a 401 in OpenAI's shape, not a 500.
        host, port = env.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        payload = b'{"model": "%s", "prompt": "x"}' % MODEL.encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n"
                     b"Authorization: Bearer \xff\xfe\xc3\x28-0123456789abcdef\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
        assert b'"invalid_api_key"' in raw
    finally:
        await close_env(env)


async def test_metrics_can_live_on_the_admin_listener_only(tmp_path: Path) -> None:
    env = await make_env(tmp_path, gateway_metrics_on_client=False)
    try:
        await env.client.completions.create(model=MODEL, prompt="x")
        assert (await env.get("/metrics"))[0] == 404
        status, text = await env.get("/metrics", admin=True)
        assert status == 200 and "turnout_gateway_requests_total" in text
    finally:
        await close_env(env)


class _Collected:
    """httptools callbacks: an HTTP answer's headers and de-framed body."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_a_stream_reaches_http_1_0_and_1_1_clients_whole(tmp_path: Path,
                                                              version: str) -> None:
    """Every event of a 40-chunk stream arrives, in order, framed as the client's HTTP
    version wants it: chunked for 1.1, the bare stream up to the close for 1.0."""
    env = await make_env(tmp_path, v1_chunks=40, v1_chunk_delay=0.001)
    try:
        host, port = env.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"model": MODEL, "prompt": "x", "stream": True}).encode()
        writer.write(f"POST /v1/completions HTTP/{version}\r\nHost: {host}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        raw = await asyncio.wait_for(reader.read(), 10)  # to the close
        writer.close()
        answer = _Collected()
        httptools.HttpResponseParser(answer).feed_data(raw)
        assert (answer.headers.get(b"transfer-encoding") == b"chunked") == (version == "1.1")
        events = [e for e in bytes(answer.body).split(b"\n\n") if e]
        assert all(e.startswith(b"data: ") for e in events), events
        assert events[-1] == b"data: [DONE]" and len(events) == 41
        texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
        assert "".join(texts) == "hello from v1"
    finally:
        await close_env(env)
