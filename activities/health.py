"""Health activities: judge whether a version answers."""

from __future__ import annotations

import time

import httpx
from temporalio import activity

from turnout import contracts as c
from turnout.domain import EngineState
from turnout.store import Store


class HealthActivities:
    def __init__(self, store: Store, timeout_s: float = 30.0) -> None:
        self.store = store
        self.timeout_s = timeout_s

    @activity.defn(name=c.CHECK_HEALTH)
    async def check_health(self, input: c.CheckHealthInput) -> c.HealthVerdict:
        """A short completion straight to the version's engine: does it answer at all?"""
        engines = [e for e in await self.store.list_engines(model_id=input.model_id,
                                                            version=input.version)
                   if e.state is EngineState.READY]
        if not engines:
            return c.HealthVerdict(healthy=False, reason="no ready engine")
        engine = engines[0]
        body = {"model": engine.served_model_name, "prompt": "Hello", "max_tokens": 4}
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.post(f"{engine.url}/v1/completions", json=body)
        except httpx.HTTPError as exc:
            return c.HealthVerdict(healthy=False, reason=f"{engine.url} unreachable: {exc!r}")
        latency_ms = (time.monotonic() - started) * 1000
        if response.status_code != 200 or '"choices"' not in response.text:
            return c.HealthVerdict(healthy=False, latency_ms=latency_ms,
                                   reason=f"HTTP {response.status_code}: {response.text[:200]}")
        return c.HealthVerdict(healthy=True, reason="answered", latency_ms=latency_ms)
