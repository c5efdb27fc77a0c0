"""How long until every new request is on the version switched to — warm versus cold.

On the real stack with real vLLM CPU engines on tiny models, one client sending
completions through the gateway without pause, measured in one run:
  - emergency rollback after promotion (`POST /models/{id}/rollback` right after an
    immediate switch v1 -> v2) with the replaced version standing by (STANDBY_MINUTES=30)
    and without (STANDBY_MINUTES=0: a cold start of v1);
  - an immediate switch to a preloaded version versus to one that is not loaded.
The time is from the request to the moment after which every request sent was served by
the version switched to, with the count of failed requests. Goals: standby rollback <= 1 s
and <= 0.05x the cold one; preloaded switch <= 0.1x the cold one.

    python -m bench.rollback_time [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import bench_stack
from turnout.tinymodels import ensure_tiny_models
from workers.stack import Stack

MODEL_ID = "Bench_rollback"


class Client:
    """Completions without pause: when each was sent, which version answered, failures."""

    def __init__(self, gateway_url: str) -> None:
        self.gateway_url = gateway_url
        self.answers: list[tuple[float, str]] = []
        self.failures = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.gateway_url, timeout=120) as gateway:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = await gateway.post("/v1/completions", json={
                        "model": MODEL_ID, "prompt": "Hello", "max_tokens": 2})
                except httpx.HTTPError:
                    self.failures += 1
                    continue
                if r.status_code == 200:
                    self.answers.append((sent, r.headers["x-turnout-version"]))
                else:
                    self.failures += 1

    def all_on(self, version: str, since: float) -> float | None:
        """Seconds from `since` after which every request sent was served by `version`."""
        later = [(t, v) for t, v in self.answers if t >= since]
        if not later or later[-1][1] != version:
            return None
        others = [t for t, v in later if v != version]
        if not others:
            return later[0][0] - since
        last_other = max(others)
        return min(t for t, _ in later if t > last_other) - since


async def call(api: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Any:
    r = await api.request(method, path, **kwargs)
    r.raise_for_status()
    return r.json()


async def wait_end(api: httpx.AsyncClient, operation_id: str) -> dict[str, Any]:
    while True:
        status = await call(api, "GET", f"/switch/operations/{operation_id}")
        if status["status"] in ("completed", "failed"):
            if status["outcome"] != "promoted":
                raise RuntimeError(f"switch {operation_id} ended {status['outcome']}: "
                                   f"{status['reason']}")
            return status
        await asyncio.sleep(0.1)


async def switch(api: httpx.AsyncClient, version: str) -> dict[str, Any]:
    accepted = await call(api, "POST", "/switch", json={
        "model_id": MODEL_ID, "target_version": version, "strategy": "immediate"})
    return await wait_end(api, accepted["operation_id"])


async def timed(stack: Stack, api: httpx.AsyncClient, version: str, start: Any
                ) -> tuple[float, int, bool]:
    """(seconds until every new request is on `version`, failed requests, warm start)."""
    client = Client(stack.gateway_url)
    sender = asyncio.create_task(client.run())
    try:
        while len(client.answers) < 20:
            await asyncio.sleep(0.05)
        asked = time.monotonic()
        status = await wait_end(api, (await start())["operation_id"])
        while (took := client.all_on(version, asked)) is None:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # and it stays so
        took = client.all_on(version, asked)
    finally:
        client._stop.set()
        await sender
    assert took is not None
    return took, client.failures, bool(status.get("warm_start"))


async def measure(standby_minutes: float, models: dict[str, Path], rounds: int
                  ) -> dict[str, list[tuple[float, int, bool]]]:
    stack = bench_stack(f"rollback-{standby_minutes:g}", standby_minutes=standby_minutes,
                        model_roots=[str(next(iter(models.values())).parent)])
    await stack.start()
    results: dict[str, list[tuple[float, int, bool]]] = {"rollback": [], "preloaded": [],
                                                         "cold": []}
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=120) as api:
            versions = {"v1": "tiny-v1", "v2": "tiny-v2"}
            for i in range(rounds):
                versions |= {f"p{i}": "tiny-v1", f"c{i}": "tiny-v2"}
            for version, name in versions.items():
                await call(api, "POST", "/models", json={
                    "model": str(models[name]), "model_arch": "Bench",
                    "model_stage": "rollback", "version": version})
            await switch(api, "v1")
            for i in range(rounds):
                await switch(api, "v2")  # v1 now stands by (or is stopped)
                results["rollback"].append(await timed(
                    stack, api, "v1",
                    lambda: call(api, "POST", f"/models/{MODEL_ID}/rollback", json={})))
                print(f"STANDBY_MINUTES={standby_minutes:g} round {i + 1}: emergency "
                      f"rollback {results['rollback'][-1][0]:.3f} s, "
                      f"{results['rollback'][-1][1]} failed", flush=True)
                if standby_minutes <= 0:
                    continue
                preload = await call(api, "POST",
                                     f"/models/{MODEL_ID}/versions/p{i}/preload", json={})
                while preload["phase"] != "ready":
                    await asyncio.sleep(0.5)
                    preload = await call(api, "GET",
                                         f"/models/{MODEL_ID}/versions/p{i}/preload")
                for kind, version in (("preloaded", f"p{i}"), ("cold", f"c{i}")):
                    def start(version: str = version) -> Any:
                        return call(api, "POST", "/switch", json={
                            "model_id": MODEL_ID, "target_version": version,
                            "strategy": "immediate"})
                    results[kind].append(await timed(stack, api, version, start))
                    print(f"round {i + 1}: switch to a {kind} version "
                          f"{results[kind][-1][0]:.3f} s, {results[kind][-1][1]} failed",
                          flush=True)
    finally:
        await stack.stop()
    return results


def _median(runs: list[tuple[float, int, bool]]) -> float:
    return statistics.median(r[0] for r in runs)


async def main(rounds: int) -> None:
    models = await asyncio.to_thread(ensure_tiny_models,
                                     Path.home() / ".cache" / "turnout-bench-models")
    warm = await measure(30, models, rounds)
    cold = await measure(0, models, rounds)
    standby, no_standby = _median(warm["rollback"]), _median(cold["rollback"])
    preloaded, not_loaded = _median(warm["preloaded"]), _median(warm["cold"])
    failed = sum(r[1] for runs in (*warm.values(), *cold.values()) for r in runs)
    print(f"\nemergency rollback after promotion: standby {standby:.3f} s "
          f"(warm start: {all(r[2] for r in warm['rollback'])}) vs cold {no_standby:.3f} s: "
          f"ratio {standby / no_standby:.4f} (goals <= 1 s, <= 0.05)")
    print(f"switch to a preloaded version {preloaded:.3f} s vs not loaded "
          f"{not_loaded:.3f} s: ratio {preloaded / not_loaded:.4f} (goal <= 0.1)")
    print(f"failed client requests in all runs: {failed}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    asyncio.run(main(parser.parse_args().rounds))
