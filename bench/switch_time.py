"""How much does orchestration add to an engine's own start?

Measured side by side in one run on the same machine, alternating:
  (a) turnout: time from `POST /switch` (immediate, target not loaded) to the first request
      served by the target through the gateway, and to the operation's completion;
  (b) bare vLLM: time for `python -m vllm.entrypoints.openai.api_server` on the same tiny
      model, started by hand, to answer its first completion.
Prints each run and the ratios (a)/(b). Goal: first-served / bare ≤ 1.2.

    python -m bench.switch_time [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import bench_stack
from tests.support import free_port
from turnout.tinymodels import ensure_tiny_models
from workers.stack import Stack

MODEL_ID = "Bench_chat"
# Both sides poll at the same pace; faster polling through the gateway would load the live
# engine while the target loads beside it, and charge that to turnout.
POLL_S = 0.2


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


async def bare_vllm(model: Path, log: Path) -> float:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "bare", "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    started = time.monotonic()
    proc = spawn(argv, env, log)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"bare vLLM exited; see {log}")
                try:
                    r = await client.post(f"http://127.0.0.1:{port}/v1/completions",
                                          json={"model": "bare", "prompt": "Hello",
                                                "max_tokens": 4})
                    if r.status_code == 200:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(POLL_S)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


async def turnout_switch(stack: Stack, version: str) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=30) as client:
        started = time.monotonic()
        r = await client.post(f"{stack.api_url}/switch", json={
            "model_id": MODEL_ID, "target_version": version, "strategy": "immediate"})
        r.raise_for_status()
        operation_id = r.json()["operation_id"]
        first_served = completed = None
        while first_served is None or completed is None:
            if first_served is None:
                try:
                    g = await client.post(f"{stack.gateway_url}/v1/completions", json={
                        "model": MODEL_ID, "prompt": "Hello", "max_tokens": 4})
                    if g.status_code == 200 and g.headers.get("x-turnout-version") == version:
                        first_served = time.monotonic() - started
                except httpx.HTTPError:
                    pass
            if completed is None:
                s = (await client.get(f"{stack.api_url}/switch/operations/{operation_id}")).json()
                if s["status"] == "failed":
                    raise RuntimeError(f"switch failed: {s}")
                if s["status"] == "completed":
                    completed = time.monotonic() - started
            await asyncio.sleep(POLL_S)
        return first_served, completed


async def main(rounds: int) -> None:
    stack = bench_stack("switch", engine_port_start=28100, engine_port_end=28149)
    models = ensure_tiny_models(Path(stack.settings.state_dir) / "models")
    await stack.start()
    bare: list[float] = []
    served: list[float] = []
    done: list[float] = []
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            # Alternate between two versions so every switch loads a target from scratch.
            for i, name in enumerate(("tiny-v1", "tiny-v2")):
                (await client.post(f"{stack.api_url}/models", json={
                    "model": str(models[name]), "model_arch": "Bench", "model_stage": "chat",
                    "version": f"v{i + 1}"})).raise_for_status()
        for round_ in range(rounds * 2):
            b = await bare_vllm(models["tiny-v1"], stack.log_dir / "bare-vllm.log")
            f, c = await turnout_switch(stack, f"v{round_ % 2 + 1}")
            bare.append(b)
            served.append(f)
            done.append(c)
            print(f"round {round_ + 1}: bare vLLM ready {b:6.2f} s | turnout first served "
                  f"{f:6.2f} s, completed {c:6.2f} s | ratio {f / b:.3f}", flush=True)
    finally:
        await stack.stop()
    b, f, c = (statistics.median(x) for x in (bare, served, done))
    print(f"\nmedian over {len(bare)} rounds: bare {b:.2f} s, first served {f:.2f} s, "
          f"completed {c:.2f} s")
    print(f"ratio first-served / bare = {f / b:.3f} (goal <= 1.2); "
          f"completed / bare = {c / b:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="pairs of switches to time")
    asyncio.run(main(parser.parse_args().rounds))
