"""Gateway workers' metrics merged into one exposition (`gateway.workers.merge_metrics`):
real `GatewayMetrics` of two workers, rendered and parsed as Prometheus would."""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from gateway.workers import merge_metrics, worker_admin_port, worker_gateway_id


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_two_workers_metrics_add_up() -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    for metrics, served, failed in ((one, 3, 1), (two, 5, 0)):
        for i in range(served):
            metrics.started("M", 'v"1')
            metrics.finished("M", 'v"1', 0.01 * (i + 1),
                             failure="5xx" if i < failed else None)
        metrics.generation.labels("M").set(7 if metrics is one else 6)
        metrics.reject("no_route")
    merged = samples(merge_metrics([generate_latest(m.registry).decode()
                                    for m in (one, two)]))
    key = (("model_id", "M"), ("version", 'v"1'))
    assert merged[("turnout_gateway_requests_total", key)] == 8
    assert merged[("turnout_gateway_errors_total", key)] == 1
    assert merged[("turnout_gateway_request_latency_seconds_count", key)] == 8
    assert merged[("turnout_gateway_rejected_total", (("reason", "no_route"),))] == 2
    # The generation every worker serves is the lowest of theirs.
    assert merged[("turnout_gateway_route_generation", (("model_id", "M"),))] == 6
    created = [v for (name, _), v in merged.items() if name.endswith("_created")]
    assert created and all(0 < v <= time.time() for v in created)  # earliest, not summed


def test_worker_names_and_ports() -> None:
    assert worker_gateway_id("gw", 1) == "gw-w1"
    assert [worker_admin_port(8002, i) for i in range(3)] == [8002, 8003, 8004]
