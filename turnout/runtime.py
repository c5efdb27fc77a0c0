"""Process plumbing every turnout process shares: logging and the Temporal client."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RetryConfig

from turnout import tracing
from turnout.config import ModelSwitchingConfig


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One INFO line per HTTP call to a gateway or engine drowns what matters (and costs CPU
    # on a busy control worker); failures are logged by the callers with context.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def temporal_interceptors() -> list[Interceptor]:
    """Temporal's `TracingInterceptor` when tracing is on (`turnout.tracing`), else none.
    On a client it also reaches every worker built on that client."""
    tracer = tracing.tracer()
    if tracer is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(tracer)]


_runtimes: dict[str, Runtime] = {}


def temporal_runtime(settings: ModelSwitchingConfig) -> Runtime | None:
    """The process's one SDK runtime serving Prometheus metrics when
    `TEMPORAL_METRICS_PORT` is set (None: the SDK's default runtime, no metrics served)."""
    if not settings.temporal_metrics_port:
        return None
    address = f"{settings.temporal_metrics_host}:{settings.temporal_metrics_port}"
    if address not in _runtimes:
        _runtimes[address] = Runtime(telemetry=TelemetryConfig(
            metrics=PrometheusConfig(bind_address=address)))
    return _runtimes[address]


async def connect_temporal(settings: ModelSwitchingConfig, *, attempts: int = 60,
                           give_up_after_s: float | None = None) -> Client:
    """Connect with the pydantic converter, retrying while the Temporal server starts.

    `give_up_after_s`: each call of the client retries an unreachable server for at most
    this long before it raises (by default the SDK's ~10 s)."""
    retry = None if give_up_after_s is None else RetryConfig(
        initial_interval_millis=100, max_interval_millis=1000, max_retries=1000,
        max_elapsed_time_millis=int(give_up_after_s * 1000))
    runtime = temporal_runtime(settings)
    for attempt in range(1, attempts + 1):
        try:
            return await Client.connect(settings.temporal_address,
                                        namespace=settings.temporal_namespace,
                                        data_converter=pydantic_data_converter,
                                        interceptors=temporal_interceptors(),
                                        runtime=runtime, retry_config=retry)
        except RuntimeError as exc:
            if attempt == attempts:
                raise
            logging.getLogger(__name__).info("Temporal at %s not reachable yet (%s); retrying",
                                             settings.temporal_address, exc)
            await asyncio.sleep(1)
    raise AssertionError("unreachable")


def installed_binary(name: str) -> str:
    """A console binary of an installed package (`temporal`, `temporal-test-server`).

    Looked up beside the running interpreter first: a venv's bin/ is not always on PATH.
    """
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (pip install the package that has it)")
    return found


def port_free(host: str, port: int, *, reuse_address: bool = False) -> bool:
    """Whether a TCP listener could bind `host:port` now. With `reuse_address` a port
    whose old connections linger in TIME_WAIT counts as free (servers that set
    SO_REUSEADDR, as Temporal, uvicorn and aiohttp do, can bind it); only a listener
    takes it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


_PR_SET_PDEATHSIG = 1


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` that makes the child receive `sig` when the thread that started it
    ends (Linux `PR_SET_PDEATHSIG`), so a server never outlives a launcher killed with
    SIGKILL. Start children from a thread that lives as long as they should (the main
    thread), never from `asyncio.to_thread`. Elsewhere than Linux it does nothing."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def _set() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), int(sig))

    return _set
