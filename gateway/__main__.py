"""`python -m gateway`: run the data plane with settings from `VLLM_MODEL_SWITCHING_*`.

Flags override the settings so several gateways can run on one host. SIGINT/SIGTERM stop
it cleanly: in-flight requests get a grace period and the gateway leaves the store's
gateway table, so switches stop waiting for it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import sys

import uvloop

from gateway.app import AdminBindError, start_gateway
from gateway.workers import supervise, worker_gateway_id
from turnout.config import ConfigError, ModelSwitchingConfig
from turnout.store import Store
from turnout.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger("gateway")

# Young-generation size between cyclic collections. Every proxied request allocates a few
# hundred short-lived objects; at CPython's default (700) the collector ran ~1,000 times a
# minute under load here and took 3-4% of the gateway's CPU, with pauses up to 80 ms.
# Measured by bench.gateway_overhead: CPU per proxied request 0.62 -> 0.45 ms.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Freeze what start-up allocated (imports, settings, the app: never garbage) so full
    collections skip it, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class _GatewayIdFilter(logging.Filter):
    """Stamp every record with the gateway id: several gateways often share one log."""

    def __init__(self, gateway_id: str) -> None:
        super().__init__()
        self.gateway_id = gateway_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.gateway_id = self.gateway_id
        return True


def setup_logging(gateway_id: str, level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_GatewayIdFilter(gateway_id))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s [gateway %(gateway_id)s] %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gateway",
                                     description="turnout gateway (OpenAI-compatible proxy)")
    parser.add_argument("--host", help="bind address (default: gateway_host setting)")
    parser.add_argument("--port", type=int, help="bind port (default: gateway_port setting)")
    parser.add_argument("--admin-port", type=int,
                        help="admin bind port (default: gateway_admin_port setting)")
    parser.add_argument("--gateway-id", help="id in the store (default: <hostname>-<port>)")
    parser.add_argument("--log-level", default="INFO")
    # Set by the supervisor of several workers (GATEWAY_WORKERS > 1), see gateway.workers.
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def run(settings: ModelSwitchingConfig, gateway_id: str,
              worker: int | None = None) -> None:
    store = Store.from_url(settings.database_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        running = await start_gateway(settings, store, gateway_id, worker=worker)
    except BaseException:
        await store.close()
        raise
    tune_gc()
    log.info("gateway %s serving clients on %s:%d, admin on %s:%d%s", gateway_id,
             settings.gateway_host, settings.gateway_port, settings.gateway_admin_host,
             settings.gateway_admin_port,
             "" if settings.gateway_admin_token else " (no admin token: loopback only)")
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await running.stop()
        await store.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict[str, object] = {}
    if args.host:
        overrides["gateway_host"] = args.host
    if args.port:
        overrides["gateway_port"] = args.port
    if args.admin_port:
        overrides["gateway_admin_port"] = args.admin_port
    try:
        settings = ModelSwitchingConfig.from_env(None, **overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    gateway_id = args.gateway_id or f"{socket.gethostname()}-{settings.gateway_port}"
    if settings.gateway_workers > 1 and args.worker is None:
        setup_logging(gateway_id, args.log_level.upper())
        return supervise(list(argv if argv is not None else sys.argv[1:]),
                         settings.gateway_workers)
    if args.worker is not None:
        gateway_id = worker_gateway_id(gateway_id, args.worker)
    setup_logging(gateway_id, args.log_level.upper())
    setup_tracing("gateway")
    try:
        # uvloop: the proxy is event-loop work; measured by bench.gateway_overhead, it cut
        # the CPU per proxied request by ~10% and the added p99 latency from 1.9 to 0.8 ms.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(settings, gateway_id, args.worker))
    except (OSError, AdminBindError) as exc:  # e.g. a port is taken
        log.error("gateway could not start: %s", exc)
        return 1
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
