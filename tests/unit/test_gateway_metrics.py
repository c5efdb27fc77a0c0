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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def served(metrics: GatewayMetrics, version: str, *, failure: str | None = None) -> None:
    metrics.started("m", version)
    metrics.finished("m", version, 0.1, failure=failure)


def test_stats_of_a_version_in_no_route_go_after_the_retention_period() -> None:
    clock = FakeClock()
    metrics = GatewayMetrics(retention_s=3600, clock=clock)
    served(metrics, "v1")
    served(metrics, "v2", failure="5xx")
    metrics.failed_over("m", "v2", "v1")
    metrics.mirror_sent("m", "v3")
    served(metrics, "v3")
    both = {("m", "v1"), ("m", "v2"), ("m", "v3")}
    assert metrics.forget_unrouted(both) == []
    clock.now += 10 * 3600
    assert metrics.forget_unrouted(both) == []  # routed: kept however long

    # v2 leaves every route (a rollback), v3's shadow ends.
    assert metrics.forget_unrouted({("m", "v1")}) == []
    clock.now += 3599
    assert metrics.forget_unrouted({("m", "v1")}) == []
    window = metrics.stats_by_model(0, 1e12)["m"]["v2"]["window"]
    assert window["requests"] == 1  # a verdict on a just-finished window still finds it
    clock.now += 1
    assert sorted(metrics.forget_unrouted({("m", "v1")})) == [("m", "v2"), ("m", "v3")]
    assert set(metrics.stats_by_model()["m"]) == {"v1"}
    text = generate_latest(metrics.registry).decode()
    assert 'version="v2"' not in text and 'version="v3"' not in text and 'to="v2"' not in text
    assert 'turnout_gateway_requests_total{model_id="m",version="v1"} 1.0' in text

    # The version failed over to goes too, and takes the failovers series naming it.
    clock.now += 3600
    assert metrics.forget_unrouted(set()) == []  # the clock starts when it leaves
    clock.now += 3600
    assert metrics.forget_unrouted(set()) == [("m", "v1")]
    assert "failovers_total{" not in generate_latest(metrics.registry).decode()


def test_a_version_with_requests_in_flight_is_kept_until_the_retention_after_the_last() -> None:
    clock = FakeClock()
    metrics = GatewayMetrics(retention_s=60, clock=clock)
    metrics.started("m", "old")  # a long stream, still going when the route moves on
    served(metrics, "old")
    assert metrics.forget_unrouted(set()) == []
    clock.now += 3600
    assert metrics.forget_unrouted(set()) == []
    metrics.finished("m", "old", 3600.0)
    assert metrics.forget_unrouted(set()) == []
    clock.now += 59
    assert metrics.forget_unrouted(set()) == []
    assert metrics.stats_by_model()["m"]["old"]["inflight"] == 0
    clock.now += 1
    assert metrics.forget_unrouted(set()) == [("m", "old")]


def test_a_version_back_in_a_route_starts_its_retention_over() -> None:
    clock = FakeClock()
    metrics = GatewayMetrics(retention_s=60, clock=clock)
    served(metrics, "v1")
    metrics.forget_unrouted(set())
    clock.now += 50
    metrics.forget_unrouted({("m", "v1")})  # routed again (a second canary)
    metrics.forget_unrouted(set())
    clock.now += 50
    assert metrics.forget_unrouted(set()) == []
    clock.now += 10
    assert metrics.forget_unrouted(set()) == [("m", "v1")]
    served(metrics, "v1")  # comes back: counts from zero
    assert metrics.stats_by_model()["m"]["v1"]["requests"] == 1


def test_memory_stays_bounded_over_many_rotations() -> None:
    clock = FakeClock()
    metrics = GatewayMetrics(retention_s=600, clock=clock)
    for rotation in range(1000):  # one rollout to a new version every 5 minutes
        version = f"v{rotation}"
        served(metrics, version, failure="5xx" if rotation % 2 else None)
        metrics.forget_unrouted({("m", version)})
        clock.now += 300
    assert len(metrics.stats_by_model()["m"]) <= 3
    assert generate_latest(metrics.registry).decode().count("upstream_errors_total{") <= 3
