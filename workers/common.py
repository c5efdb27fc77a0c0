"""What worker mains share beyond `turnout.runtime`: an orderly shutdown on signals, and
the interceptors every worker runs."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta

from temporalio.worker import Interceptor

from workers.store_outages import StoreOutages
from workers.tracing import worker_interceptors as tracing_interceptors


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so mains can shut down in order."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


# Heartbeats reach the server at most this far apart (Temporal's default is 80% of the
# heartbeat timeout, up to 60 s): an activity learns of its cancellation, say an operator's
# rollback while an engine starts, within this, and the rollback's answer waits on it.
HEARTBEAT_THROTTLE = timedelta(seconds=2)


def worker_interceptors() -> list[Interceptor]:
    """For every worker's `Worker(interceptors=...)`: store outages named as such, then the
    tracing attributes (when tracing is on)."""
    return [StoreOutages(), *tracing_interceptors()]
