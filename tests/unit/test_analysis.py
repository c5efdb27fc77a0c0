"""Health analysis: statistics against known values, verdict rules on simulated traffic."""

from __future__ import annotations

import random

import pytest

from turnout.analysis import (
    Sample,
    figures,
    judge,
    mann_whitney_u,
    quantile,
    two_proportion_test,
)
from turnout.contracts import HealthThresholds


def simulate(rng: random.Random, version: str, n: int, *, median_ms: float = 800.0,
             sigma: float = 0.3, error_rate: float = 0.01) -> Sample:
    """n requests with lognormal latencies (LLM latencies are right-skewed) and errors."""
    sample = Sample(version, requests=n)
    for _ in range(n):
        if rng.random() < error_rate:
            sample.errors += 1
        else:
            sample.latencies_ms.append(median_ms * rng.lognormvariate(0.0, sigma))
    return sample


# ---------------------------------------------------------------------- statistics


def test_quantile_linear_interpolation() -> None:
    assert quantile([], 0.5) is None
    assert quantile([7.0], 0.99) == 7.0
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.95) == pytest.approx(3.85)
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.0) == 1.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0
    assert quantile(list(range(101)), 0.95) == pytest.approx(95.0)
    with pytest.raises(ValueError):
        quantile([1.0], 1.5)


def test_figures() -> None:
    f = figures("v2", 200, 10, [float(x) for x in range(1, 191)])
    assert (f.version, f.requests, f.errors) == ("v2", 200, 10)
    assert f.error_rate == pytest.approx(0.05)
    assert f.p50_ms == pytest.approx(95.5)
    assert f.p95_ms == pytest.approx(180.55)
    empty = figures("v2", 0, 0, [])
    assert empty.error_rate is None and empty.p95_ms is None


def test_two_proportion_test_known_values() -> None:
    # statsmodels' proportions_ztest([5, 12], [83, 99]) documents a two-sided p of 0.159.
    assert 2 * two_proportion_test(12, 99, 5, 83) == pytest.approx(0.159, abs=5e-4)
    # By hand: pooled 0.1125, se 0.031598, z 2.3736.
    assert two_proportion_test(30, 200, 15, 200) == pytest.approx(0.008809, abs=1e-5)
    # Equal rates: no evidence (z = 0); target better: p-value above one half.
    assert two_proportion_test(10, 100, 10, 100) == pytest.approx(0.5)
    assert two_proportion_test(1, 100, 10, 100) > 0.99
    assert two_proportion_test(0, 100, 0, 100) == 1.0
    assert two_proportion_test(1, 0, 0, 100) is None


def test_mann_whitney_known_values() -> None:
    # scipy's docs: mannwhitneyu(males, females, method="asymptotic") two-sided p 0.1113...
    males, females = [19, 22, 16, 29, 24], [20, 11, 17, 12]
    p = mann_whitney_u(males, females, min_size=1)
    assert p is not None and 2 * p == pytest.approx(0.11134688653314041, rel=1e-9)
    # By hand, complete separation of 10 vs 10: U 100, mean 50, var 175, z 3.7418.
    assert mann_whitney_u(list(range(11, 21)), list(range(1, 11))) == pytest.approx(
        9.1336e-5, rel=1e-3)
    # By hand, with ties (groups of 5, 10, 5): U 87.5, var 148.03, z 3.0411.
    assert mann_whitney_u([1] * 5 + [2] * 5, [0] * 5 + [1] * 5) == pytest.approx(
        0.0011785, rel=1e-3)
    assert mann_whitney_u([1.0] * 10, [1.0] * 10) == 1.0
    assert mann_whitney_u([1.0] * 7, [2.0] * 50) is None  # too small to approximate


# ---------------------------------------------------------------------- verdicts


def test_quiet_target_is_inconclusive() -> None:
    rng = random.Random(1)
    verdict = judge(simulate(rng, "v2", 12), simulate(rng, "v1", 300),
                    HealthThresholds(min_requests=20))
    assert verdict.outcome == "inconclusive"
    assert verdict.reason == "only 12 requests to v2, need 20"
    assert not verdict.healthy
    nothing = judge(Sample("v2"), None, HealthThresholds())
    assert nothing.outcome == "inconclusive" and nothing.target.requests == 0


def test_error_rate_limit_named_in_reason() -> None:
    rng = random.Random(2)
    target = simulate(rng, "v2", 200, error_rate=0.0)
    target.errors = 24
    verdict = judge(target, None, HealthThresholds(error_rate_max=0.05))
    assert verdict.outcome == "unhealthy"
    assert verdict.reason == "error rate 12.0% > 5.0% limit"
    assert verdict.analysis["error_rate"]["failed"] is True
    assert verdict.analysis["latency"]["failed"] is False


def test_latency_limits_named_in_reason() -> None:
    rng = random.Random(3)
    target = simulate(rng, "v2", 200, median_ms=4000, sigma=0.5, error_rate=0.0)
    verdict = judge(target, None, HealthThresholds(latency_p95_ms_max=5000,
                                                   latency_p99_ms_max=6000))
    assert verdict.outcome == "unhealthy"
    assert "p95 latency" in verdict.reason and "> 5000 ms limit" in verdict.reason
    assert "p99 latency" in verdict.reason and "> 6000 ms limit" in verdict.reason


def test_error_rate_worse_than_stable() -> None:
    target, stable = Sample("v2", 400, 18, [100.0] * 382), Sample("v1", 400, 2, [100.0] * 398)
    verdict = judge(target, stable, HealthThresholds(error_rate_max=0.10))
    assert verdict.outcome == "unhealthy"
    assert verdict.reason.startswith("error rate 4.5% vs stable 0.5% (+4.0 points > 2.0")
    assert verdict.analysis["error_rate"]["worse"] is True
    assert verdict.analysis["error_rate"]["p_value"] < 0.05
    # The same difference on a handful of requests is not significant: healthy.
    small = judge(Sample("v2", 25, 1, [100.0] * 24), Sample("v1", 25, 0, [100.0] * 25),
                  HealthThresholds(error_rate_max=0.10))
    assert small.outcome == "healthy"


def test_healthy_reason_summarises_figures() -> None:
    rng = random.Random(4)
    verdict = judge(simulate(rng, "v2", 230, error_rate=0.0),
                    simulate(rng, "v1", 230, error_rate=0.0), HealthThresholds())
    assert verdict.outcome == "healthy"
    assert verdict.reason.startswith(f"p95 {verdict.target.p95_ms:.0f} ms, errors 0.0% over "
                                     "230 requests (stable v1: p95 ")


def test_twenty_percent_slower_target_is_caught() -> None:
    """300 vs 300 requests, target truly 20% slower, default settings: caught."""
    thresholds = HealthThresholds()
    rng = random.Random(20)
    verdict = judge(simulate(rng, "v2", 300, median_ms=960), simulate(rng, "v1", 300),
                    thresholds)
    assert verdict.outcome == "unhealthy"
    assert verdict.reason.startswith("p95 latency ")
    assert "vs stable" in verdict.reason and "> 10% tolerance" in verdict.reason
    assert verdict.analysis["latency"]["worse"] is True
    # And not by luck of one seed: the power over 200 runs is high.
    caught = sum(judge(simulate(rng, "v2", 300, median_ms=960), simulate(rng, "v1", 300),
                       thresholds).outcome == "unhealthy" for _ in range(200))
    assert caught >= 180


def test_identical_target_rarely_flagged() -> None:
    thresholds = HealthThresholds(error_rate_tolerance=0.0)
    rng = random.Random(5)
    flagged = sum(judge(simulate(rng, "v2", 300, error_rate=0.02),
                        simulate(rng, "v1", 300, error_rate=0.02),
                        thresholds).outcome != "healthy" for _ in range(200))
    assert flagged <= (1 - thresholds.confidence + 0.03) * 200


def test_stable_too_quiet_to_compare() -> None:
    rng = random.Random(6)
    verdict = judge(simulate(rng, "v2", 100), simulate(rng, "v1", 5), HealthThresholds())
    assert verdict.outcome == "healthy"
    assert "not compared with stable: only 5 requests" in verdict.reason
    assert verdict.analysis["error_rate"]["compared"] is False


def test_compare_fills_both_metrics_with_winner() -> None:
    rng = random.Random(7)
    faster = simulate(rng, "v2", 400, median_ms=600, error_rate=0.01)
    slower = simulate(rng, "v1", 400, median_ms=800, error_rate=0.01)
    verdict = judge(faster, slower, HealthThresholds(), compare=True)
    assert verdict.outcome == "healthy"
    latency, errors = verdict.analysis["latency"], verdict.analysis["error_rate"]
    assert latency["winner"] == "target" and latency["not_worse"] is True
    assert latency["p_value_better"] < 0.001 and latency["p_value"] > 0.99
    assert errors["winner"] is None and errors["not_worse"] is True
    for key in ("p_value", "p_value_better", "target", "stable", "difference", "failed"):
        assert key in errors
    for key in ("p_value", "p_value_better", "target_p95_ms", "stable_p95_ms", "ratio",
                "failed"):
        assert key in latency

    reverse = judge(slower, faster, HealthThresholds(), compare=True)
    assert reverse.outcome == "unhealthy"
    assert reverse.analysis["latency"]["winner"] == "stable"
    assert reverse.analysis["latency"]["not_worse"] is False
