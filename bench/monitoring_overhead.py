"""What does monitoring cost the data plane? A gateway with monitoring on versus off.

Two real gateways in front of one fast upstream (`bench/upstream_server.py`), alternated:
"on" records every request's metrics and is read by a monitor that asks its admin stats
for the last interval's window once per `--poll-s` (as the health monitor does, at a far
shorter interval than its default); "off" has `GATEWAY_REQUEST_METRICS=false` and nobody
reads it. Printed, measured side by side in one run:

- throughput of 64-chunk streams at concurrency 64, ratio on / off (goal >= 0.99);
- each gateway's CPU time per stream, ratio on / off (two processes, so core placement
  and neighbours still add noise of a few percent);
- what recording itself costs per stream, timed in this process on the same calls the
  proxy makes (`GatewayMetrics.started/first_byte/generated/finished`), as a share of the
  gateway's CPU per stream: the figure least disturbed by the machine's noise.

    python -m bench.monitoring_overhead [--seconds 8] [--rounds 4] [--poll-s 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator

import aiohttp

from bench.common import cpu_seconds
from bench.gateway_overhead import (
    MODEL_ID,
    Target,
    gateways_in_front_of_upstream,
    one,
    run_for,
    wait_healthy,
)
from gateway.metrics import GatewayMetrics


@contextlib.asynccontextmanager
async def monitor(session: aiohttp.ClientSession, admin_url: str,
                  poll_s: float) -> AsyncIterator[list[int]]:
    """Reads the gateway's windowed stats every `poll_s` like the monitor's assessment."""
    polls = [0]

    async def loop() -> None:
        while True:
            until = time.time()
            params = {"since": repr(until - poll_s), "until": repr(until),
                      "model_id": MODEL_ID}
            async with session.get(f"{admin_url}/admin/stats", params=params) as response:
                await response.read()
            polls[0] += 1
            await asyncio.sleep(poll_s)

    task = asyncio.create_task(loop())
    try:
        yield polls
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def recording_us_per_stream(streams: int = 200_000) -> float:
    """Microseconds the four recording calls of one 64-chunk stream take here."""
    metrics = GatewayMetrics()
    started = time.perf_counter()
    for _ in range(streams):
        metrics.started(MODEL_ID, "a")
        metrics.first_byte(MODEL_ID, "a", 0.004)
        metrics.generated(MODEL_ID, "a", 64, 0.05)
        metrics.finished(MODEL_ID, "a", 0.055, ttfb_s=0.004)
    return (time.perf_counter() - started) / streams * 1e6


async def measure(urls: dict[str, tuple[int, int]], pids: dict[str, int], seconds: float,
                  rounds: int, poll_s: float) -> None:
    targets = {name: Target(name, f"http://127.0.0.1:{ports[0]}", MODEL_ID)
               for name, ports in urls.items()}
    rates: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, float] = {"on": 0.0, "off": 0.0}
    streams: dict[str, int] = {"on": 0, "off": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        for target in targets.values():
            await wait_healthy(session, target.url)
            await run_for(1.0, 8, lambda t=target: one(session, t, stream=True))  # warm up
        async with monitor(session, f"http://127.0.0.1:{urls['on'][1]}", poll_s) as polls:
            for i in range(rounds):
                # Alternate which goes first, so a drift of the machine favours neither.
                order = ("on", "off") if i % 2 == 0 else ("off", "on")
                for name in order:
                    before = cpu_seconds(pids[name])
                    done, _ = await run_for(seconds, 64,
                                            lambda t=targets[name]: one(session, t, stream=True))
                    cpu[name] += cpu_seconds(pids[name]) - before
                    streams[name] += done
                    rates[name].append(done / seconds)
    on, off = statistics.mean(rates["on"]), statistics.mean(rates["off"])
    cpu_on, cpu_off = (cpu[n] / max(streams[n], 1) * 1000 for n in ("on", "off"))
    print(f"throughput, 64-chunk streams at concurrency 64, {rounds} alternations of "
          f"{seconds:g} s: monitoring on {on:.0f}/s, off {off:.0f}/s, ratio {on / off:.3f} "
          f"(goal >= 0.99); per round on/off: "
          + ", ".join(f"{a / b:.3f}" for a, b in zip(rates["on"], rates["off"], strict=True)))
    print(f"gateway CPU per stream: on {cpu_on:.3f} ms, off {cpu_off:.3f} ms, ratio off/on "
          f"{cpu_off / cpu_on:.3f} (the throughput one core of gateway gives, on vs off); "
          f"{polls[0]} monitor polls of the 'on' gateway's windowed stats")
    recording = recording_us_per_stream()
    print(f"recording per stream: {recording:.1f} us = {recording / (cpu_on * 1000):.2%} of "
          f"the gateway's CPU per stream; implied throughput ratio at a CPU-bound gateway "
          f"{1 - recording / (cpu_on * 1000):.4f} (goal >= 0.99)")


def main(seconds: float, rounds: int, poll_s: float) -> None:
    with gateways_in_front_of_upstream("monitoring", {"on": True, "off": False}) as setup:
        asyncio.run(measure(setup.ports, setup.pids, seconds, rounds, poll_s))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--poll-s", type=float, default=1.0)
    args = parser.parse_args()
    main(args.seconds, args.rounds, args.poll_s)
