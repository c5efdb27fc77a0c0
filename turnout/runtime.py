"""Process plumbing every turnout process shares: logging and the Temporal client."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from pathlib import Path

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

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


async def connect_temporal(settings: ModelSwitchingConfig, *, attempts: int = 60) -> Client:
    """Connect with the pydantic converter, retrying while the Temporal server starts."""
    runtime = temporal_runtime(settings)
    for attempt in range(1, attempts + 1):
        try:
            return await Client.connect(settings.temporal_address,
                                        namespace=settings.temporal_namespace,
                                        data_converter=pydantic_data_converter,
                                        interceptors=temporal_interceptors(),
                                        runtime=runtime)
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
