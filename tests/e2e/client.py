"""What the e2e modules do as clients of a running stack: load on a gateway, calls of the
API, a switch started and waited for. Every helper fails on an answer it did not expect
(an API 500 fails at once, never as a long timeout)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx

from tests.replay.recording import recording, save_history
from turnout.runtime import connect_temporal
from turnout.store import Store
from turnout.telemetry.statistics import quantile
from workers.stack import Stack

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], what: str, timeout_s: float) -> T:
    """`check()`'s first true result, looked for every 0.2 s for up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        await asyncio.sleep(0.2)


class Load:
    """One client sending completions of `model_id` through a gateway without pause.

    With `stream` each answer is read chunk by chunk and counts as served only when it
    ends with `data: [DONE]`; `in_flight` is how many streams have begun and not ended.
    """

    def __init__(self, gateway_url: str, model_id: str, *, stream: bool = False) -> None:
        self.gateway_url = gateway_url
        self.model_id = model_id
        self.stream = stream
        self.served: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.failure_seconds: list[float] = []  # how long each failed request took
        self.in_flight = 0
        # (monotonic time it ended, version, seconds) of each plain answer served.
        self.timeline: list[tuple[float, str, float]] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.gateway_url, timeout=60) as client:
            while not self._stop.is_set():
                failed, began = len(self.failures), time.monotonic()
                try:
                    if self.stream:
                        await self._streamed(client)
                    else:
                        await self._plain(client)
                except httpx.HTTPError as exc:
                    self.failures.append(("?", repr(exc)))
                if len(self.failures) > failed:
                    self.failure_seconds.append(time.monotonic() - began)
                    await asyncio.sleep(0.05)  # no busy loop while nothing can serve

    async def _plain(self, client: httpx.AsyncClient) -> None:
        began = time.monotonic()
        r = await client.post("/v1/completions", json={
            "model": self.model_id, "prompt": "Hello", "max_tokens": 2})
        version = r.headers.get("x-turnout-version", "?")
        if r.status_code == 200:
            self.served.append(version)
            ended = time.monotonic()
            self.timeline.append((ended, version, ended - began))
        else:
            self.failures.append((version, f"HTTP {r.status_code} {r.text[:200]}"))

    async def _streamed(self, client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/completions", json={
                "model": self.model_id, "prompt": "Hello", "max_tokens": 8,
                "stream": True}) as r:
            version = r.headers.get("x-turnout-version", "?")
            if r.status_code != 200:
                await r.aread()
                self.failures.append((version, f"HTTP {r.status_code}"))
                return
            self.in_flight += 1
            try:
                lines = [line async for line in r.aiter_lines() if line]
            finally:
                self.in_flight -= 1
        if lines and lines[-1] == "data: [DONE]":
            self.served.append(version)
        else:
            self.failures.append((version, f"stream ended without [DONE]: {lines[-1:]}"))

    def latency_slices(self, seconds: float = 3.0) -> str:
        """The plain answers' latency per version in slices of `seconds`, one line each
        (count, p50, p95 in ms): where a verdict's figures came from, as the client saw them."""
        if not self.timeline:
            return "no plain answers"
        start = self.timeline[0][0]
        slices: dict[int, dict[str, list[float]]] = {}
        for ended, version, took in self.timeline:
            slices.setdefault(int((ended - start) // seconds), {}).setdefault(
                version, []).append(took * 1000)
        lines = []
        for index in sorted(slices):
            parts = [f"{version} n={len(values)} p50={quantile(values, 0.5):.0f} "
                     f"p95={quantile(values, 0.95):.0f}"
                     for version, values in sorted(slices[index].items())]
            lines.append(f"  {index * seconds:5.0f} s  " + "; ".join(parts))
        return "\n".join(lines)

    def stop(self) -> None:
        self._stop.set()

    async def served_more(self, count: int, timeout_s: float = 120) -> None:
        """Wait until `count` more requests than now have been served."""
        goal = len(self.served) + count
        deadline = time.monotonic() + timeout_s
        while len(self.served) < goal:
            assert time.monotonic() < deadline, f"{count} more answers not served in " \
                                                f"{timeout_s:g} s"
            await asyncio.sleep(0.05)

    async def wait_served_by(self, version: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while version not in self.served:
            assert time.monotonic() < deadline, f"no request served by {version}"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def load(gateway_url: str, model_id: str, *, stream: bool = False
               ) -> AsyncIterator[Load]:
    client = Load(gateway_url, model_id, stream=stream)
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        client.stop()
        await task


async def api(stack: Stack, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        return await client.request(method, path, **kwargs)


async def start(stack: Stack, model_id: str, version: str, strategy: str,
                config: dict[str, Any], **request: Any) -> str:
    """Start a switch (202 expected); its operation id."""
    r = await api(stack, "POST", "/switch", json={
        "model_id": model_id, "target_version": version, "strategy": strategy,
        "strategy_config": config, **request})
    assert r.status_code == 202, r.text
    return str(r.json()["operation_id"])


async def status(stack: Stack, operation_id: str) -> dict[str, Any]:
    r = await api(stack, "GET", f"/switch/operations/{operation_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def wait_end(stack: Stack, operation_id: str, timeout_s: float = 600) -> dict[str, Any]:
    """The operation's status once it has ended. Only an API that cannot be reached or
    answers 503 (waiting for a restarted Temporal) is waited out; any other answer but
    200 fails at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = await api(stack, "GET", f"/switch/operations/{operation_id}")
        except httpx.HTTPError:
            await asyncio.sleep(1)  # the API is being restarted
            continue
        if r.status_code == 503:
            await asyncio.sleep(1)
            continue
        assert r.status_code == 200, r.text
        s = dict(r.json())
        if s["status"] in ("completed", "failed"):
            return s
        await asyncio.sleep(0.5)
    raise AssertionError(f"operation {operation_id} did not end in {timeout_s}s")


async def wait_phase(stack: Stack, operation_id: str, phase: str,
                     timeout_s: float = 600) -> dict[str, Any]:
    """Wait for a phase; the first one may follow a vLLM engine's start, measured at
    40 s to over 5 minutes on a 2-core machine already serving the live version."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = await status(stack, operation_id)
        if s["phase"] == phase:
            return s
        assert s["status"] not in ("completed", "failed"), s
        await asyncio.sleep(0.2)
    raise AssertionError(f"operation {operation_id} never reached {phase}")


async def start_gateway_replica(stack: Stack, name: str, *, port: int, admin_port: int,
                                gateway_id: str) -> str:
    """Another real gateway process beside the stack's (its own ports and id; the stack
    stops it with the rest); its client URL once it answers."""
    stack.add_process(name, [sys.executable, "-m", "gateway", "--port", str(port),
                             "--admin-port", str(admin_port), "--gateway-id", gateway_id])
    stack.start_process(name)
    url = f"http://127.0.0.1:{port}"
    await stack.wait_for_http(f"{url}/health", name)
    return url


async def record(stack: Stack, name: str, workflow_id: str, run_id: str | None = None) -> None:
    """With RECORD_HISTORIES=1, keep the workflow's history, once it has ended, for the
    replay tests."""
    if recording():
        client = await connect_temporal(stack.settings)
        await asyncio.wait_for(client.get_workflow_handle(workflow_id, run_id=run_id)
                               .result(), 120)
        await save_history(client, name, workflow_id, run_id)


async def record_switch(stack: Stack, name: str, operation_id: str) -> None:
    if not recording():
        return
    store = Store.from_url(stack.settings.database_url)
    try:
        operation = await store.get_operation(operation_id)
    finally:
        await store.close()
    await record(stack, f"switch-{name}", operation.workflow_id, operation.run_id)
