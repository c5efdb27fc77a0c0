"""How fast does a fault reach an operator and the traffic?

On the real stack (Temporal dev server, workers with the health monitor, gateway, API;
versions are fast external OpenAI servers), for several rounds: a canary of `b` over the
live `a` with 10-second evaluation periods under a steady client load; once the first
step has been judged healthy, `b` starts failing half of its requests at a random moment
of the second step. Measured from that moment:

- the monitor's error-rate alert for `b` (goal: within two monitoring intervals);
- the canary's automatic rollback (goal: before the next step, i.e. `b`'s share never
  rises after the fault).

    python -m bench.fault_detection [--rounds 5] [--interval-s 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx

from bench.common import bench_stack
from tests.integration.upstream import FakeUpstream

MODEL_ID = "Bench_fault"
PERIOD_S = 10.0
CANARY = {"initial_percentage": 20, "step_percentage": 20,
          "evaluation_period_minutes": PERIOD_S / 60}


@contextlib.asynccontextmanager
async def client_load(gateway_url: str, concurrency: int = 4) -> AsyncIterator[list[int]]:
    """Requests through the gateway without pause; yields [answered, failed]."""
    counts = [0, 0]

    async def loop(client: httpx.AsyncClient, worker: int) -> None:
        i = 0
        while True:
            r = await client.post("/v1/completions", json={
                "model": MODEL_ID, "prompt": "x", "user": f"u{worker}-{i % 50}"})
            counts[0 if r.status_code == 200 else 1] += 1
            i += 1

    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        tasks = [asyncio.create_task(loop(client, w)) for w in range(concurrency)]
        try:
            yield counts
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def status(api: httpx.AsyncClient, operation_id: str) -> dict[str, Any]:
    return (await api.get(f"/switch/operations/{operation_id}")).json()


async def error_alert(api: httpx.AsyncClient, version: str, after: float) -> dict | None:
    alerts = (await api.get("/alerts", params={"model_id": MODEL_ID})).json()
    return next((a for a in alerts if a["type"] == "error_rate" and a["version"] == version
                 and datetime.fromisoformat(a["first_seen"]).timestamp() >= after - 1), None)


async def one_round(api: httpx.AsyncClient, target: FakeUpstream, stable: str,
                    interval_s: float) -> dict[str, Any]:
    r = await api.post("/switch", json={"model_id": MODEL_ID, "target_version": target.version,
                                        "strategy": "canary", "strategy_config": CANARY})
    r.raise_for_status()
    operation_id = r.json()["operation_id"]
    # Wait for the second step: the first judged healthy, the share raised once.
    while True:
        s = await status(api, operation_id)
        if s["phase"] == "evaluating" and s["step"] >= 2 and s["next_check_at"]:
            break
        if s["status"] in ("completed", "failed"):
            raise RuntimeError(f"canary ended before the fault: {s['reason']}")
        await asyncio.sleep(0.05)
    next_check = datetime.fromisoformat(s["next_check_at"]).timestamp()
    share_at_fault = s["weights"].get(target.version, 0.0)
    await asyncio.sleep(random.uniform(0, max(0.0, next_check - time.time() - 1)))
    fault = time.time()
    target.fail_fraction = 0.5
    alerted = rolled_back = None
    max_share = share_at_fault
    while alerted is None or rolled_back is None:
        now = time.time()
        if alerted is None and await error_alert(api, target.version, fault):
            alerted = now - fault
        s = await status(api, operation_id)
        max_share = max(max_share, s["weights"].get(target.version, 0.0))
        if rolled_back is None and s["status"] in ("completed", "failed"):
            rolled_back = now - fault
            outcome = s["outcome"]
        if now - fault > 120:
            raise RuntimeError(f"no alert or rollback within 120 s: {s}")
        await asyncio.sleep(0.1)
    target.fail_fraction = 0.0
    # Let the alert resolve (the version left the route) before the next round.
    while await error_alert(api, target.version, fault):
        await asyncio.sleep(0.5)
    return {"alert_s": alerted, "alert_intervals": alerted / interval_s,
            "rollback_s": rolled_back, "next_step_s": next_check - fault, "outcome": outcome,
            "rose": max_share > share_at_fault, "stable": stable}


async def main(rounds: int, interval_s: float) -> None:
    stack = bench_stack("fault", monitoring_interval_s=interval_s)
    stable, target = await FakeUpstream("a", "a").start(), await FakeUpstream("b", "b").start()
    await stack.start()
    results = []
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as api:
            for fake in (stable, target):
                (await api.post("/models", json={
                    "model": fake.version, "model_arch": "Bench", "model_stage": "fault",
                    "version": fake.version, "endpoint": fake.url,
                    "served_model_name": fake.served_model_name})).raise_for_status()
            r = await api.post("/switch", json={"model_id": MODEL_ID, "target_version": "a"})
            while (await status(api, r.json()["operation_id"]))["status"] != "completed":
                await asyncio.sleep(0.1)
            async with client_load(stack.gateway_url) as counts:
                for i in range(rounds):
                    result = await one_round(api, target, stable.version, interval_s)
                    results.append(result)
                    print(f"round {i + 1}: alert after {result['alert_s']:.1f} s "
                          f"({result['alert_intervals']:.2f} intervals), rollback after "
                          f"{result['rollback_s']:.1f} s ({result['outcome']}), next step "
                          f"was due {result['next_step_s']:.1f} s after the fault; share "
                          f"rose after the fault: {result['rose']}", flush=True)
            print(f"client requests: {counts[0]} answered, {counts[1]} failed")
    finally:
        await stack.stop()
        await stable.stop()
        await target.stop()
    alerts = [r["alert_intervals"] for r in results]
    rollbacks = [r["rollback_s"] for r in results]
    in_time = sum(not r["rose"] and r["outcome"] == "rolled_back" for r in results)
    print(f"\n{rounds} rounds, monitoring every {interval_s:g} s, canary periods "
          f"{PERIOD_S:g} s: alert median {statistics.median(alerts):.2f} intervals, max "
          f"{max(alerts):.2f} (goal <= 2); rollback median {statistics.median(rollbacks):.1f} s,"
          f" max {max(rollbacks):.1f} s; rolled back before the next step in {in_time} of "
          f"{rounds} rounds (goal: all)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval-s", type=float, default=5.0,
                        help="the health monitor's interval (monitoring_interval_s)")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.interval_s))
