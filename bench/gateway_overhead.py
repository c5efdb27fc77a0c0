"""What does the gateway cost? Direct to an upstream versus through the gateway, alternating,
and beside vLLM's own router (`vllm-router`) in front of the same upstream.

Three processes: a fast OpenAI-compatible upstream (`bench/upstream_server.py`), the real
gateway (`python -m gateway`, SQLite store), and this client (aiohttp, no connection limit).
Printed, each measured side by side in one run:

- peers (`--only peers`): direct, turnout's gateway and vllm-router (installed into a
  virtualenv of its own under ~/.cache/turnout-bench, see `bench.vllm_router`),
  alternated: added latency at concurrency 1 (p50, p99), 64-chunk streams per second at
  concurrency 64 and 256, CPU per stream of each proxy process, then a table side by
  side, with what else was using the machine before and after;
- tracing (`--only tracing`): gateways with tracing off, and on with 0, 1% and 10% of
  client requests sampled (spans exported to an OTLP collector in the benchmark),
  alternated: c=1 latency and c=64 streams;
- workers (`--only workers`): one gateway process against two on one port
  (`GATEWAY_WORKERS=2`), alternated, with the caveat of a 2-core machine printed;
- ab (`--only ab --baseline DIR[,DIR...]`): this tree's gateway against the gateways of
  other checkouts (`git archive main | tar -x -C DIR`), alternated in one run: c=1
  latency, streams/s at 64 and 256 and CPU per stream, to measure a change side by side;
- added latency at concurrency 1 (non-streamed completions): p50 and p99, direct and
  through the gateway, and their difference;
- throughput of streamed answers (64 chunks) at concurrency 64 and 256: ratio gateway /
  direct, and the time-to-first-token p99 overhead;
- the gateway's CPU time per proxied request and per 64-chunk stream;
- throughput with per-request metrics on versus off (a second gateway with
  `GATEWAY_REQUEST_METRICS=false`);
- the cost of client keys: added latency at concurrency 1 and throughput at concurrency
  64, a gateway with `GATEWAY_API_KEYS` set (the client sends its key) against one
  without, alternated;
- split accuracy over 10,000 requests at 90/10, stickiness of keyed users, and the share of
  users a 10-point weight change moves;
- throughput and time to first token at concurrency 64 and 256 again with the gateway on a
  core of its own (upstream and client on the others), as it runs in production;
- throughput at concurrency 64 and 256 again behind an upstream that paces its 64 chunks
  like a decoding engine (due 10 ms apart on the stream's own clock by default), with the
  client's loops starting spread over one answer's length, as independent users arrive;
  then the same with the gateway on a core of its own: the production-like placement
  (each line prints how busy the machine was).

On a 2-core machine the client, the upstream and the gateway share the cores, so the
throughput ratio includes the gateway's CPU competing with the other two.

    python -m bench.gateway_overhead [--seconds 8] [--rounds 2] [--only peers,tracing,overhead]
    python -m bench.gateway_overhead --only ab --baseline /tmp/turnout-main
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

from bench.common import cpu_seconds, tree_cpu_seconds
from bench.upstream_server import CHUNKS
from bench.vllm_router import router_python, router_version, start_router
from tests.support import free_port
from turnout.domain import Backend, RegisterModelRequest
from turnout.store import Store, upgrade
from turnout.telemetry.statistics import quantile

MODEL_ID = "Bench_gw"
CLIENT_KEY = "bench-client-key-0123456789abcdef"


class Target:
    """Where requests go: an upstream directly (its served name) or the gateway (model id)."""

    def __init__(self, name: str, url: str, model: str,
                 headers: dict[str, str] | None = None) -> None:
        self.name, self.url, self.model = name, url, model
        self.headers = headers or {}


async def one(session: aiohttp.ClientSession, target: Target, *, stream: bool,
              user: str | None = None) -> tuple[float, float, str | None]:
    """(latency s, time to first chunk s, version header) of one completion."""
    body: dict[str, object] = {"model": target.model, "prompt": "hi", "max_tokens": 64,
                               "stream": stream}
    if user is not None:
        body["user"] = user
    started = time.perf_counter()
    async with session.post(f"{target.url}/v1/completions", json=body,
                            headers=target.headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{target.name}: HTTP {response.status}")
        first = None
        async for _ in response.content.iter_any():
            if first is None:
                first = time.perf_counter() - started
        done = time.perf_counter() - started
        return done, first or done, response.headers.get("X-Turnout-Version")


async def run_for(seconds: float, concurrency: int,
                  call: Callable[[], Awaitable[tuple[float, float, str | None]]],
                  spread_s: float = 0.0) -> tuple[int, list[float]]:
    """Completed calls and their times to first chunk, `concurrency` loops for `seconds`.

    The loops start `spread_s / concurrency` apart: behind a paced upstream every answer
    takes the same time, so loops started together would stay in lockstep and send all
    their requests at once, each round, unlike independent users.
    """
    deadline = time.perf_counter() + seconds
    ttft: list[float] = []

    async def loop(index: int) -> int:
        await asyncio.sleep(spread_s * index / concurrency)
        n = 0
        while time.perf_counter() < deadline:
            ttft.append((await call())[1])
            n += 1
        return n

    return sum(await asyncio.gather(*(loop(i) for i in range(concurrency)))), ttft


async def latency(session: aiohttp.ClientSession, targets: list[Target],
                  rounds: int, per_round: int = 300) -> dict[str, tuple[float, float]]:
    """p50 and p99 of non-streamed completions at concurrency 1, the targets alternated
    (`targets[0]` is direct: the others' added latency is measured against it)."""
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    for _ in range(rounds):
        for target in targets:
            for _ in range(per_round):
                samples[target.name].append((await one(session, target, stream=False))[0])
    figures = {}
    for name, values in samples.items():
        p50, p99 = quantile(values, 0.5), quantile(values, 0.99)
        assert p50 is not None and p99 is not None
        figures[name] = (p50, p99)
    d50, d99 = figures[targets[0].name]
    parts = [f"{name} p50 {p50 * 1000:.3f} ms p99 {p99 * 1000:.2f} ms"
             + ("" if name == targets[0].name else
                f" (added p50 {(p50 - d50) * 1000:.3f} ms, p99 {(p99 - d99) * 1000:.2f} ms)")
             for name, (p50, p99) in figures.items()]
    print(f"concurrency 1, {per_round * rounds} requests each: " + " | ".join(parts),
          flush=True)
    return figures


@dataclass
class Rates:
    """A throughput run's figures per target: streams/s, TTFT p99, CPU per stream of the
    targets whose process was measured, and how busy the machine was."""

    rate: dict[str, float]
    ttft_p99: dict[str, float]
    cpu_ms: dict[str, float]
    busy: dict[str, float]


async def streams(session: aiohttp.ClientSession, targets: list[Target],
                  pids: dict[str, int], concurrency: int, seconds: float, rounds: int,
                  spread_s: float = 0.0) -> Rates:
    """64-chunk streams per second of each target at `concurrency`, alternated; the CPU
    each proxy process (`pids[target name]`) used per stream it carried."""
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    ttfts: dict[str, list[float]] = {t.name: [] for t in targets}
    busy: dict[str, list[float]] = {t.name: [] for t in targets}
    cpu: dict[str, float] = {t.name: 0.0 for t in targets}
    carried: dict[str, int] = {t.name: 0 for t in targets}
    for _ in range(rounds):
        for target in targets:
            pid = pids.get(target.name)
            before = tree_cpu_seconds(pid) if pid else 0.0
            psutil.cpu_percent()  # the machine's busy share is measured from here
            done, ttft = await run_for(seconds, concurrency,
                                       lambda t=target: one(session, t, stream=True),
                                       spread_s)
            busy[target.name].append(psutil.cpu_percent())
            if pid:
                cpu[target.name] += tree_cpu_seconds(pid) - before
            carried[target.name] += done
            rates[target.name].append(done / seconds)
            ttfts[target.name].extend(ttft)
    return Rates({n: statistics.mean(r) for n, r in rates.items()},
                 {n: quantile(v, 0.99) or 0.0 for n, v in ttfts.items()},
                 {n: cpu[n] / max(carried[n], 1) * 1000 for n in pids if n in cpu},
                 {n: statistics.mean(b) for n, b in busy.items()})


async def throughput(session: aiohttp.ClientSession, direct: Target, gateway: Target,
                     gateway_pid: int, concurrency: int, seconds: float, rounds: int,
                     spread_s: float = 0.0) -> None:
    r = await streams(session, [direct, gateway], {"gateway": gateway_pid}, concurrency,
                      seconds, rounds, spread_s)
    d, g = r.rate["direct"], r.rate["gateway"]
    d99, g99 = r.ttft_p99["direct"], r.ttft_p99["gateway"]
    print(f"concurrency {concurrency}, 64-chunk streams: direct {d:.0f}/s, gateway {g:.0f}/s,"
          f" ratio {g / d:.3f} (goal >= 0.97); TTFT p99 direct {d99 * 1000:.1f} ms, gateway "
          f"{g99 * 1000:.1f} ms, overhead {(g99 - d99) * 1000:.1f} ms (goal <= 10); gateway "
          f"CPU {r.cpu_ms['gateway']:.2f} ms per stream; machine busy "
          f"{r.busy['direct']:.0f}% direct, {r.busy['gateway']:.0f}% through the gateway",
          flush=True)


async def cpu_per_request(session: aiohttp.ClientSession, gateway: Target,
                          gateway_pid: int, n: int = 3000) -> None:
    before = cpu_seconds(gateway_pid)
    gate = asyncio.Semaphore(16)

    async def call() -> None:
        async with gate:
            await one(session, gateway, stream=False)

    await asyncio.gather(*(call() for _ in range(n)))
    used = cpu_seconds(gateway_pid) - before
    print(f"gateway CPU per proxied non-streamed request: {used / n * 1000:.3f} ms "
          f"({n} requests at concurrency 16)", flush=True)


async def split(session: aiohttp.ClientSession, store: Store, gateway: Target,
                urls: dict[str, str], admin_url: str) -> None:
    async def route(b_share: float, key: str) -> None:
        await store.write_route(MODEL_ID, [
            Backend(version="a", weight=100 - b_share, url=urls["a"], served_model_name="a"),
            Backend(version="b", weight=b_share, url=urls["b"], served_model_name="b")], key)
        async with session.post(f"{admin_url}/admin/routes/refresh") as response:
            response.raise_for_status()

    async def versions(users: list[str | None]) -> list[str | None]:
        gate = asyncio.Semaphore(32)

        async def call(user: str | None) -> str | None:
            async with gate:
                return (await one(session, gateway, stream=False, user=user))[2]

        return list(await asyncio.gather(*(call(u) for u in users)))

    await route(10, "split-90-10")
    unkeyed = await versions([None] * 10_000)
    share = unkeyed.count("b") / len(unkeyed)
    users = [f"user-{i}" for i in range(2000)]
    first, second = await versions(users), await versions(users)
    sticky = sum(x == y for x, y in zip(first, second, strict=True)) / len(users)
    await route(20, "split-80-20")
    third = await versions(users)
    moved = sum(x != y for x, y in zip(first, third, strict=True)) / len(users)
    print(f"split 90/10 over 10,000 unkeyed requests: b got {share * 100:.2f}% (goal 10 ± 1); "
          f"keyed users (2,000, twice): {sticky * 100:.1f}% kept their version (goal 100%); "
          f"10-point change to 80/20 moved {moved * 100:.1f}% of users (goal ≈ 10%)",
          flush=True)
    await route(0, "all-on-a")


def start_gateway(root: Path, db_url: str, name: str, port: int, admin_port: int,
                  metrics: bool = True, keyed: bool = False,
                  extra_env: dict[str, str] | None = None,
                  tree: Path | None = None) -> subprocess.Popen[bytes]:
    """A gateway process (admin endpoints without a token: they listen on 127.0.0.1);
    `keyed`: it requires `CLIENT_KEY` from clients; `extra_env` over its environment;
    `tree`: the checkout whose code it runs (its working directory), this one's if None."""
    env = {**os.environ, **(extra_env or {}), "VLLM_MODEL_SWITCHING_DATABASE_URL": db_url,
           "VLLM_MODEL_SWITCHING_GATEWAY_PORT": str(port),
           "VLLM_MODEL_SWITCHING_GATEWAY_ADMIN_PORT": str(admin_port),
           "VLLM_MODEL_SWITCHING_GATEWAY_REQUEST_METRICS": str(metrics).lower(),
           "VLLM_MODEL_SWITCHING_GATEWAY_API_KEYS": CLIENT_KEY if keyed else ""}
    with (root / f"{name}.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--gateway-id", name, "--log-level", "WARNING"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tree)


def start_upstream(*args: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """The upstream process (`args` for `bench.upstream_server`) and its URLs, read from its
    first line."""
    upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream_server", *args],
                                stdout=subprocess.PIPE, text=True)
    assert upstream.stdout is not None
    return upstream, json.loads(upstream.stdout.readline())


async def prepare_store(db_url: str, urls: dict[str, str]) -> None:
    store = Store.from_url(db_url)
    try:
        for version in ("a", "b"):
            await store.register_version(RegisterModelRequest(
                model=f"bench/{version}", model_arch="Bench", model_stage="gw",
                version=version))
        await store.write_route(MODEL_ID, [Backend(version="a", weight=100, url=urls["a"],
                                                   served_model_name="a")], "all-on-a")
    finally:
        await store.close()


async def wait_healthy(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(100):
        try:
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no gateway answering at {url}")


async def metrics_cost(session: aiohttp.ClientSession, on: Target, off: Target,
                       seconds: float, rounds: int) -> None:
    """Two gateways, recording on and off, alternated at concurrency 64 (64-chunk streams)."""
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds * 2):
        for target in (on, off):
            done, _ = await run_for(seconds, 64, lambda t=target: one(session, t, stream=True))
            rates[target.name].append(done / seconds)
    r_on, r_off = statistics.mean(rates["on"]), statistics.mean(rates["off"])
    print(f"metrics on {r_on:.0f}/s vs off {r_off:.0f}/s (concurrency 64, 64-chunk streams, "
          f"{rounds * 2} alternations): ratio {r_on / r_off:.3f} (goal >= 0.99)", flush=True)


async def keys_cost(session: aiohttp.ClientSession, keyed: Target, open_: Target,
                    seconds: float, rounds: int) -> None:
    """Two gateways, client keys on and off: c=1 latency and c=64 streams, alternated."""
    latencies: dict[str, list[float]] = {"keys on": [], "keys off": []}
    rates: dict[str, list[float]] = {"keys on": [], "keys off": []}
    for _ in range(rounds * 2):
        for target in (keyed, open_):
            for _ in range(150):
                latencies[target.name].append((await one(session, target, stream=False))[0])
            done, _ = await run_for(seconds, 64, lambda t=target: one(session, t, stream=True))
            rates[target.name].append(done / seconds)
    on50, off50 = quantile(latencies["keys on"], 0.5), quantile(latencies["keys off"], 0.5)
    assert on50 is not None and off50 is not None
    r_on, r_off = statistics.mean(rates["keys on"]), statistics.mean(rates["keys off"])
    print(f"client keys on vs off: concurrency 1 p50 {on50 * 1000:.2f} vs {off50 * 1000:.2f} "
          f"ms (added {(on50 - off50) * 1000:.3f} ms); concurrency 64, 64-chunk streams "
          f"{r_on:.0f}/s vs {r_off:.0f}/s, ratio {r_on / r_off:.3f} ({rounds * 2} "
          f"alternations)", flush=True)


async def measure(db_url: str, urls: dict[str, str], ports: dict[str, tuple[int, int]],
                  pids: dict[str, int], seconds: float, rounds: int) -> None:
    store = Store.from_url(db_url)
    gateway_url = f"http://127.0.0.1:{ports['gateway'][0]}"
    admin_url = f"http://127.0.0.1:{ports['gateway'][1]}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            for port, _ in ports.values():
                await wait_healthy(session, f"http://127.0.0.1:{port}")
            direct = Target("direct", urls["a"], "a")
            gateway = Target("gateway", gateway_url, MODEL_ID)
            unrecorded = Target("off", f"http://127.0.0.1:{ports['unrecorded'][0]}", MODEL_ID)
            await run_for(1.0, 8, lambda: one(session, gateway, stream=True))  # warm up
            await run_for(1.0, 8, lambda: one(session, unrecorded, stream=True))
            await run_for(1.0, 8, lambda: one(session, direct, stream=True))
            await latency(session, [direct, gateway], rounds)
            for concurrency in (64, 256):
                await throughput(session, direct, gateway, pids["gateway"], concurrency,
                                 seconds, rounds)
            await cpu_per_request(session, gateway, pids["gateway"])
            await metrics_cost(session, Target("on", gateway_url, MODEL_ID), unrecorded,
                               seconds, rounds)
            if "keyed" in ports:
                keyed = Target("keys on", f"http://127.0.0.1:{ports['keyed'][0]}", MODEL_ID,
                               {"Authorization": f"Bearer {CLIENT_KEY}"})
                await run_for(1.0, 8, lambda: one(session, keyed, stream=True))  # warm up
                await keys_cost(session, keyed, Target("keys off", gateway_url, MODEL_ID),
                                seconds, rounds)
            await split(session, store, gateway, urls, admin_url)
    finally:
        await store.close()


@dataclass
class Setup:
    """A running upstream and gateways on one fresh store: `ports[name]` = (client, admin)."""

    db_url: str
    urls: dict[str, str]
    ports: dict[str, tuple[int, int]]
    pids: dict[str, int]
    upstream_pid: int = 0


@contextlib.contextmanager
def gateways_in_front_of_upstream(name: str, gateways: dict[str, bool],
                                  *upstream_args: str,
                                  env: dict[str, dict[str, str]] | None = None,
                                  trees: dict[str, Path] | None = None
                                  ) -> Iterator[Setup]:
    """Start the upstream, write the model's route, start one gateway per entry of
    `gateways` (name → per-request metrics on; the one named "keyed" requires client
    keys; `env[name]` over its environment; `trees[name]` the checkout it runs); stop
    them all at the end."""
    root = Path(tempfile.mkdtemp(prefix=f"turnout-bench-{name}-"))
    db_url = f"sqlite+aiosqlite:///{root}/turnout.db"
    upgrade(db_url)
    upstream, urls = start_upstream(*upstream_args)
    processes: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = [upstream]
    try:
        asyncio.run(prepare_store(db_url, urls))
        ports = {gateway: (free_port(), free_port()) for gateway in gateways}
        started = {gateway: start_gateway(root, db_url, gateway, *ports[gateway],
                                          metrics=metrics, keyed=gateway == "keyed",
                                          extra_env=(env or {}).get(gateway),
                                          tree=(trees or {}).get(gateway))
                   for gateway, metrics in gateways.items()}
        processes.extend(started.values())
        yield Setup(db_url, urls, ports, {k: p.pid for k, p in started.items()},
                    upstream.pid)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def _pin(pid: int, cores: list[int]) -> None:
    """Every thread of process `pid` (0: this one) onto `cores`."""
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    for tid in (int(t.name) for t in tasks.iterdir()):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cores)


@contextlib.contextmanager
def gateway_on_its_own_core(setup: Setup) -> Iterator[str]:
    """The gateway on the last core, the upstream and this client on the others: how it
    runs in production (on cores of its own), so its cost is not CPU taken from the two
    ends of the measurement. Yields a description of the placement."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        yield "one core: nothing to pin"
        return
    own, rest = cores[-1:], cores[:-1]
    for pid in setup.pids.values():
        _pin(pid, own)
    _pin(setup.upstream_pid, rest)
    _pin(0, rest)
    try:
        yield f"gateway on core {own[0]}, upstream and client on {rest}"
    finally:
        _pin(0, cores)


async def throughput_again(setup: Setup, seconds: float, rounds: int, title: str,
                           pinned: bool = False, spread_s: float = 0.0) -> None:
    """Throughput and time to first token at concurrency 64 and 256 on another setup
    (an upstream pacing its chunks, the gateway pinned to a core of its own, or both)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        gateway_url = f"http://127.0.0.1:{setup.ports['gateway'][0]}"
        await wait_healthy(session, gateway_url)
        direct = Target("direct", setup.urls["a"], "a")
        gateway = Target("gateway", gateway_url, MODEL_ID)
        with gateway_on_its_own_core(setup) if pinned \
                else contextlib.nullcontext("as started") as placement:
            print(f"{title} ({placement}):", flush=True)
            await run_for(1.0, 8, lambda: one(session, gateway, stream=True))  # warm up
            for concurrency in (64, 256):
                await throughput(session, direct, gateway, setup.pids["gateway"],
                                 concurrency, seconds, rounds, spread_s)


def neighbours(mine: set[int], sample_s: float = 1.0) -> str:
    """What else used the CPU over `sample_s` (processes above 5% of a core, not this
    benchmark's), and the load average: the figures' context on a shared machine."""
    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.info["pid"] not in mine]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent()
    time.sleep(sample_s)
    busy = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            share = proc.cpu_percent()
            if share >= 5:
                busy.append((share, proc.info["name"]))
    busy.sort(reverse=True)
    others = ", ".join(f"{name} {share:.0f}%" for share, name in busy[:6]) or "nothing"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"load average {load}; other processes on the CPU: {others}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


async def peers(setup: Setup, router_port: int, router_pid: int, seconds: float,
                rounds: int) -> None:
    """Direct, turnout's gateway and vllm-router in front of the same upstream, alternated:
    added latency at concurrency 1, 64-chunk streams per second at 64 and 256, CPU per
    stream of each proxy process; then the figures side by side."""
    mine = {os.getpid(), setup.upstream_pid, router_pid, *setup.pids.values()}
    print(f"peers, before: {neighbours(mine)}", flush=True)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        direct = Target("direct", setup.urls["a"], "a")
        turnout = Target("turnout", f"http://127.0.0.1:{setup.ports['gateway'][0]}",
                         MODEL_ID)
        router = Target("vllm-router", f"http://127.0.0.1:{router_port}", "a")
        targets = [direct, turnout, router]
        for target in targets:
            await wait_healthy(session, target.url)
            await run_for(1.0, 8, lambda t=target: one(session, t, stream=True))  # warm up
        pids = {"turnout": setup.pids["gateway"], "vllm-router": router_pid}
        lat = await latency(session, targets, rounds * 5, per_round=100)
        runs = {}
        for concurrency in (64, 256):
            runs[concurrency] = r = await streams(session, targets, pids, concurrency,
                                                  seconds, rounds)
            print(f"concurrency {concurrency}, 64-chunk streams/s: "
                  + ", ".join(f"{n} {v:.0f}" for n, v in r.rate.items())
                  + "; CPU per stream: "
                  + ", ".join(f"{n} {v:.3f} ms" for n, v in r.cpu_ms.items())
                  + "; machine busy: "
                  + ", ".join(f"{n} {v:.0f}%" for n, v in r.busy.items()), flush=True)
    added = {name: ((p50 - lat["direct"][0]) * 1000, (p99 - lat["direct"][1]) * 1000)
             for name, (p50, p99) in lat.items() if name != "direct"}
    rows = [("added p50 at c=1 (ms)", "-", f"{added['turnout'][0]:.3f}",
             f"{added['vllm-router'][0]:.3f}",
             f"{_ratio(added['turnout'][0], added['vllm-router'][0])} (goal <= 1.5)"),
            ("added p99 at c=1 (ms)", "-", f"{added['turnout'][1]:.2f}",
             f"{added['vllm-router'][1]:.2f}",
             _ratio(added["turnout"][1], added["vllm-router"][1]))]
    for concurrency, r in runs.items():
        rows.append((f"streams/s at c={concurrency}", f"{r.rate['direct']:.0f}",
                     f"{r.rate['turnout']:.0f}", f"{r.rate['vllm-router']:.0f}",
                     f"{_ratio(r.rate['turnout'], r.rate['vllm-router'])} (goal >= 1)"))
    for concurrency, r in runs.items():
        rows.append((f"CPU per stream at c={concurrency} (ms)", "-",
                     f"{r.cpu_ms['turnout']:.3f}", f"{r.cpu_ms['vllm-router']:.3f}",
                     f"{_ratio(r.cpu_ms['turnout'], r.cpu_ms['vllm-router'])} (goal <= 1)"))
    print("\nside by side (one run, alternated; client, upstream and proxy share this "
          f"machine's {os.cpu_count()} cores):")
    header = ("", "direct", "turnout", "vllm-router", "turnout / router")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  " + "  ".join(str(cell).rjust(w) if i else str(cell).ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    print(f"peers, after: {neighbours(mine)}", flush=True)


def run_peers(seconds: float, rounds: int) -> None:
    python = router_python()
    print(f"vllm-router {router_version(python)} from {python}", flush=True)
    with gateways_in_front_of_upstream("peers", {"gateway": True}) as setup:
        port = free_port()
        root = Path(tempfile.mkdtemp(prefix="turnout-bench-router-"))
        router = start_router(python, port, [setup.urls["a"]], root / "router.log")
        try:
            asyncio.run(peers(setup, port, router.pid, seconds, rounds))
        finally:
            router.terminate()
            router.wait(timeout=30)


async def _otlp_sink(port: int) -> tuple[web.AppRunner, list[int]]:
    """An OTLP/HTTP endpoint that accepts span exports and counts their bytes."""
    received: list[int] = []

    async def export(request: web.Request) -> web.Response:
        received.append(len(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, received


async def warmed(session: aiohttp.ClientSession, setup: Setup,
                 names: Iterable[str]) -> list[Target]:
    """The setup's gateways `names` as targets, each answering and warmed up."""
    targets = [Target(name, f"http://127.0.0.1:{setup.ports[name][0]}", MODEL_ID)
               for name in names]
    for target in targets:
        await wait_healthy(session, target.url)
        await run_for(1.0, 8, lambda t=target: one(session, t, stream=True))
    return targets


TRACE_SHARES = {"tracing off": None, "on, share 0": 0.0, "on, share 1%": 0.01,
                "on, share 10%": 0.1}


async def tracing_cost(setup: Setup, sink_port: int, seconds: float, rounds: int) -> None:
    """Gateways with tracing off (no endpoint), on with no client request sampled, and on
    with 1% and 10% of them sampled, alternated: c=1 latency and c=64 streams."""
    sink, exports = await _otlp_sink(sink_port)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            targets = await warmed(session, setup, TRACE_SHARES)
            lat = await latency(session, targets, rounds * 5, per_round=100)
            r = await streams(session, targets, setup.pids, 64, seconds, rounds)
    finally:
        await sink.cleanup()
    off = targets[0].name
    for name in TRACE_SHARES:
        print(f"  {name:>14}: c=1 p50 {lat[name][0] * 1000:.3f} ms "
              f"({(lat[name][0] - lat[off][0]) * 1000:+.3f} vs off), c=64 "
              f"{r.rate[name]:.0f} streams/s (ratio {r.rate[name] / r.rate[off]:.3f} vs off), "
              f"CPU {r.cpu_ms[name]:.3f} ms per stream", flush=True)
    print(f"  the collector received {len(exports)} exports, {sum(exports)} bytes", flush=True)


def run_tracing(seconds: float, rounds: int) -> None:
    sink_port = free_port()
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    env = {name: {} if share is None else
           {**endpoint, "VLLM_MODEL_SWITCHING_GATEWAY_TRACE_SAMPLE": str(share)}
           for name, share in TRACE_SHARES.items()}
    print("tracing: gateways with tracing off, and on (spans to an OTLP collector in this "
          "process) with shares of client requests sampled:", flush=True)
    with gateways_in_front_of_upstream("tracing", dict.fromkeys(TRACE_SHARES, True),
                                       env=env) as setup:
        asyncio.run(tracing_cost(setup, sink_port, seconds, rounds))


WORKER_COUNTS = {"1 worker": 1, "2 workers": 2}


async def workers_cost(setup: Setup, seconds: float, rounds: int) -> None:
    """One gateway process against two on one port (SO_REUSEPORT), alternated: c=1
    latency, streams per second at 64 and 256, CPU per stream (all workers together)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        targets = await warmed(session, setup, WORKER_COUNTS)
        lat = await latency(session, targets, rounds * 5, per_round=100)
        for concurrency in (64, 256):
            r = await streams(session, targets, setup.pids, concurrency, seconds, rounds)
            print(f"concurrency {concurrency}, 64-chunk streams/s: "
                  + ", ".join(f"{n} {r.rate[n]:.0f} (CPU {r.cpu_ms[n]:.3f} ms per stream)"
                              for n in WORKER_COUNTS)
                  + f"; ratio 2/1 {r.rate['2 workers'] / r.rate['1 worker']:.3f}", flush=True)
    print(f"  c=1 p50: 1 worker {lat['1 worker'][0] * 1000:.3f} ms, 2 workers "
          f"{lat['2 workers'][0] * 1000:.3f} ms", flush=True)
    print(f"  caveat: this machine has {os.cpu_count()} cores, shared by the two workers, "
          "the upstream and this load generator: a second worker competes with them for "
          "the same cores, so this ratio is no measure of what a second core gives a "
          "gateway that has cores of its own", flush=True)


def run_workers(seconds: float, rounds: int) -> None:
    print("gateway workers (GATEWAY_WORKERS=1 vs 2, one port):", flush=True)
    env = {name: {"VLLM_MODEL_SWITCHING_GATEWAY_WORKERS": str(n)}
           for name, n in WORKER_COUNTS.items()}
    with gateways_in_front_of_upstream("workers", dict.fromkeys(WORKER_COUNTS, True),
                                       env=env) as setup:
        asyncio.run(workers_cost(setup, seconds, rounds))


def run_overhead(seconds: float, rounds: int, chunk_delay_s: float) -> None:
    with gateways_in_front_of_upstream("gateway", {"gateway": True, "unrecorded": False,
                                                   "keyed": True}) as setup:
        asyncio.run(measure(setup.db_url, setup.urls, setup.ports, setup.pids, seconds,
                            rounds))
    with gateways_in_front_of_upstream("gateway-pinned", {"gateway": True}) as setup:
        asyncio.run(throughput_again(setup, seconds, rounds, "pinned", pinned=True))
    if chunk_delay_s > 0:
        paced = f"paced upstream (chunks {chunk_delay_s * 1000:g} ms apart, like an engine)"
        # One answer's length: the loops' starts spread over it (see `run_for`).
        spread_s = CHUNKS * chunk_delay_s
        with gateways_in_front_of_upstream("gateway-paced", {"gateway": True},
                                           "--chunk-delay-s", str(chunk_delay_s)) as setup:
            asyncio.run(throughput_again(setup, seconds, rounds, paced, spread_s=spread_s))
        with gateways_in_front_of_upstream("gateway-paced-pinned", {"gateway": True},
                                           "--chunk-delay-s", str(chunk_delay_s)) as setup:
            asyncio.run(throughput_again(setup, seconds, rounds, f"{paced}, pinned",
                                         pinned=True, spread_s=spread_s))


async def ab_cost(setup: Setup, names: list[str], seconds: float, rounds: int,
                  spread_s: float = 0.0) -> None:
    """This tree's gateway against the baselines' (`names[1:]`), alternated with direct:
    c=1 latency, streams/s at 64 and 256, CPU per stream; ratios this / each baseline.
    `spread_s`: the loops' starts spread over it (a paced upstream, see `run_for`)."""
    mine = {os.getpid(), setup.upstream_pid, *setup.pids.values()}
    print(f"ab, before: {neighbours(mine)}", flush=True)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        direct = Target("direct", setup.urls["a"], "a")
        await run_for(1.0, 8, lambda: one(session, direct, stream=True))
        targets = [direct, *await warmed(session, setup, names)]
        lat = await latency(session, targets, rounds * 5, per_round=100)
        runs = {c: await streams(session, targets, setup.pids, c, seconds, rounds, spread_s)
                for c in (64, 256)}
    this = names[0]
    for name in names:
        added = (lat[name][0] - lat["direct"][0]) * 1000
        line = [f"  {name}: added p50 at c=1 {added:.3f} ms"]
        for concurrency, r in runs.items():
            line.append(f"c={concurrency} {r.rate[name]:.0f} streams/s (direct "
                        f"{r.rate['direct']:.0f}), CPU {r.cpu_ms[name]:.3f} ms per stream")
        if name != this:
            ratios = ", ".join(
                f"c={c} streams {_ratio(r.rate[this], r.rate[name])}, CPU "
                f"{_ratio(r.cpu_ms[this], r.cpu_ms[name])}" for c, r in runs.items())
            line.append(f"{this} / {name}: {ratios}")
        print("; ".join(line), flush=True)
    print(f"ab, after: {neighbours(mine)}", flush=True)


def run_ab(seconds: float, rounds: int, baselines: list[Path],
           chunk_delay_s: float = 0.0) -> None:
    """`chunk_delay_s` > 0: behind an upstream pacing its chunks that far apart, as an
    engine does (each chunk then crosses the gateway on its own: per-chunk costs show)."""
    for tree in baselines:
        if not (tree / "gateway" / "__main__.py").is_file():
            raise SystemExit(f"--baseline {tree}: not a checkout with gateway/")
    if not baselines:
        raise SystemExit("--only ab needs --baseline DIR[,DIR...]")
    trees = {f"baseline {tree.name}": tree.resolve() for tree in baselines}
    names = ["this tree", *trees]
    paced = ("--chunk-delay-s", str(chunk_delay_s)) if chunk_delay_s > 0 else ()
    print(f"ab: this tree ({Path.cwd()}) against " + ", ".join(
        f"{name} ({tree})" for name, tree in trees.items())
        + (f", upstream chunks {chunk_delay_s * 1000:g} ms apart" if paced else
           ", fast upstream"), flush=True)
    with gateways_in_front_of_upstream("ab", dict.fromkeys(names, True), *paced,
                                       trees=trees) as setup:
        asyncio.run(ab_cost(setup, names, seconds, rounds, CHUNKS * chunk_delay_s))


SECTIONS = ("peers", "tracing", "workers", "overhead", "ab")


def main(seconds: float, rounds: int, chunk_delay_s: float, only: list[str],
         baselines: list[Path] | None = None, ab_chunk_delay_s: float = 0.0) -> None:
    if "peers" in only:
        run_peers(seconds, rounds)
    if "tracing" in only:
        run_tracing(seconds, rounds)
    if "workers" in only:
        run_workers(seconds, rounds)
    if "overhead" in only:
        run_overhead(seconds, rounds, chunk_delay_s)
    if "ab" in only:
        run_ab(seconds, rounds, baselines or [], ab_chunk_delay_s)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="length of each throughput run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternations of direct and gateway runs per measurement")
    parser.add_argument("--paced-chunk-delay-s", type=float, default=0.01,
                        help="also measure throughput behind an upstream pacing its chunks "
                             "this far apart (0: skip)")
    parser.add_argument("--baseline", default="",
                        help="for --only ab: comma-separated checkouts whose gateways "
                             "this tree's is measured against")
    parser.add_argument("--ab-chunk-delay-s", type=float, default=0.0,
                        help="for --only ab: an upstream pacing its chunks this far apart "
                             "(0: as fast as it can)")
    parser.add_argument("--only", default=",".join(SECTIONS[:-1]),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}; known: {SECTIONS}")
    main(args.seconds, args.rounds, args.paced_chunk_delay_s, sections,
         [Path(b) for b in args.baseline.split(",") if b], args.ab_chunk_delay_s)
