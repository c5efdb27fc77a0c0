"""Verdicts: statistics against known values, verdict rules on simulated traffic."""

from __future__ import annotations

import math
import random
from typing import Any

import pydantic
import pytest

from api.switching import switch_thresholds
from gateway.metrics import GatewayMetrics, UnrecordedMetrics
from turnout.config import ModelSwitchingConfig
from turnout.domain import SwitchAnalysis, SwitchRequest
from turnout.strategies import planned_looks as strategy_looks
from turnout.telemetry.catalogue import Source
from turnout.telemetry.figures import WindowSamples
from turnout.telemetry.sketch import Histogram
from turnout.telemetry.statistics import (
    count,
    fisher_exact_greater,
    mann_whitney_u,
    normal_isf,
    quantile,
    quantile_interval,
    tail_test,
    two_proportion_test,
)
from turnout.telemetry.verdicts import GuardedMetric, HealthThresholds, judge


def planned_looks(request: SwitchRequest) -> int:
    return strategy_looks(request.strategy, request.strategy_config)


def Sample(version: str, requests: int = 0, errors: int = 0,  # noqa: N802 - reads as a type
           latencies: list[float] | None = None,
           ttft: list[float] | None = None) -> WindowSamples:
    """A version's window from raw samples."""
    sample = WindowSamples(version)
    sample.add_values(requests, errors, latencies or [], ttft or [])
    return sample


def simulate(rng: random.Random, version: str, n: int, *, median_ms: float = 800.0,
             sigma: float = 0.3, error_rate: float = 0.01,
             ttft_median_ms: float | None = None) -> WindowSamples:
    """n requests with lognormal latencies (LLM latencies are right-skewed) and errors;
    with `ttft_median_ms`, every success is a stream with a lognormal time to first token."""
    errors, latencies, ttft = 0, [], []
    for _ in range(n):
        if rng.random() < error_rate:
            errors += 1
        else:
            latencies.append(median_ms * rng.lognormvariate(0.0, sigma))
            if ttft_median_ms is not None:
                ttft.append(ttft_median_ms * rng.lognormvariate(0.0, sigma))
    return Sample(version, n, errors, latencies, ttft)


def ttft_count(sample: WindowSamples) -> int:
    return count(sample.values(Source.TTFT))


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
    """Quantiles of a window are those of its samples within the sketch's 1% (its bins
    are 2% wide and stand for their centre)."""
    f = Sample("v2", 200, 10, [float(x) for x in range(1, 191)]).figures()
    assert (f.version, f.requests, f.errors) == ("v2", 200, 10)
    assert f.error_rate == pytest.approx(0.05)
    assert f.latency_p50_ms == pytest.approx(95.5, rel=0.01)
    assert f.latency_p95_ms == pytest.approx(180.55, rel=0.01)
    empty = Sample("v2").figures()
    assert empty.error_rate is None and empty.latency_p95_ms is None


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


def test_fisher_exact_known_values() -> None:
    # By hand: N 22, 4 events, 10 drawn: (C(4,3) C(18,7) + C(4,4) C(18,6)) / C(22,10).
    assert fisher_exact_greater(3, 10, 1, 12) == pytest.approx(145860 / 646646, rel=1e-9)
    # All 5 events on the target (10 of 20 drawn): one table, C(15,5) / C(20,10).
    assert fisher_exact_greater(5, 10, 0, 10) == pytest.approx(
        math.comb(15, 5) / math.comb(20, 10), rel=1e-9)
    # 9 errors vs 1 on 300 requests each: the pooled z-test says 0.005, exact about 0.010
    # (close to the conditional binomial tail 11/1024): the reason the verdict is exact.
    exact = fisher_exact_greater(9, 300, 1, 300)
    assert exact == pytest.approx(0.01023, abs=5e-5)
    assert two_proportion_test(9, 300, 1, 300) < exact / 1.8
    assert fisher_exact_greater(0, 100, 0, 100) == 1.0
    assert fisher_exact_greater(10, 100, 10, 100) > 0.5
    assert fisher_exact_greater(1, 0, 0, 100) is None
    # Large counts agree with the z-test (the tail sum stops once terms vanish).
    big = fisher_exact_greater(5000, 100000, 4800, 100000)
    z = two_proportion_test(5000, 100000, 4800, 100000)
    assert big is not None and z is not None and big == pytest.approx(z, rel=0.1)


def test_normal_isf_and_quantile_interval() -> None:
    assert normal_isf(0.025) == pytest.approx(1.959964, abs=1e-6)
    assert normal_isf(0.05) == pytest.approx(1.644854, abs=1e-6)
    assert normal_isf(0.5) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        normal_isf(0.0)
    values = [float(x) for x in range(1, 1001)]
    # p95 of 1..1000 is 950.05; 2 sigma of the binomial count is ~6.9 ranks each way.
    low, high = quantile_interval(values, 0.95, 0.025) or (0.0, 0.0)
    assert 935 <= low < 950.05 < high <= 965
    assert quantile_interval([], 0.95, 0.05) is None
    assert quantile_interval([3.0], 0.95, 0.05) == (3.0, 3.0)


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
    p95 = verdict.target.latency_p95_ms
    assert verdict.reason.startswith(f"p95 {p95:.0f} ms, errors 0.0% over "
                                     "230 requests (stable v1: p95 ")


def test_twenty_percent_slower_target_is_caught() -> None:
    """300 vs 300 requests, target truly 20% slower (twice the tolerance), default
    settings: caught."""
    thresholds = HealthThresholds()
    rng = random.Random(20)
    verdict = judge(simulate(rng, "v2", 300, median_ms=960), simulate(rng, "v1", 300),
                    thresholds)
    assert verdict.outcome == "unhealthy"
    assert verdict.reason.startswith("p95 latency ")
    assert "vs stable" in verdict.reason and "> 10% tolerance" in verdict.reason
    assert verdict.analysis["latency"]["worse"] is True
    assert verdict.analysis["metrics"]["latency_p95"]["margin"] == pytest.approx(1.1)
    # And not by luck of one seed. The rank test asks whether the target is slower than
    # stable x 1.1 (the tolerance is in the null hypothesis), which costs some power this
    # close to the tolerance: measured (seed 20, 400 runs) 94% at 1 look, 86% at the 10
    # looks of a default canary; a target 50% slower is caught every time (below).
    for looks, power in ((1, 0.9), (planned_looks(SwitchRequest(
            model_id="m", target_version="v2", strategy="canary")), 0.8)):
        rng = random.Random(20)
        thresholds = HealthThresholds(looks=looks)
        caught = sum(judge(simulate(rng, "v2", 300, median_ms=960),
                           simulate(rng, "v1", 300), thresholds).outcome == "unhealthy"
                     for _ in range(400))
        assert caught >= power * 400, (looks, caught)


def test_a_target_fifty_percent_slower_is_caught_95_percent_of_the_time() -> None:
    """The regression a user must be protected from (+50% latency): at least 95% power at
    the per-look level of a default canary (10 looks), with wide latencies (sigma 0.5)
    and 150 requests per side. Measured: 93% with 100 per side, 100% with 300."""
    looks = planned_looks(SwitchRequest(model_id="m", target_version="v2", strategy="canary"))
    rng = random.Random(21)
    thresholds = HealthThresholds(looks=looks)
    caught = sum(judge(simulate(rng, "v2", 150, median_ms=1200, sigma=0.5, error_rate=0),
                       simulate(rng, "v1", 150, sigma=0.5, error_rate=0),
                       thresholds).outcome == "unhealthy" for _ in range(300))
    assert caught >= 0.95 * 300, caught


def test_a_aa_per_look_false_rejections_stay_within_the_level() -> None:
    """A/A samples: identical versions, and versions a few percent apart (two CPU
    engines of the same weights on different cores were measured 5% apart at the median,
    p = 0.01 with 350 requests each). The per-look rate of unhealthy verdicts stays within
    the level 1 - confidence whatever the number of samples: the tolerance is part of the
    null hypothesis, so a difference inside it is never significant."""
    thresholds = HealthThresholds()
    alpha = 1 - thresholds.confidence
    for n, apart in ((100, 1.0), (1000, 1.0), (1000, 1.05), (3000, 1.08)):
        rng = random.Random(n + int(apart * 100))
        runs = 200
        flagged = sum(judge(simulate(rng, "v2", n, median_ms=800 * apart, error_rate=0),
                            simulate(rng, "v1", n, error_rate=0),
                            thresholds).outcome == "unhealthy" for _ in range(runs))
        assert flagged <= alpha * runs, (n, apart, flagged)


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


# ---------------------------------------------------------------------- repeated looks


def test_identical_target_passes_a_multi_look_rollout_within_the_false_positive_rate() -> None:
    """200 seeded rollouts of an identical target, 5 conclusive looks each (300 requests
    per side per look, 2% errors): at most `1 - confidence` of rollouts roll back.

    Without the per-look correction the same looks roll back about 4 times as often: each
    look alone is a fair 5% test, the rollout is not. Measured (seed 5): 6/200 rollouts
    with `looks = 5`, 25/200 when every look tests at 0.05.
    """
    looks, runs = 5, 200
    corrected = HealthThresholds(looks=looks)
    naive = HealthThresholds(looks=1)
    rng = random.Random(5)
    flagged = flagged_naive = 0
    for _ in range(runs):
        outcomes = []
        for _ in range(looks):
            target = simulate(rng, "v2", 300, error_rate=0.02)
            stable = simulate(rng, "v1", 300, error_rate=0.02)
            outcomes.append((judge(target, stable, corrected).outcome,
                             judge(target, stable, naive).outcome))
        flagged += any(c == "unhealthy" for c, _ in outcomes)
        flagged_naive += any(n == "unhealthy" for _, n in outcomes)
    assert flagged <= (1 - corrected.confidence) * runs
    assert flagged_naive > flagged


def test_per_look_alpha_is_shared_by_the_looks() -> None:
    rng = random.Random(8)
    verdict = judge(simulate(rng, "v2", 300), simulate(rng, "v1", 300),
                    HealthThresholds(looks=10, confidence=0.95))
    assert verdict.analysis["alpha"] == pytest.approx(0.005)
    assert verdict.analysis["looks"] == 10
    for entry in verdict.analysis["metrics"].values():
        assert entry["alpha"] == pytest.approx(0.005)
    assert verdict.analysis["error_rate"]["alpha"] == pytest.approx(0.005)
    # A difference significant at 0.05 but not at 0.005 fails one look, not ten.
    target, stable = Sample("v2", 400, 22, [100.0] * 378), Sample("v1", 400, 9, [100.0] * 391)
    one = judge(target, stable, HealthThresholds(error_rate_max=0.2))
    ten = judge(target, stable, HealthThresholds(error_rate_max=0.2, looks=10))
    assert 0.005 < one.analysis["error_rate"]["p_value"] < 0.05
    assert one.outcome == "unhealthy" and ten.outcome == "healthy"


def test_quiet_target_is_inconclusive_even_when_it_looks_bad() -> None:
    """Too few requests never fails either: an inconclusive look spends no false-positive
    budget, which is what lets re-judged (extended) steps stay within it."""
    rng = random.Random(9)
    target = simulate(rng, "v2", 15, median_ms=3000, error_rate=0.0, ttft_median_ms=900)
    target.errors = 7
    verdict = judge(target, simulate(rng, "v1", 400, ttft_median_ms=300),
                    HealthThresholds(looks=10))
    assert verdict.outcome == "inconclusive" and not verdict.healthy
    assert verdict.reason == "only 15 requests to v2, need 20"
    assert verdict.analysis["error_rate"]["over_limit"] is True  # shown, not acted on
    quiet = judge(Sample("v2", 0), Sample("v1", 0), HealthThresholds())
    assert quiet.outcome == "inconclusive"
    assert quiet.analysis["metrics"]["latency_p95"]["note"] == \
        "skipped: no p95 latency samples on either side"


# ---------------------------------------------------------------------- guarded metrics


def test_ttft_regression_is_caught_and_named() -> None:
    """Same total latency, but the target's first token comes 40% later (slower prefill):
    only the time-to-first-token guard sees it."""
    rng = random.Random(11)
    caught = 0
    for run in range(50):
        target = simulate(rng, "v2", 300, ttft_median_ms=280)
        stable = simulate(rng, "v1", 300, ttft_median_ms=200)
        verdict = judge(target, stable, HealthThresholds(looks=10))
        caught += verdict.outcome == "unhealthy"
        if run == 0:
            assert verdict.outcome == "unhealthy", verdict.reason
            assert verdict.reason.startswith("p95 time to first token ")
            assert "vs stable" in verdict.reason and "> 10% tolerance" in verdict.reason
            ttft = verdict.analysis["metrics"]["ttft_p95"]
            assert ttft["worse"] and ttft["material"] and ttft["significant"]
            assert ttft["samples"] == {"target": ttft_count(target),
                                       "stable": ttft_count(stable)}
            assert ttft["ratio"] == pytest.approx(ttft["target"] / ttft["stable"])
            assert verdict.target.ttft_p95_ms == pytest.approx(ttft["target"])
            assert verdict.analysis["latency"]["failed"] is False
    assert caught >= 48


def test_metric_without_samples_is_skipped_with_a_note() -> None:
    """Plain (non-streamed) traffic records no time to first token: not a failure."""
    rng = random.Random(12)
    verdict = judge(simulate(rng, "v2", 300), simulate(rng, "v1", 300), HealthThresholds())
    assert verdict.outcome == "healthy", verdict.reason
    ttft = verdict.analysis["metrics"]["ttft_p95"]
    assert ttft["compared"] is False and ttft["failed"] is False
    assert ttft["note"] == "skipped: no p95 time to first token samples on either side"
    assert verdict.analysis["skipped"] == {"ttft_p95": ttft["note"]}
    # Streams only on the target side (an older stable gateway): skipped as well.
    streamed = simulate(rng, "v2", 300, ttft_median_ms=250)
    one_sided = judge(streamed, simulate(rng, "v1", 300), HealthThresholds())
    assert one_sided.outcome == "healthy"
    assert one_sided.analysis["metrics"]["ttft_p95"]["note"] == \
        "skipped: no p95 time to first token samples on stable"
    # A few streams among plain requests: too few to compare, named with the need.
    few = simulate(rng, "v1", 300)
    few.samples[Source.TTFT] = Histogram.of([200.0] * 5)
    some = judge(streamed, few, HealthThresholds())
    assert some.analysis["metrics"]["ttft_p95"]["note"] == (
        f"not compared: {ttft_count(streamed)} target and 5 stable samples, need 20 each")


def test_higher_is_better_metric_direction() -> None:
    """`success_rate` is better when higher (its natural direction); the direction also
    flips the test of any metric, here a median that is meant to rise."""
    assert GuardedMetric(metric="success_rate").direction == "higher_is_better"
    assert GuardedMetric(metric="ttft_p95").direction == "lower_is_better"
    guard = HealthThresholds(error_rate_max=0.5, guarded_metrics=[
        GuardedMetric(metric="success_rate", tolerance=0.02)])
    target, stable = Sample("v2", 400, 30, [100.0] * 370), Sample("v1", 400, 4, [100.0] * 396)
    verdict = judge(target, stable, guard)
    assert verdict.outcome == "unhealthy"
    assert verdict.reason.startswith("success rate 92.5% vs stable 99.0% (-6.5 points < -2.0 "
                                     "tolerance")
    entry = verdict.analysis["metrics"]["success_rate"]
    assert entry["direction"] == "higher_is_better" and entry["change"] == pytest.approx(0.065)
    assert entry["p_value"] < 1e-5
    assert judge(stable, target, guard).outcome == "healthy"  # more successes: fine

    rises = HealthThresholds(guarded_metrics=[
        GuardedMetric(metric="latency_p50", direction="higher_is_better")])
    rng = random.Random(13)
    low, high = simulate(rng, "v2", 300, median_ms=600), simulate(rng, "v1", 300)
    dropped = judge(low, high, rises)
    assert dropped.outcome == "unhealthy"
    assert dropped.reason.startswith("p50 latency ") and "< -10% tolerance" in dropped.reason
    assert judge(high, low, rises).outcome == "healthy"


def test_verdict_carries_its_numbers() -> None:
    rng = random.Random(14)
    target = simulate(rng, "v2", 300, error_rate=0.02, ttft_median_ms=200)
    stable = simulate(rng, "v1", 300, error_rate=0.02, ttft_median_ms=200)
    verdict = judge(target, stable, HealthThresholds(looks=4))
    metrics = verdict.analysis["metrics"]
    assert list(metrics) == ["error_rate", "latency_p95", "ttft_p95"]
    err = metrics["error_rate"]
    assert err["samples"] == {"target": 300, "stable": 300}
    assert err["target"] == pytest.approx(target.errors / 300)
    assert err["difference"] == pytest.approx((target.errors - stable.errors) / 300)
    low, high = err["interval"]
    assert low < err["difference"] < high
    assert err["tolerance"] == 0.02 and err["alpha"] == pytest.approx(0.0125)
    assert err["test"] == "fisher_exact" and 0 <= err["p_value"] <= 1
    for name in ("latency_p95", "ttft_p95"):
        entry = metrics[name]
        assert entry["test"] == "mann_whitney_u" and entry["compared"] is True
        assert entry["tolerance"] == 0.1 and entry["direction"] == "lower_is_better"
        t_low, t_high = entry["target_interval"]
        assert t_low <= entry["target"] <= t_high
        for flag in ("material", "significant", "worse", "failed"):
            assert entry[flag] is False
    assert verdict.outcome == "healthy"
    # The earlier per-kind entries keep their shape for the status and the UI.
    assert verdict.analysis["latency"]["metric"] == "latency_p95"
    assert verdict.analysis["latency"]["ratio"] == pytest.approx(metrics["latency_p95"]["ratio"])
    assert verdict.analysis["error_rate"]["p_value"] == err["p_value"]


def test_tolerances_per_metric_and_from_thresholds() -> None:
    rng = random.Random(15)
    slower = simulate(rng, "v2", 300, median_ms=960)
    base = simulate(rng, "v1", 300)
    assert judge(slower, base, HealthThresholds()).outcome == "unhealthy"
    # A 30% tolerance on p95 latency lets a 20% slowdown pass...
    loose = HealthThresholds(guarded_metrics=[GuardedMetric(metric="latency_p95",
                                                            tolerance=0.3)])
    assert judge(slower, base, loose).outcome == "healthy"
    # ...as does the thresholds' latency tolerance when the metric sets none.
    assert judge(slower, base, HealthThresholds(latency_tolerance=0.3)).outcome == "healthy"
    # Guarding nothing relative leaves the absolute limits only.
    assert judge(slower, base, HealthThresholds(guarded_metrics=[])).outcome == "healthy"


# ---------------------------------------------------------------------- configuration


def test_thresholds_validation_and_old_histories() -> None:
    # A HealthThresholds recorded before guarded metrics existed still loads, with them.
    old = HealthThresholds.model_validate({"error_rate_max": 0.05, "latency_p95_ms_max": 5000,
                                           "min_requests": 20, "confidence": 0.95})
    assert [m.metric for m in old.guarded_metrics] == ["error_rate", "latency_p95",
                                                       "ttft_p95"]
    assert old.looks == 1
    assert HealthThresholds.model_validate(old.model_dump(mode="json")) == old
    with pytest.raises(pydantic.ValidationError, match="guarded more than once: ttft_p95"):
        HealthThresholds(guarded_metrics=[GuardedMetric(metric="ttft_p95"),
                                          GuardedMetric(metric="ttft_p95")])
    bad: list[dict[str, Any]] = [
        {"guarded_metrics": [{"metric": "vibes"}]},
        {"guarded_metrics": [{"metric": "ttft_p95", "direction": "sideways"}]},
        {"guarded_metrics": [{"metric": "ttft_p95", "tolerance": -1}]},
        {"confidence": 1.5}, {"min_requests": 0}, {"surprise": 1},
    ]
    for body in bad:
        with pytest.raises(pydantic.ValidationError) as info:
            SwitchRequest.model_validate({"model_id": "m", "target_version": "v2",
                                          "analysis": body})
        field = next(iter(body))
        assert info.value.errors()[0]["loc"][:2] == ("analysis", field), body


def test_switch_thresholds_merge_the_request_over_the_settings() -> None:
    settings = ModelSwitchingConfig(min_requests=50, latency_tolerance=0.2)
    canary = SwitchRequest(model_id="m", target_version="v2", strategy="canary")
    thresholds = switch_thresholds(settings, canary)
    # Default canary: 5, 20, ..., 95% judged (7 steps) plus 3 inconclusive extensions.
    assert thresholds.looks == 7 + 3 == planned_looks(canary)
    assert (thresholds.min_requests, thresholds.latency_tolerance) == (50, 0.2)
    custom = SwitchRequest(model_id="m", target_version="v2", strategy="gradual",
                           strategy_config={"steps": 4}, analysis=SwitchAnalysis(
                               confidence=0.99, min_requests=100, guarded_metrics=[
                                   GuardedMetric(metric="ttft_p99", tolerance=0.25)]))
    merged = switch_thresholds(settings, custom)
    assert merged.looks == 3 + 3 and merged.confidence == 0.99
    assert merged.min_requests == 100 and merged.latency_tolerance == 0.2
    assert [(m.metric, m.tolerance) for m in merged.guarded_metrics] == [("ttft_p99", 0.25)]
    immediate = SwitchRequest(model_id="m", target_version="v2")
    ab = SwitchRequest(model_id="m", target_version="v2", strategy="ab_test")
    assert planned_looks(immediate) == 1 and planned_looks(ab) == 1


# ---------------------------------------------------------------------- windows


def test_gateway_windows_merge_exactly() -> None:
    """Two gateways' windows added up give the figures of all the outcomes."""
    rng = random.Random(16)
    gateways = [GatewayMetrics(), GatewayMetrics()]
    errors, latencies, ttfts = 0, [], []
    for i in range(240):
        metrics = gateways[i % 2]
        metrics.started("m", "v2")
        seconds = 0.5 * rng.lognormvariate(0.0, 0.4)
        if i % 17 == 0:  # a version fault: counted, no latency, no TTFT
            metrics.finished("m", "v2", seconds, failure="5xx")
            errors += 1
        elif i % 3 == 0:  # a plain answer: latency, no TTFT
            metrics.finished("m", "v2", seconds)
            latencies.append(seconds * 1000)
        else:  # a stream: latency and TTFT
            ttfb = seconds * 0.2
            metrics.first_byte("m", "v2", ttfb)
            metrics.finished("m", "v2", seconds, ttfb_s=ttfb)
            latencies.append(seconds * 1000)
            ttfts.append(ttfb * 1000)
        if i % 29 == 0:  # a client that left mid-answer says nothing about the version
            metrics.started("m", "v2")
            metrics.finished("m", "v2", 9.0, completed=False, ttfb_s=0.1)
    everything = Sample("v2", 240, errors, latencies, ttfts)
    merged = WindowSamples("v2")
    for metrics in gateways:
        window = metrics.stats_by_model(0.0, 4e9)["m"]["v2"].window
        assert window is not None and not window.cut
        merged.add_window(window)
    assert merged.figures() == everything.figures()
    assert (merged.requests, merged.errors) == (240, 15)
    assert merged.values(Source.TTFT) == everything.values(Source.TTFT) and \
        ttft_count(merged) == 150
    # Outside the window: nothing.
    empty = gateways[0].stats_by_model(0.0, 1.0)["m"]["v2"].window
    assert empty is not None and (empty.requests, empty.errors, empty.samples) == (0, 0, {})
    # Recording switched off accepts the same calls.
    UnrecordedMetrics().finished("m", "v2", 1.0, ttfb_s=0.2)


def test_a_tail_regression_is_caught_and_a_few_outliers_alone_are_not() -> None:
    """A tenth of the target's answers five times slower moves its p95 a lot and its
    median little: the test of the guarded quantile (`tail_test`) catches it where a rank
    test of the whole distribution would not. Two outliers in 300 do not."""
    rng = random.Random(31)

    def latencies(n: int, tail: float = 0.0) -> list[float]:
        return [800 * rng.lognormvariate(0, 0.4) * (5 if rng.random() < tail else 1)
                for _ in range(n)]

    stable = Sample("v1", 300, 0, latencies(300))
    slow_tail = Sample("v2", 300, 0, latencies(300, tail=0.1))
    verdict = judge(slow_tail, stable, HealthThresholds())
    assert verdict.outcome == "unhealthy", verdict.reason
    p95 = verdict.analysis["metrics"]["latency_p95"]
    assert p95["p_tail"] < p95["p_rank"] and p95["p_value"] == pytest.approx(
        min(1.0, 2 * p95["p_tail"]))
    outliers = Sample("v2", 300, 0, latencies(298) + [40_000.0, 50_000.0])
    assert judge(outliers, stable, HealthThresholds()).outcome == "healthy"


def test_tail_test_reads_the_quantile_with_its_margin() -> None:
    base = [float(v) for v in range(1, 201)]
    assert tail_test(base, base, 0.95) == pytest.approx(
        fisher_exact_greater(10, 200, 10, 200))
    assert tail_test([v * 2 for v in base], base, 0.95) < 1e-6
    assert tail_test([v * 1.05 for v in base], base, 0.95, margin=1.1) > 0.5
    assert tail_test([v / 2 for v in base], base, 0.5, upper=False) < 1e-6
    assert tail_test(base[:5], base, 0.95) is None


def test_tail_and_rank_tests_read_an_absolute_tolerance() -> None:
    base = [10 + v / 10 for v in range(200)]  # 10-30 ms
    slower = [v + 8 for v in base]  # 8 ms slower everywhere: 27-80% in relative terms
    assert tail_test(slower, base, 0.95, margin=1.1) < 0.05
    assert tail_test(slower, base, 0.95, margin=1.1, shift=20) > 0.5
    assert mann_whitney_u(slower, base, margin=1.1) < 0.05
    assert mann_whitney_u(slower, base, margin=1.1, shift=20) > 0.5
    # No shift, or a shift smaller than the relative margin, is the relative test.
    assert mann_whitney_u(slower, base, margin=1.1, shift=0.5) == pytest.approx(
        mann_whitney_u(slower, base, margin=1.1))
    assert tail_test([v / 2 for v in base], base, 0.5, upper=False, shift=0) < 1e-6


def test_a_few_milliseconds_at_the_tail_of_fast_answers_are_not_a_regression() -> None:
    """What an A/A canary on a busy CPU host looked like (stable p95 22 ms, target 30 ms,
    the medians alike): the relative tolerance alone rolled it back (p = 0.006); with the
    default absolute tolerance of the settings it is healthy, while a target slower by
    more than both tolerances still fails, named in milliseconds."""
    rng = random.Random(41)

    def fast(n: int, tail_ms: float) -> list[float]:
        return [14 * rng.lognormvariate(0, 0.15) + (tail_ms if rng.random() < 0.08 else 0)
                for _ in range(n)]

    stable, target = Sample("v1", 580, 0, fast(580, 8)), Sample("v2", 510, 0, fast(510, 16))
    relative_only = HealthThresholds()
    assert relative_only.latency_tolerance_ms == 0  # histories recorded before it
    verdict = judge(target, stable, relative_only)
    assert verdict.outcome == "unhealthy", verdict.reason
    settings = ModelSwitchingConfig()
    assert settings.latency_tolerance_ms == 20
    thresholds = switch_thresholds(settings, SwitchRequest(
        model_id="m", target_version="v2", strategy="canary"))
    assert thresholds.latency_tolerance_ms == 20
    verdict = judge(target, stable, thresholds)
    assert verdict.outcome == "healthy", verdict.reason
    p95 = verdict.analysis["metrics"]["latency_p95"]
    assert p95["tolerance_ms"] == 20 and 0 < p95["difference"] < 20 and not p95["material"]
    # 60 ms slower at the tail is worse by more than both tolerances.
    slow = Sample("v2", 510, 0, fast(510, 60))
    verdict = judge(slow, stable, thresholds)
    assert verdict.outcome == "unhealthy", verdict.reason
    assert "ms > 20 ms tolerance" in verdict.reason, verdict.reason
    # Error rate is not in milliseconds: its tolerance is untouched.
    assert verdict.analysis["metrics"]["error_rate"]["tolerance_ms"] is None
    # A request can ask for no absolute tolerance.
    strict = switch_thresholds(settings, SwitchRequest(
        model_id="m", target_version="v2", strategy="canary",
        analysis=SwitchAnalysis(latency_tolerance_ms=0)))
    assert judge(target, stable, strict).outcome == "unhealthy"
    with pytest.raises(pydantic.ValidationError, match="latency_tolerance_ms"):
        SwitchAnalysis(latency_tolerance_ms=-1)
