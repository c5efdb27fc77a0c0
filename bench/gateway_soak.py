"""Can one gateway hold thousands of streams, and does its memory stay flat under load?

Same three processes as `bench.gateway_overhead` (upstream, gateway, this client), with an
upstream that streams 64 chunks 50 ms apart (3.2 s per answer):

1. burst: `--streams` (2,000) concurrent streams through the gateway; counts failures;
2. soak: a steady load of streams for `--minutes` (10); the gateway's resident memory is
   sampled every 10 s and compared with its value after the first minute (goal: within 10%).

    python -m bench.gateway_soak [--streams 2000] [--minutes 10] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.gateway_overhead import (
    MODEL_ID,
    Target,
    gateways_in_front_of_upstream,
    one,
    wait_healthy,
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def burst(session: aiohttp.ClientSession, gateway: Target, streams: int) -> None:
    outcomes: Counter[str] = Counter()

    async def stream() -> None:
        try:
            await one(session, gateway, stream=True)
            outcomes["ok"] += 1
        except Exception as exc:
            outcomes[type(exc).__name__ + ": " + str(exc)[:80]] += 1

    started = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(streams)))
    ok = outcomes.pop("ok", 0)
    print(f"burst: {streams} concurrent 64-chunk streams: {ok} complete in "
          f"{time.perf_counter() - started:.1f} s, failures: {dict(outcomes) or 'none'}",
          flush=True)


async def soak(session: aiohttp.ClientSession, gateway: Target, pid: int, minutes: float,
               concurrency: int) -> None:
    deadline = time.perf_counter() + minutes * 60
    counts: Counter[str] = Counter()

    async def loop() -> None:
        while time.perf_counter() < deadline:
            try:
                await one(session, gateway, stream=True)
                counts["ok"] += 1
            except Exception as exc:
                counts[type(exc).__name__] += 1

    async def sample() -> list[tuple[float, float]]:
        samples = []
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            await asyncio.sleep(10)
            samples.append((time.perf_counter() - started, rss_mib(pid)))
        return samples

    _, samples = await asyncio.gather(asyncio.gather(*(loop() for _ in range(concurrency))),
                                      sample())
    first_minute = next(m for t, m in samples if t >= 60)
    last = samples[-1][1]
    ok = counts.pop("ok", 0)
    print(f"soak: {minutes:g} min at {concurrency} concurrent streams: {ok} streams, "
          f"failures: {dict(counts) or 'none'}; gateway RSS after 1 min {first_minute:.1f} "
          f"MiB, at the end {last:.1f} MiB ({(last / first_minute - 1) * 100:+.1f}%, goal "
          f"within ±10%), max {max(m for _, m in samples):.1f} MiB", flush=True)


async def measure(port: int, pid: int, streams: int, minutes: float,
                  concurrency: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        gateway = Target("gateway", f"http://127.0.0.1:{port}", MODEL_ID)
        await wait_healthy(session, gateway.url)
        await burst(session, gateway, streams)
        await soak(session, gateway, pid, minutes, concurrency)


def main(streams: int, minutes: float, concurrency: int) -> None:
    with gateways_in_front_of_upstream("soak", {"soak": True},
                                       "--chunk-delay-s", "0.05") as setup:
        asyncio.run(measure(setup.ports["soak"][0], setup.pids["soak"], streams, minutes,
                            concurrency))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    main(args.streams, args.minutes, args.concurrency)
