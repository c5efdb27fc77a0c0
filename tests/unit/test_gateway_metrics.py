"""The gateway's windows and histograms: pure bookkeeping, no server."""

from __future__ import annotations

import math

from prometheus_client import generate_latest

from gateway.metrics import (
    MINUTE_KEEP_S,
    OUTCOMES,
    RAW_KEEP_S,
    SKETCH_RETENTION_S,
    GatewayMetrics,
    VersionStats,
)
from turnout.telemetry.catalogue import Source
from turnout.telemetry.sketch import Histogram


def stats_at(*times: float) -> VersionStats:
    stats = VersionStats()
    for i, at in enumerate(times):
        stats.outcomes.append((at, float(i + 1), False, None, None))
    return stats


def latencies(window: object) -> Histogram:
    return window.histogram(Source.LATENCY)  # type: ignore[attr-defined]


def test_a_window_holds_the_outcomes_finished_inside_it() -> None:
    stats = stats_at(100, 200, 210, 300)
    assert latencies(stats.window(150, 250)) == Histogram.of([2.0, 3.0])
    assert stats.window(0, 1000).requests == 4
    assert stats.window(301, 400).requests == 0


def test_a_wall_clock_step_back_does_not_hide_outcomes() -> None:
    # The clock stepped back 30 s after the outcome at 1000: later outcomes are older-stamped.
    stats = stats_at(900, 1000, 970, 975)
    assert latencies(stats.window(960, 980)) == Histogram.of([3.0, 4.0])


def test_streamed_outcomes_carry_ttft_inter_token_latency_and_output_rate() -> None:
    stats = VersionStats()
    stats.outcomes.append((10.0, 200.0, False, 40.0, 20.0))  # a stream: 50 tokens/s
    stats.outcomes.append((11.0, 150.0, False, None, None))  # a plain answer
    stats.outcomes.append((12.0, 5.0, True, None, None))  # an error: counted only
    window = stats.window(0, 100)
    assert (window.requests, window.errors) == (3, 1)
    assert window.histogram(Source.LATENCY) == Histogram.of([200.0, 150.0])
    assert window.histogram(Source.TTFT) == Histogram.of([40.0])
    assert window.histogram(Source.ITL) == Histogram.of([20.0])
    assert window.histogram(Source.OUTPUT_RATE) == Histogram.of([50.0])


def test_a_long_window_is_judged_whole_from_minute_and_hour_histograms() -> None:
    """48 hours of traffic at one request every 10 s: the raw outcomes keep the last hour,
    the rest is in minute (last day) and hour histograms, and a window over all of it
    counts every request once. A window starting mid-minute in folded traffic says where
    it really starts (`judged_since`)."""
    stats = VersionStats()
    start = 1_000_000_050.0  # 30 s into a minute
    now = start
    every_s, total = 10.0, int(48 * 3600 / 10)
    for i in range(total):
        now = start + i * every_s
        stats.outcomes.append((now, 100.0 + i % 7, False, None, None))
        if i % 360 == 0:
            stats.fold(now)
    stats.fold(now)
    assert len(stats.outcomes) <= RAW_KEEP_S / every_s + 60 / every_s
    assert len(stats.minutes) <= MINUTE_KEEP_S / 60 + 1 and stats.hours
    whole = stats.window(start - 1, now)
    assert whole.requests == total and not whole.cut
    assert whole.judged_since == start - 1  # nothing before `start` to leave out
    assert latencies(whole).count == total
    mid = stats.window(start + 3600 * 30 + 5, now)  # 30 h in, inside an hour histogram
    assert mid.judged_since is not None and mid.judged_since > mid.since
    assert mid.judged_since - mid.since <= 3600
    judged = sum(1 for i in range(total) if start + i * every_s >= mid.judged_since)
    assert mid.requests == judged


def test_beyond_the_retention_a_window_says_it_was_cut() -> None:
    stats = stats_at(0.0, 60.0, 120.0)
    stats.fold(SKETCH_RETENTION_S + 7200)
    assert stats.outcomes == type(stats.outcomes)() and stats.minutes == {} == stats.hours
    assert stats.window(0, SKETCH_RETENTION_S + 7200).cut
    assert not stats.window(SKETCH_RETENTION_S, SKETCH_RETENTION_S + 7200).cut


def test_raw_outcomes_are_bounded_whatever_the_rate() -> None:
    stats = VersionStats()
    for i in range(OUTCOMES + 5000):
        stats.outcomes.append((1000.0 + i * 0.001, 1.0, False, None, None))
    stats.fold(1000.0 + 10)
    assert len(stats.outcomes) <= OUTCOMES
    assert stats.window(0, math.inf).requests == OUTCOMES + 5000


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
    window = metrics.stats_by_model(0, 1e12)["m"]["v2"].window
    # A verdict on a just-finished window still finds it.
    assert window is not None and window.requests == 1
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
    assert metrics.stats_by_model()["m"]["old"].inflight == 0
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
    assert metrics.stats_by_model()["m"]["v1"].requests == 1


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


def test_a_fresh_versions_warm_up_is_left_out_of_every_versions_window() -> None:
    """The first `warmup_requests` outcomes of the new version after `since` are its
    warm-up: every version's window of the model starts after them (same span on both
    sides), and the new version's window says how many were left out."""
    metrics = GatewayMetrics()
    for version, first in (("v1", 100.0), ("v2", 100.5)):
        stats = metrics._get("m", version)
        for i in range(10):
            slow = version == "v2" and i < 3
            stats.outcomes.append((first + i, 900.0 if slow else 100.0, False, None, None))
    plain = metrics.stats_by_model(100.0, 200.0, model_id="m")
    warmed = metrics.stats_by_model(100.0, 200.0, model_id="m", warmup_version="v2",
                                    warmup_requests=3)
    v1, v2 = warmed["m"]["v1"].window, warmed["m"]["v2"].window
    assert v1 is not None and v2 is not None
    assert (v2.requests, v2.warmup_excluded) == (7, 3)
    assert latencies(v2) == Histogram.of([100.0] * 7)  # the slow first answers are gone
    assert v1.requests == 7 and v1.warmup_excluded == 0  # v1's same span: 103.0 onwards
    assert v1.judged_since == v2.judged_since and v1.judged_since is not None
    assert 102.5 < v1.judged_since < 103.0 and v1.since == 100.0
    assert plain["m"]["v2"].window is not None and plain["m"]["v2"].window.requests == 10
    # Fewer outcomes than the warm-up: nothing is judged yet (too few is inconclusive).
    short = metrics.stats_by_model(100.0, 200.0, model_id="m", warmup_version="v2",
                                   warmup_requests=50)["m"]["v2"].window
    assert short is not None and (short.requests, short.warmup_excluded) == (0, 10)
