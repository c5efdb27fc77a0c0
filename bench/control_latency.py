"""How fast do operator controls reach the traffic?

On the real stack (Temporal dev server, workers, gateway, API; versions are fast external
OpenAI servers so that only turnout's own path is measured), for several rounds:
  - rollback: time from `POST .../rollback` to the moment new requests all reach stable;
  - promote: time from `POST .../promote` to the moment new requests all reach the target.
Goal: both ≤ 1 s at the median. Prints each round and the medians.

    python -m bench.control_latency [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from bench.common import bench_stack
from tests.integration.upstream import FakeUpstream

MODEL_ID = "Bench_ctl"
CANARY = {"initial_percentage": 50, "step_percentage": 25, "evaluation_period_minutes": 60}


async def all_served_by(gateway: httpx.AsyncClient, version: str, started: float) -> float:
    """Seconds from `started` until 20 requests in a row are served by `version`."""
    streak = 0
    while streak < 20:
        r = await gateway.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x"})
        streak = streak + 1 if r.headers.get("x-turnout-version") == version else 0
        if streak == 1:
            first = time.monotonic()
    return first - started


async def round_trip(api: httpx.AsyncClient, gateway: httpx.AsyncClient, target: str,
                     stable: str, action: str) -> float:
    r = await api.post("/switch", json={"model_id": MODEL_ID, "target_version": target,
                                        "strategy": "canary", "strategy_config": CANARY})
    r.raise_for_status()
    operation_id = r.json()["operation_id"]
    while (await api.get(f"/switch/operations/{operation_id}")).json()["phase"] != "evaluating":
        await asyncio.sleep(0.05)
    started = time.monotonic()
    (await api.post(f"/switch/operations/{operation_id}/{action}")).raise_for_status()
    took = await all_served_by(gateway, stable if action == "rollback" else target, started)
    while (await api.get(f"/switch/operations/{operation_id}")).json()["status"] not in (
            "completed", "failed"):
        await asyncio.sleep(0.05)
    return took


async def main(rounds: int) -> None:
    stack = bench_stack("controls")
    fakes = [await FakeUpstream(v, v).start() for v in ("a", "b")]
    await stack.start()
    rollback: list[float] = []
    promote: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as api, \
                httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as gateway:
            for fake in fakes:
                (await api.post("/models", json={
                    "model": fake.version, "model_arch": "Bench", "model_stage": "ctl",
                    "version": fake.version, "endpoint": fake.url,
                    "served_model_name": fake.served_model_name})).raise_for_status()
            r = await api.post("/switch", json={"model_id": MODEL_ID, "target_version": "a"})
            operation_id = r.json()["operation_id"]
            while (await api.get(f"/switch/operations/{operation_id}")).json()["status"] \
                    != "completed":
                await asyncio.sleep(0.1)
            live, other = "a", "b"
            for i in range(rounds):
                rollback.append(await round_trip(api, gateway, other, live, "rollback"))
                promote.append(await round_trip(api, gateway, other, live, "promote"))
                live, other = other, live
                print(f"round {i + 1}: rollback → 100% stable {rollback[-1] * 1000:7.1f} ms | "
                      f"promote → 100% target {promote[-1] * 1000:7.1f} ms", flush=True)
    finally:
        await stack.stop()
        for fake in fakes:
            await fake.stop()
    print(f"\nmedian over {rounds} rounds: rollback {statistics.median(rollback) * 1000:.1f} ms,"
          f" promote {statistics.median(promote) * 1000:.1f} ms (goal <= 1000 ms); "
          f"max rollback {max(rollback) * 1000:.1f} ms, max promote {max(promote) * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args().rounds))
