"""The gateway's windows and histograms: pure bookkeeping, no server."""

from __future__ import annotations

from prometheus_client import generate_latest

from gateway.metrics import GatewayMetrics, VersionStats


def stats_at(*times: float) -> VersionStats:
    stats = VersionStats()
    for i, at in enumerate(times):
        stats.outcomes.append((at, float(i), False, None))
    return stats


def test_a_window_holds_the_outcomes_finished_inside_it_in_order() -> None:
    stats = stats_at(100, 200, 210, 300)
    assert stats.window(150, 250)["latencies_ms"] == [1.0, 2.0]
    assert stats.window(0, 1000)["requests"] == 4
    assert stats.window(301, 400)["requests"] == 0


def test_a_wall_clock_step_back_does_not_hide_outcomes() -> None:
    # The clock stepped back 30 s after the outcome at 1000: later outcomes are older-stamped.
    stats = stats_at(900, 1000, 970, 975)
    assert stats.window(960, 980)["latencies_ms"] == [2.0, 3.0]


def test_histograms_count_each_observation_in_its_le_bucket() -> None:
    metrics = GatewayMetrics()
    for seconds in (0.05, 0.06, 400.0):
        metrics.started("m", "v1")
        metrics.finished("m", "v1", seconds)
    text = generate_latest(metrics.registry).decode()
    bucket = 'turnout_gateway_request_latency_seconds_bucket{{le="{}",model_id="m",' \
             'version="v1"}} {}'
    assert bucket.format("0.05", "1.0") in text  # "less than or equal"
    assert bucket.format("0.1", "2.0") in text
    assert bucket.format("300.0", "2.0") in text and bucket.format("+Inf", "3.0") in text
    assert 'turnout_gateway_requests_total{model_id="m",version="v1"} 3.0' in text
    assert 'turnout_gateway_inflight{model_id="m",version="v1"} 0.0' in text
