"""Several gateway processes on one port (`VLLM_MODEL_SWITCHING_GATEWAY_WORKERS=N`).

`python -m gateway` with N > 1 becomes a supervisor: it starts N worker processes (the
same command with `--worker i`) and restarts one that dies. Each worker:

- accepts client connections on the shared client port (`SO_REUSEPORT`: the kernel
  spreads new connections over the workers), so one port serves on N cores;
- listens for admin calls on a port of its own, `GATEWAY_ADMIN_PORT + i`, and heartbeats
  into the store as a gateway of its own (`<gateway id>-w<i>`): the control plane treats
  every worker as a gateway replica, so a traffic shift returns only once every worker
  serves the new route, and verdicts merge every worker's windows as they merge every
  gateway's (each request is counted by the one worker that served it);
- answers `/metrics` with the sum over all workers (each fetched from its admin
  listener's `/admin/metrics/local`), so Prometheus sees one gateway whichever worker
  its scrape lands on.

With N = 1 (the default, and `make run`) none of this runs: one process, as before.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("gateway.workers")

# Series that are not summed over workers: a generation is the same number at every
# worker that serves it (the lowest is what all serve); `_created` is a timestamp.
_LOWEST = ("turnout_gateway_route_generation",)
RESTART_DELAY_S = 1.0
# A worker that exits this soon after its start cannot start (a port taken, bad settings):
# starting it again would fail the same way, so the supervisor stops instead.
FAILED_START_S = 10.0


def worker_gateway_id(gateway_id: str, index: int) -> str:
    return f"{gateway_id}-w{index}"


def worker_admin_port(base_port: int, index: int) -> int:
    return base_port + index


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def merge_metrics(texts: Iterable[str]) -> str:
    """Prometheus text expositions of several workers as one: samples with the same name
    and labels are added (counters, histogram buckets, sums and counts, in-flight
    gauges); route generations take the lowest and `_created` timestamps the earliest."""
    help_of: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            help_of.setdefault(family.name, (family.documentation, family.type))
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif sample.name.endswith("_created") or sample.name in _LOWEST:
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    lines = []
    for name, samples in values.items():
        documentation, kind = help_of[name]
        lines.append(f"# HELP {name} {documentation}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in samples.items():
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{rendered}}} {value!r}" if labels
                         else f"{sample_name} {value!r}")
    return "\n".join(lines) + "\n"


async def sibling_metrics(client: httpx.AsyncClient, urls: list[str]) -> list[str]:
    """Each other worker's own metrics; one that does not answer is left out (logged)."""
    async def fetch(url: str) -> str | None:
        try:
            response = await client.get(f"{url}/admin/metrics/local")
            response.raise_for_status()
            return response.text
        except httpx.HTTPError as exc:
            log.warning("gateway worker at %s did not give its metrics: %r", url, exc)
            return None

    return [t for t in await asyncio.gather(*(fetch(u) for u in urls)) if t is not None]


def supervise(argv: list[str], workers: int) -> int:
    """Run `workers` gateway processes (`python -m gateway ARGV --worker i`) until SIGINT
    or SIGTERM, which each worker gets in turn (in-flight requests get their grace);
    a worker that exits on its own is started again after a second, unless it could not
    start at all (then every worker is stopped and the supervisor exits 1)."""
    stopping = False

    def stop(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    started: dict[int, float] = {}

    def start(index: int) -> subprocess.Popen[bytes]:
        started[index] = time.monotonic()
        return subprocess.Popen([sys.executable, "-m", "gateway", *argv, "--worker",
                                 str(index)])

    code = 0
    children = {i: start(i) for i in range(workers)}
    log.info("gateway supervisor: %d workers (pids %s)", workers,
             ", ".join(str(p.pid) for p in children.values()))
    while not stopping:
        time.sleep(0.2)
        for index, child in list(children.items()):
            exited = child.poll()
            if exited is None or stopping:
                continue
            if time.monotonic() - started[index] < FAILED_START_S:
                log.error("gateway worker %d could not start (exit code %s); stopping",
                          index, exited)
                stopping, code = True, 1
                break
            log.error("gateway worker %d exited with code %s; starting it again",
                      index, exited)
            time.sleep(RESTART_DELAY_S)
            children[index] = start(index)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children.values():
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return code
