"""How often is a canary's verdict right? False rollbacks of A/A canaries, and detection of a
degraded target, at the default analysis settings.

On the real stack (Temporal dev server, workers, gateway, API) with real vLLM CPU engines on
tiny models, one light client sending completions (streamed and not, a few prompt lengths)
through the gateway without pause, and no analysis override (the settings' defaults:
error rate, p95 latency and p95 time to first token guarded, 10% and 20 ms latency tolerance,
95% confidence, a fresh target's first 25 requests left out):

- `aa`: N canaries of an A/A pair: each target has the stable version's weights and its
  own freshly started engine (the stack started it for the canary while the stable
  version served). A promoted target is the next canary's stable version; the replaced
  one stops (STANDBY_MINUTES=0), so every stable version was itself started fresh for
  the canary before. A rollback here is a false rollback.
- `degraded`: N canaries, alternating with the A/A ones, of a target that is really
  worse: an external endpoint (a proxy in this process) in front of a preloaded engine of
  the same weights that answers `--slowdown` (0.5: +50%) later than the engine did, at
  every quantile; or with `--degrade errors`, that fails `--error-share` (0.05: +5
  points) of its requests with a 500. A promotion here is a missed regression (the
  stable version is then restored with an immediate switch to a fresh engine of its
  weights).

Printed: each canary's outcome, wall time and verdict figures (per guarded metric the
target and stable values, ratio or difference, p-value, samples; the warm-up left out);
then the false-rollback rate and the detection rate, each with its 95% Wilson interval,
and the wall time per canary. Goals: false rollbacks <= 5%, detection >= 95%.

    python -m bench.verdict_accuracy [--n 20] [--arms aa,degraded] [--period-s 15]
                                     [--degrade latency|errors] [--slowdown 0.5]
                                     [--max-minutes M]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from bench.common import bench_stack
from turnout.telemetry.statistics import normal_isf
from turnout.tinymodels import ensure_tiny_models

MODEL_ID = "Bench_verdict"
WEIGHTS = "tiny-v1"  # every version of this benchmark: A/A means identical weights
# Byte-level tokenizer: a byte is a token; the engines hold 256 tokens per sequence.
PROMPTS = ("Hello", "Tell me a short story about a cat and a dog.",
           "Summarize in one sentence: the quick brown fox jumps over the lazy dog while "
           "the farmer watches from the porch and the sun sets behind the hills.")
GOAL_FALSE_ROLLBACKS = 0.05
GOAL_DETECTION = 0.95


# ---------------------------------------------------------------- pure parts (unit-tested)

def wilson_interval(successes: int, trials: int, confidence: float = 0.95
                    ) -> tuple[float, float]:
    """Two-sided Wilson score interval of a proportion: honest at 0/20 and 20/20, where the
    Wald interval collapses to a point. (0, 1) without trials."""
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes out of {trials} trials")
    if trials == 0:
        return 0.0, 1.0
    z = normal_isf((1.0 - confidence) / 2.0)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Canary:
    """One canary's end: `outcome` is promoted, rolled_back, stuck (inconclusive until an
    operator was asked: neither) or error (it did not run to a verdict)."""

    arm: str
    version: str
    outcome: str
    wall_s: float
    reason: str = ""
    verdicts: list[dict[str, Any]] = field(default_factory=list)


def rate_line(what: str, hits: int, trials: int, goal: str) -> str:
    """`what hits/trials = x% (95% Wilson interval lo-hi%); goal`."""
    low, high = wilson_interval(hits, trials)
    share = hits / trials * 100 if trials else float("nan")
    return (f"{what}: {hits}/{trials} = {share:.1f}% (95% Wilson interval "
            f"{low * 100:.1f}%-{high * 100:.1f}%); goal {goal}")


def summary(canaries: list[Canary]) -> list[str]:
    """The closing lines: per arm its outcomes, the rate that matters with its interval,
    which metrics failed, and the wall time per canary."""
    lines = []
    for arm, bad, what, goal in (
            ("aa", "rolled_back", "A/A false rollbacks", f"<= {GOAL_FALSE_ROLLBACKS:.0%}"),
            ("degraded", "rolled_back", "degraded target detected (rolled back)",
             f">= {GOAL_DETECTION:.0%}")):
        runs = [c for c in canaries if c.arm == arm]
        if not runs:
            continue
        tally = {o: sum(c.outcome == o for c in runs)
                 for o in ("promoted", "rolled_back", "stuck", "error")}
        lines.append(f"{arm}: " + ", ".join(f"{o} {k}" for o, k in tally.items()))
        judged = [c for c in runs if c.outcome != "error"]
        lines.append("  " + rate_line(what, tally[bad], len(judged), goal))
        failed = sorted({name for c in runs for v in c.verdicts
                         if v["outcome"] == "unhealthy"
                         for name, e in v["analysis"].get("metrics", {}).items()
                         if e.get("failed")})
        if failed:
            lines.append(f"  metrics that failed a look: {', '.join(failed)}")
        for name in ("latency_p95", "ttft_p95"):
            ratios = sorted(e["ratio"] for c in runs for v in c.verdicts
                            if (e := v["analysis"].get("metrics", {}).get(name, {}))
                            .get("compared") and e.get("ratio") is not None)
            if ratios:
                lines.append(f"  {name} target/stable over {len(ratios)} compared looks: "
                             f"median {statistics.median(ratios):.3f}, "
                             f"min {ratios[0]:.3f}, max {ratios[-1]:.3f}")
        walls = [c.wall_s for c in runs]
        lines.append(f"  wall time per canary: median {statistics.median(walls):.1f} s, "
                     f"min {min(walls):.1f} s, max {max(walls):.1f} s")
    return lines


def verdict_lines(verdict: dict[str, Any]) -> list[str]:
    """One look's figures: per guarded metric target vs stable, change, p-value, samples."""
    analysis = verdict.get("analysis", {})
    lines = [f"    look: {verdict['outcome']}: {verdict['reason'][:300]}"]
    for name, e in analysis.get("metrics", {}).items():
        samples = e.get("samples", {})
        if e.get("kind") == "rate":
            change = ("n/a" if e.get("difference") is None
                      else f"{e['difference'] * 100:+.2f} points")
            values = f"{_fmt(e.get('target'), 100, '%')} vs {_fmt(e.get('stable'), 100, '%')}"
        else:
            change = "n/a" if e.get("ratio") is None else f"ratio {e['ratio']:.3f}"
            values = f"{_fmt(e.get('target'), 1, ' ms')} vs {_fmt(e.get('stable'), 1, ' ms')}"
        p = e.get("p_value")
        lines.append(f"      {name}: {values} ({change}, p={'n/a' if p is None else f'{p:.3g}'}, "
                     f"alpha {e.get('alpha', 0):.3g}, samples {samples.get('target', 0)}/"
                     f"{samples.get('stable', 0)}"
                     + (", FAILED" if e.get("failed") else "")
                     + (f"; {e['note']}" if e.get("note") else "") + ")")
    if "warmup" in analysis:
        lines.append(f"      warm-up left out: {analysis['warmup'].get('excluded')} requests")
    return lines


def _fmt(value: float | None, scale: float, unit: str) -> str:
    return "n/a" if value is None else f"{value * scale:.1f}{unit}"


# ---------------------------------------------------------------- the real stack

class Load:
    """One client without pause: streamed and plain completions in turn, prompts in turn."""

    def __init__(self, gateway_url: str) -> None:
        self.gateway_url = gateway_url
        self.answered = 0
        self.failed = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        requests = itertools.cycle(itertools.product((False, True), PROMPTS))
        async with httpx.AsyncClient(base_url=self.gateway_url, timeout=120) as client:
            while not self._stop.is_set():
                stream, prompt = next(requests)
                body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 4,
                        "stream": stream}
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        await r.aread()
                    if r.status_code == 200:
                        self.answered += 1
                    else:
                        self.failed += 1
                except httpx.HTTPError:
                    self.failed += 1
                    await asyncio.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()


class DegradingProxy:
    """An OpenAI endpoint in front of an engine that answers later or fails on purpose.

    Every chunk of the engine's answer (a whole answer, or each piece of a stream) is
    passed on at `1 + slowdown` times the time the engine took to send it, so latency,
    time to first token and inter-token latency all grow by `slowdown` (plus this hop's
    own cost, which the verdicts' figures show). An evenly spread `error_share` of the
    requests is failed with a 500 instead, without reaching the engine (deterministic:
    request k fails when floor((k+1) f) > floor(k f)).
    """

    def __init__(self, upstream: str, engine_model: str, served_model_name: str, *,
                 slowdown: float = 0.0, error_share: float = 0.0) -> None:
        self.upstream = upstream
        self.engine_model = engine_model
        self.served_model_name = served_model_name
        self.slowdown = slowdown
        self.error_share = error_share
        self.url = ""
        self._k = 0
        self._runner: web.AppRunner | None = None
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> DegradingProxy:
        self._client = httpx.AsyncClient(base_url=self.upstream, timeout=120)
        app = web.Application()
        app.router.add_post("/v1/completions", self._forward)
        app.router.add_post("/v1/chat/completions", self._forward)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", lambda _: web.Response(status=200))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.aclose()

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_model_name, "object": "model", "created": 0,
             "owned_by": "bench"}]})

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._client is not None
        body = await request.json()
        body["model"] = self.engine_model
        k, self._k = self._k, self._k + 1
        if int((k + 1) * self.error_share) > int(k * self.error_share):
            return web.json_response({"error": {"message": "degraded on purpose",
                                                "type": "server_error", "param": None,
                                                "code": None}}, status=500)
        started = time.monotonic()
        chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        async with self._client.stream("POST", request.path, json=body) as answer:
            reader = asyncio.create_task(self._read(answer, started, chunks))
            response = web.StreamResponse(status=answer.status_code, headers={
                "Content-Type": answer.headers.get("content-type", "application/json")})
            try:
                while (item := await chunks.get()) is not None:
                    arrived, chunk = item
                    # Sent at (1 + slowdown) x the time the engine took to this chunk.
                    await asyncio.sleep(max(0.0, started + (1 + self.slowdown) * arrived
                                            - time.monotonic()))
                    if not response.prepared:
                        await response.prepare(request)
                    await response.write(chunk)
            finally:
                reader.cancel()
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
        return response

    @staticmethod
    async def _read(answer: httpx.Response, started: float,
                    chunks: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        """The engine's bytes as they come, stamped with their time since the request:
        read apart from the writer, so holding one chunk never delays reading the next."""
        try:
            async for chunk in answer.aiter_raw():
                await chunks.put((time.monotonic() - started, chunk))
        finally:
            await chunks.put(None)


class Bench:
    def __init__(self, api: httpx.AsyncClient, models: dict[str, Path], canary: dict[str, Any]
                 ) -> None:
        self.api = api
        self.models = models
        self.canary = canary
        self.stable = ""
        self.count = itertools.count()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = await self.api.request(method, path, **kwargs)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    async def register(self, prefix: str, **fields: Any) -> str:
        version = f"{prefix}{next(self.count)}"
        await self.call("POST", "/models", json={
            "model_arch": "Bench", "model_stage": "verdict", "version": version, **fields})
        return version

    async def register_engine_version(self, prefix: str) -> str:
        return await self.register(prefix, model=str(self.models[WEIGHTS]))

    async def switch(self, version: str, strategy: str, config: dict[str, Any]
                     ) -> dict[str, Any]:
        accepted = await self.call("POST", "/switch", json={
            "model_id": MODEL_ID, "target_version": version, "strategy": strategy,
            "strategy_config": config})
        operation = accepted["operation_id"]
        while True:
            status = await self.call("GET", f"/switch/operations/{operation}")
            if status["status"] in ("completed", "failed"):
                return status
            if status["phase"] == "awaiting_decision":  # inconclusive, extended to the end
                await self.call("POST", f"/switch/operations/{operation}/rollback",
                                json={"reason": "benchmark: stuck inconclusive"})
                status = await self.wait_end(operation)
                status["outcome"] = "stuck"
                return status
            await asyncio.sleep(0.5)

    async def wait_end(self, operation: str) -> dict[str, Any]:
        while True:
            status = await self.call("GET", f"/switch/operations/{operation}")
            if status["status"] in ("completed", "failed"):
                return status
            await asyncio.sleep(0.5)

    async def go_live(self) -> None:
        """An immediate switch to a fresh engine of the weights: the stable version."""
        version = await self.register_engine_version("live")
        status = await self.switch(version, "immediate", {})
        if status["outcome"] != "promoted":
            raise RuntimeError(f"{version} did not go live: {status['reason']}")
        self.stable = version

    async def run_canary(self, arm: str, version: str) -> Canary:
        started = time.monotonic()
        status = await self.switch(version, "canary", self.canary)
        wall = time.monotonic() - started
        outcome = status.get("outcome") or "error"
        if outcome not in ("promoted", "rolled_back", "stuck"):
            outcome = "error"
        elif outcome == "rolled_back" and not (status.get("reason") or "").startswith(
                "automatic rollback"):
            outcome = "error"  # a load failure ends on the stable version too
        canary = Canary(arm, version, outcome, wall, status.get("reason") or "",
                        status.get("verdicts") or [])
        if outcome == "promoted":
            self.stable = version
        return canary


def report(canary: Canary, i: int, n: int) -> None:
    print(f"{canary.arm} {i}/{n}: {canary.version} {canary.outcome} in {canary.wall_s:.1f} s"
          + ("" if canary.outcome == "promoted" else f": {canary.reason[:300]}"), flush=True)
    for verdict in canary.verdicts:
        print("\n".join(verdict_lines(verdict)), flush=True)


@asynccontextmanager
async def degraded_endpoint(bench: Bench, args: argparse.Namespace
                            ) -> AsyncIterator[DegradingProxy]:
    """A preloaded engine of the weights (placed on the core the stable one does not use,
    as a canary's target is) behind the degrading proxy."""
    base = await bench.register_engine_version("base")
    preload = await bench.call("POST", f"/models/{MODEL_ID}/versions/{base}/preload", json={})
    while preload["phase"] != "ready":
        if preload["phase"] in ("failed", "released", "evicted"):
            raise RuntimeError(f"preload of {base}: {preload}")
        await asyncio.sleep(0.5)
        preload = await bench.call("GET", f"/models/{MODEL_ID}/versions/{base}/preload")
    [engine] = [e for e in (await bench.call("GET", "/engines"))["engines"]
                if (e["model_id"], e["version"]) == (MODEL_ID, base)]
    upstream = f"http://127.0.0.1:{engine['port']}"
    served = (await bench.call("GET", f"{upstream}/v1/models"))["data"][0]["id"]
    proxy = await DegradingProxy(
        upstream, served, "degraded",
        slowdown=args.slowdown if args.degrade == "latency" else 0.0,
        error_share=args.error_share if args.degrade == "errors" else 0.0).start()
    try:
        yield proxy
    finally:
        await proxy.stop()
        await bench.call("DELETE", f"/models/{MODEL_ID}/versions/{base}/preload", json={})


async def main(args: argparse.Namespace) -> None:
    cache = os.environ.get("TURNOUT_TEST_MODELS_DIR")
    models = await asyncio.to_thread(
        ensure_tiny_models, Path(cache) if cache else Path.home() / ".cache" /
        "turnout-bench-models")
    canary = {"initial_percentage": args.initial, "step_percentage": args.step,
              "evaluation_period_minutes": args.period_s / 60}
    arms = args.arms.split(",")
    print(f"canary {canary}, default analysis settings, arms {arms}, N={args.n}, "
          f"degraded: {args.degrade} "
          + (f"+{args.slowdown:.0%}" if args.degrade == "latency" else
             f"+{args.error_share:.0%} errors"), flush=True)
    stack = bench_stack("verdicts", standby_minutes=0,
                        model_roots=[str(models[WEIGHTS].parent)])
    began = time.monotonic()
    deadline = began + args.max_minutes * 60 if args.max_minutes else None
    canaries: list[Canary] = []
    await stack.start()
    load = Load(stack.gateway_url)
    sender: asyncio.Task[None] | None = None
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=120) as api:
            bench = Bench(api, models, canary)
            await bench.go_live()
            sender = asyncio.create_task(load.run())
            try:
                async with contextlib.AsyncExitStack() as resources:
                    proxy = (await resources.enter_async_context(degraded_endpoint(bench, args))
                             if "degraded" in arms else None)
                    # The arms alternate, so a run cut short by --max-minutes has both.
                    for i in range(1, args.n + 1):
                        if deadline is not None and time.monotonic() > deadline:
                            print(f"--max-minutes reached: {i - 1} of {args.n} rounds run",
                                  flush=True)
                            break
                        if "aa" in arms:
                            target = await bench.register_engine_version("aa")
                            canaries.append(await bench.run_canary("aa", target))
                            report(canaries[-1], i, args.n)
                        if proxy is not None:
                            target = await bench.register("dg", model="degraded",
                                                          endpoint=proxy.url,
                                                          served_model_name="degraded")
                            canaries.append(await bench.run_canary("degraded", target))
                            report(canaries[-1], i, args.n)
                            if canaries[-1].outcome == "promoted":  # a miss: restore
                                await bench.go_live()
            except (RuntimeError, httpx.HTTPError) as exc:  # keep what was measured
                print(f"stopped early: {exc!r}", flush=True)
    finally:
        load.stop()
        if sender is not None:
            await sender
        await stack.stop()
    print(f"\nclient: {load.answered} answered, {load.failed} failed; "
          f"total {time.monotonic() - began:.0f} s")
    print("\n".join(summary(canaries)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20, help="canaries per arm (default 20)")
    parser.add_argument("--arms", default="aa,degraded",
                        help="comma-separated: aa, degraded (default both)")
    parser.add_argument("--period-s", type=float, default=15,
                        help="evaluation period of each canary step, seconds (default 15)")
    parser.add_argument("--initial", type=float, default=50, help="initial percentage")
    parser.add_argument("--step", type=float, default=50, help="step percentage")
    parser.add_argument("--degrade", choices=("latency", "errors"), default="latency")
    parser.add_argument("--slowdown", type=float, default=0.5,
                        help="added latency as a share of the engine's (default 0.5)")
    parser.add_argument("--error-share", type=float, default=0.05,
                        help="share of requests failed with --degrade errors (default 0.05)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no round after this many minutes (default: no limit)")
    asyncio.run(main(parser.parse_args()))
