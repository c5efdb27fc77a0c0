"""How many concurrent canaries does one control worker drive?

On a fresh real stack per level (Temporal dev server, one control worker, engine worker,
gateway, API; versions are fast external OpenAI servers, so no engine competes for the
CPU): N models, each with a live version, then N canaries started at once-per-period
intervals (independent rollouts, not a synchronized burst), while a light client load
keeps every model's windows judgeable. Each canary steps 50% → 75% → 100% with an
evaluation period of `--period-s`.

Per-step latency is read from each workflow's history: from the evaluation timer firing
to the completion of the traffic activity that follows (it includes the health judgment,
the route write and every gateway's confirmation). Goal: p95 ≤ 1 s at N = 200. Its parts
are printed too: timer → the workflow task it made started (picked), → the traffic
activity scheduled (decided: the judgment ran), the activity's wait for a worker
(queued) and its run (shift).

    python -m bench.concurrent_canaries [--levels 50,100,200,300] [--period-s 30]
                                        [--no-monitoring | --monitor-worker]

With monitoring on (the default) the control worker also runs one monitor workflow per
model, looking every 30 s; `--monitor-worker` gives the monitors their own worker process
(`VLLM_MODEL_SWITCHING_MONITOR_TASK_QUEUE`), on the same cores; `--no-monitoring` measures
the canaries alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from bench.common import bench_stack, cpu_seconds
from tests.integration.upstream import FakeUpstream
from turnout import contracts as c
from turnout.runtime import connect_temporal
from turnout.telemetry.statistics import quantile
from workers.stack import Stack

CANARY_STEPS = {"initial_percentage": 50, "step_percentage": 25}
SETUP_CONCURRENCY = 16


@dataclass
class Step:
    """One canary step, in seconds from the evaluation timer firing."""

    total: float  # → the traffic activity completed
    picked: float  # → the worker started the workflow task the timer made
    decided: float  # → the traffic activity was scheduled (health judged, step chosen)
    queued: float  # the traffic activity's wait for a worker, scheduled → started
    shift: float  # the traffic activity's own run, started → completed


async def step_latencies(client: Client, workflow_id: str) -> list[Step]:
    """Each evaluation timer firing, followed to the end of the next traffic shift."""
    fired: float | None = None
    picked: float | None = None
    scheduled: dict[int, tuple[str, float]] = {}
    started: dict[int, float] = {}
    found = []
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        at = event.event_time.ToDatetime().timestamp()
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_TIMER_FIRED:
            fired, picked = at, None
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED and fired and picked is None:
            picked = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = (name, at)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started[event.activity_task_started_event_attributes.scheduled_event_id] = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED and fired:
            scheduled_id = event.activity_task_completed_event_attributes.scheduled_event_id
            name, since = scheduled[scheduled_id]
            if name == c.SET_TRAFFIC:
                begun = started.get(scheduled_id, since)
                found.append(Step(at - fired, (picked or since) - fired, since - fired,
                                  begun - since, at - begun))
                fired = None
    return found


async def gather_limited(coroutines: list, limit: int) -> list:
    gate = asyncio.Semaphore(limit)

    async def one(coroutine):  # type: ignore[no-untyped-def]
        async with gate:
            return await coroutine

    return await asyncio.gather(*(one(co) for co in coroutines))


async def wait_done(temporal: Client, model_id: str) -> dict:
    """The switch's final status, long-polled from Temporal: polling the API would run a
    query on the control worker per poll and load the very thing measured."""
    return dict(await temporal.get_workflow_handle(f"switch-{model_id}").result())


@contextlib.asynccontextmanager
async def client_load(gateway_url: str, model_ids: list[str], rate: float
                      ) -> AsyncIterator[Counter[str]]:
    """`rate` completions per second spread round-robin over the models; yields a count of
    outcomes ("ok", or the status or error of a failure)."""
    outcomes: Counter[str] = Counter()

    async def send(gateway: httpx.AsyncClient, model_id: str) -> None:
        try:
            r = await gateway.post("/v1/completions", json={"model": model_id, "prompt": "x"})
            outcomes["ok" if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:120]}"] += 1
        except httpx.HTTPError as exc:
            outcomes[repr(exc)[:120]] += 1

    async def run() -> None:
        async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as gateway:
            pending: set[asyncio.Task[None]] = set()
            try:
                for model_id in itertools.cycle(model_ids):
                    task = asyncio.create_task(send(gateway, model_id))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    await asyncio.sleep(1 / rate)
            finally:
                # Let the requests in flight finish before the client closes under them
                # (closing first failed them with a ReadError, counted as a failure).
                await asyncio.gather(*pending, return_exceptions=True)

    task = asyncio.create_task(run())
    try:
        yield outcomes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def level(api: httpx.AsyncClient, temporal: Client, stack: Stack,
                fakes: list[FakeUpstream], n: int, period_s: float) -> list[Step]:
    gateway_url = stack.gateway_url
    model_ids = [f"Bench_n{n}x{i}" for i in range(n)]

    async def prepare(model_id: str) -> None:
        arch, stage = model_id.split("_")
        for fake in fakes:
            (await api.post("/models", json={
                "model": fake.version, "model_arch": arch, "model_stage": stage,
                "version": fake.version, "endpoint": fake.url,
                "served_model_name": fake.served_model_name})).raise_for_status()
        r = await api.post("/switch", json={"model_id": model_id, "target_version": "a"})
        r.raise_for_status()
        await wait_done(temporal, model_id)

    started = time.monotonic()
    await gather_limited([prepare(m) for m in model_ids], SETUP_CONCURRENCY)
    print(f"  N={n}: {n} models live in {time.monotonic() - started:.0f} s", flush=True)

    async def canary(model_id: str, delay_s: float) -> dict:
        await asyncio.sleep(delay_s)
        r = await api.post("/switch", json={
            "model_id": model_id, "target_version": "b", "strategy": "canary",
            "strategy_config": {**CANARY_STEPS, "evaluation_period_minutes": period_s / 60}})
        r.raise_for_status()
        return await wait_done(temporal, model_id)

    # About 8 requests per model per evaluation period: enough for each version's window.
    rate = max(5.0, 8 * n / period_s)
    pids = {name: stack.processes[name].popen.pid  # type: ignore[union-attr]
            for name in ("control-worker", "monitor-worker", "temporal", "gateway")
            if name in stack.processes}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    async with client_load(gateway_url, model_ids, rate) as counts:
        ends = await asyncio.gather(*(canary(m, random.uniform(0, period_s))
                                      for m in model_ids))
    wall = time.monotonic() - started
    used = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    print(f"  N={n}: canary phase {wall:.0f} s; CPU used: " + ", ".join(
        f"{name} {seconds:.0f} s ({seconds / wall * 100:.0f}% of a core)"
        for name, seconds in used.items())
        + f"; control worker {used['control-worker'] / n * 1000:.0f} ms per canary",
        flush=True)
    outcomes = statistics.multimode([e["outcome"] for e in ends])
    steps = [x for lists in await gather_limited(
        [step_latencies(temporal, f"switch-{m}") for m in model_ids], SETUP_CONCURRENCY)
        for x in lists]
    print(f"  N={n}: outcomes {outcomes} ({sum(e['outcome'] == 'promoted' for e in ends)}"
          f"/{n} promoted), client load {rate:.0f}/s: {counts.pop('ok', 0)} answered, "
          f"failures: {dict(counts) or 'none'}", flush=True)
    return steps


async def run_level(n: int, period_s: float, monitoring: bool,
                    monitor_worker: bool) -> list[Step]:
    """One level on a fresh stack, so that a level's monitors are its own N models' and not
    also those of the levels before it."""
    # One request per version is enough to judge: the benchmark measures the control
    # plane, not the statistics. The wide tolerance keeps scheduling noise from failing
    # a canary (a rolled-back canary has no further steps to measure).
    stack = bench_stack("canaries", min_requests=1, latency_tolerance=100.0,
                        enable_health_monitoring=monitoring,
                        monitor_task_queue="turnout-monitors" if monitor_worker else None)
    fakes = [await FakeUpstream(v, v).start() for v in ("a", "b")]
    await stack.start()
    try:
        temporal = await connect_temporal(stack.settings)
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=120) as api:
            return await level(api, temporal, stack, fakes, n, period_s)
    finally:
        await stack.stop()
        for fake in fakes:
            await fake.stop()


async def main(levels: list[int], period_s: float, monitoring: bool,
               monitor_worker: bool) -> None:
    rows = []
    for n in levels:
        steps = await run_level(n, period_s, monitoring, monitor_worker)
        total = [x.total for x in steps]
        row = (n, len(steps), quantile(total, 0.5), quantile(total, 0.95),
               max(total, default=None),
               *(quantile([getattr(x, part) for x in steps], 0.95)
                 for part in ("picked", "decided", "queued", "shift")))
        rows.append(row)
        print(f"N={n:4d}: {len(steps)} steps, timer fired → traffic done: "
              f"p50 {_ms(row[2])}, p95 {_ms(row[3])}, max {_ms(row[4])}; p95 of "
              f"timer → workflow task started {_ms(row[5])}, timer → shift "
              f"scheduled {_ms(row[6])}, shift waiting for a worker {_ms(row[7])}, "
              f"shift running {_ms(row[8])}", flush=True)
    where = "on a worker of its own" if monitor_worker else "on the control worker"
    print(f"\nmonitoring {f'on, {where}' if monitoring else 'off'}")
    print("concurrent canaries | steps | p50 | p95 | max | p95 of: picked | decided | "
          "queued | shift  (goal: p95 <= 1000 ms at 200)")
    for n, count, p50, p95, worst, picked, decided, queued, shift in rows:
        print(f"{n:19d} | {count:5d} | {_ms(p50)} | {_ms(p95)} | {_ms(worst)} | "
              f"{_ms(picked)} | {_ms(decided)} | {_ms(queued)} | {_ms(shift)}")
    within = [row[0] for row in rows if row[3] is not None and row[3] <= 1.0]
    print(f"largest level with p95 <= 1 s: {max(within) if within else 'none'}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="50,100,200,300",
                        help="comma-separated numbers of concurrent canaries")
    parser.add_argument("--period-s", type=float, default=30.0,
                        help="evaluation period of each canary step, in seconds")
    parser.add_argument("--no-monitoring", action="store_true",
                        help="no monitor workflows: the canaries' cost alone")
    parser.add_argument("--monitor-worker", action="store_true",
                        help="the monitors on a worker process of their own")
    args = parser.parse_args()
    asyncio.run(main([int(n) for n in args.levels.split(",")], args.period_s,
                     not args.no_monitoring, args.monitor_worker))
