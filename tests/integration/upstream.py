"""A fake OpenAI-compatible engine for gateway tests: a real aiohttp server on a free port.

It answers `/v1/completions` and `/v1/chat/completions` (plain JSON or SSE stream) with text
naming its version, records what it received, can be slowed down or made to fail, and
counts requests that were cancelled because the caller went away.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
from aiohttp import web


class FakeUpstream:
    def __init__(self, version: str, served_model_name: str, *, delay_s: float = 0.0,
                 chunk_delay_s: float = 0.0, chunks: int = 3, fail_status: int | None = None,
                 fail_fraction: float = 0.0, host: str = "127.0.0.1",
                 record: bool = True, cold_requests: int = 0,
                 cold_delay_s: float = 0.0) -> None:
        self.version = version
        self.served_model_name = served_model_name
        self.delay_s = delay_s
        self.chunk_delay_s = chunk_delay_s
        self.chunks = chunks
        self.fail_status = fail_status
        # Fail this share of requests with a 500, spread evenly (deterministic, no RNG):
        # request k fails when floor((k + 1) * f) > floor(k * f).
        self.fail_fraction = fail_fraction
        # A fresh engine: its first `cold_requests` answers take `cold_delay_s` longer.
        self.cold_requests = cold_requests
        self.cold_delay_s = cold_delay_s
        self.failed = 0
        self._answered = 0
        self.host = host
        self.port = 0
        self.received: list[dict[str, Any]] = []
        self.record = record  # keep every body (tests); off for benchmarks
        self.cancelled = 0
        self.completed = 0
        self.headers: list[dict[str, str]] = []  # of each request, when recording
        self.active = 0  # requests being answered now, and the most at once
        self.max_active = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # What routers in front of engines wait for (vLLM's Rust router among them).
        app.router.add_get("/health", self._health)
        # handler_cancellation lets the test see that the gateway dropped the request.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_model_name, "object": "model", "created": 0, "owned_by": "fake"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def _answer(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await request.json()
        if self.record:
            self.received.append(body)
            self.headers.append(dict(request.headers))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            k, self._answered = self._answered, self._answered + 1
            delay = self.delay_s + (self.cold_delay_s if k < self.cold_requests else 0.0)
            if delay:
                await asyncio.sleep(delay)
            status = self.fail_status
            if status is None and int((k + 1) * self.fail_fraction) > int(k * self.fail_fraction):
                status = 500
            if status is not None:
                self.failed += 1
                return web.json_response({"error": {"message": "fake failure",
                                                    "type": "server_error", "param": None,
                                                    "code": None}}, status=status)
            if body.get("model") != self.served_model_name:
                return web.json_response({"error": {
                    "message": f"model {body.get('model')!r} not served here",
                    "type": "invalid_request_error", "param": "model", "code": None}},
                    status=404)
            if body.get("stream"):
                response = await self._stream(request, chat=chat)
            else:
                response = web.json_response(self._full(chat=chat))
            self.completed += 1
            return response
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    def _text(self) -> str:
        return f"hello from {self.version}"

    def _full(self, *, chat: bool) -> dict[str, Any]:
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.served_model_name,
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}
        if chat:
            return {**base, "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": self._text()}}]}
        return {**base, "object": "text_completion", "choices": [
            {"index": 0, "text": self._text(), "finish_reason": "stop", "logprobs": None}]}

    async def _stream(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        ident = f"cmpl-{uuid.uuid4().hex}"
        words = self._text().split(" ")
        pieces = [" ".join(words[: i + 1]) for i in range(len(words))]
        deltas = [pieces[0]] + [" " + w for w in words[1:]]
        deltas = (deltas + [""] * self.chunks)[: max(self.chunks, len(deltas))]
        # Chunks come due on the stream's own clock, as tokens do from an engine decoding at
        # a steady step: a late wake-up (a busy event loop) does not push every later chunk
        # back, so the pace does not depend on how loaded this process's machine is.
        clock = asyncio.get_running_loop().time
        started = clock()
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            if chat:
                chunk = {"id": ident, "object": "chat.completion.chunk", "created": 0,
                         "model": self.served_model_name, "choices": [
                             {"index": 0, "delta": {"content": delta},
                              "finish_reason": "stop" if last else None}]}
            else:
                chunk = {"id": ident, "object": "text_completion", "created": 0,
                         "model": self.served_model_name, "choices": [
                             {"index": 0, "text": delta, "logprobs": None,
                              "finish_reason": "stop" if last else None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.chunk_delay_s:
                await asyncio.sleep(max(0.0, started + (i + 1) * self.chunk_delay_s - clock()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def register_fakes(client: httpx.AsyncClient, upstreams: dict[str, FakeUpstream],
                         arch: str, stage: str) -> None:
    """Register each fake engine as a version (its key) of one model, as an external
    endpoint, through the API `client` talks to."""
    for version, upstream in upstreams.items():
        response = await client.post("/models", json={
            "model": f"tiny/{stage}", "model_arch": arch, "model_stage": stage,
            "version": version, "endpoint": upstream.url,
            "served_model_name": upstream.served_model_name})
        assert response.status_code == 201, response.text
