"""The verdict-accuracy benchmark's arithmetic: the Wilson interval and the tallies it prints
(the benchmark itself runs real engines; no test runs it)."""

from __future__ import annotations

import pytest

from bench.verdict_accuracy import Canary, rate_line, summary, wilson_interval


@pytest.mark.parametrize(("hits", "trials", "low", "high"), [
    (0, 20, 0.0, 0.1611),  # upper bound z^2 / (n + z^2): not the Wald interval's 0
    (20, 20, 0.8389, 1.0),
    (1, 20, 0.0089, 0.2361),
    (10, 20, 0.2993, 0.7007),
    (19, 20, 0.7639, 0.9911),
])
def test_the_wilson_interval_matches_its_textbook_values(hits: int, trials: int, low: float,
                                                         high: float) -> None:
    assert wilson_interval(hits, trials) == pytest.approx((low, high), abs=1e-4)


def test_the_interval_narrows_with_more_trials_and_holds_its_estimate() -> None:
    few, many = wilson_interval(1, 20), wilson_interval(10, 200)
    assert few[0] < many[0] < 0.05 < many[1] < few[1]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_rate_line_names_the_count_the_share_and_the_interval() -> None:
    assert rate_line("A/A false rollbacks", 1, 20, "<= 5%") == (
        "A/A false rollbacks: 1/20 = 5.0% (95% Wilson interval 0.9%-23.6%); goal <= 5%")


def _verdict(outcome: str, failed: str | None = None, ratio: float | None = None) -> dict:
    return {"outcome": outcome, "reason": "", "analysis": {"metrics": {
        "error_rate": {"failed": failed == "error_rate", "compared": True},
        "latency_p95": {"failed": failed == "latency_p95", "ratio": ratio,
                        "compared": ratio is not None}}}}


def test_the_summary_tallies_each_arm_and_leaves_failed_runs_out_of_the_rates() -> None:
    canaries = [
        Canary("aa", "aa1", "promoted", 90.0, verdicts=[_verdict("healthy", ratio=0.9)]),
        Canary("aa", "aa2", "rolled_back", 80.0,
               verdicts=[_verdict("unhealthy", "latency_p95", ratio=1.6)]),
        Canary("aa", "aa3", "stuck", 200.0, verdicts=[_verdict("inconclusive")]),
        Canary("aa", "aa4", "error", 10.0),
        Canary("degraded", "dg1", "rolled_back", 20.0,
               verdicts=[_verdict("unhealthy", "latency_p95")]),
        Canary("degraded", "dg2", "promoted", 30.0, verdicts=[_verdict("healthy")]),
    ]
    lines = summary(canaries)
    assert lines[0] == "aa: promoted 1, rolled_back 1, stuck 1, error 1"
    # A stuck canary was not promoted: it counts among the trials, not as a rollback; a
    # canary that never reached a verdict (its engine failed to load) is no trial.
    assert lines[1].startswith("  A/A false rollbacks: 1/3 = 33.3% ")
    assert lines[2] == "  metrics that failed a look: latency_p95"
    # Only compared looks give a ratio (the inconclusive one compared nothing).
    assert lines[3] == ("  latency_p95 target/stable over 2 compared looks: median 1.250, "
                        "min 0.900, max 1.600")
    assert lines[4] == "  wall time per canary: median 85.0 s, min 10.0 s, max 200.0 s"
    assert lines[5] == "degraded: promoted 1, rolled_back 1, stuck 0, error 0"
    assert lines[6].startswith("  degraded target detected (rolled back): 1/2 = 50.0% ")
    assert summary([c for c in canaries if c.arm == "aa"])[-1].startswith("  wall time")
