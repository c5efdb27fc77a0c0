"""The metric catalogue: every metric has a source the gateway measures, a figure, a test,
and a line in the README; every one can guard a rollout."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from gateway.metrics import GatewayMetrics
from turnout.domain import SwitchAnalysis
from turnout.telemetry.catalogue import (
    CATALOGUE,
    DEFAULT_GUARDED,
    SAMPLE_SOURCES,
    Kind,
    Source,
    metric,
)
from turnout.telemetry.figures import Figures, WindowSamples
from turnout.telemetry.verdicts import GuardedMetric, HealthThresholds, judge

README = Path(__file__).resolve().parents[3] / "README.md"


def test_every_metric_has_a_source_a_figure_and_a_test() -> None:
    for entry in CATALOGUE.values():
        assert entry.source is Source.REQUESTS or entry.source in SAMPLE_SOURCES, entry
        assert entry.figure in Figures.model_fields, entry
        assert entry.test == ("fisher_exact" if entry.kind is Kind.RATE else
                              "mann_whitney_u")
        assert (entry.quantile is None) == (entry.kind is Kind.RATE), entry
        assert entry.label and entry.unit
    assert set(DEFAULT_GUARDED) <= set(CATALOGUE)
    with pytest.raises(ValueError, match="unknown metric 'tpot_p95'; known: error_rate"):
        metric("tpot_p95")


def streamed_and_plain(metrics: GatewayMetrics, version: str, rng: random.Random,
                       slower: float = 1.0) -> None:
    """One streamed and one plain answer, through the gateway's recording calls."""
    for stream in (True, False):
        metrics.started("m", version)
        seconds = 0.2 * slower * rng.lognormvariate(0, 0.2)
        if stream:
            ttfb = seconds * 0.2
            metrics.first_byte("m", version, ttfb)
            itl = metrics.generated("m", version, 16, (seconds - ttfb))
            metrics.finished("m", version, seconds, ttfb_s=ttfb, itl_s=itl)
        else:
            metrics.generated("m", version, 16)
            metrics.finished("m", version, seconds)


def windows(metrics: GatewayMetrics) -> dict[str, WindowSamples]:
    result = {}
    for version, stats in metrics.stats_by_model(0, 4e9)["m"].items():
        sample = result[version] = WindowSamples(version)
        assert stats.window is not None
        sample.add_window(stats.window)
    return result


def test_every_metric_is_measured_by_the_gateway() -> None:
    """Requests recorded as the proxy records them give every catalogue figure."""
    metrics = GatewayMetrics()
    rng = random.Random(1)
    for _ in range(30):
        streamed_and_plain(metrics, "v1", rng)
    figures = windows(metrics)["v1"].figures()
    for entry in CATALOGUE.values():
        assert figures.value(entry) is not None, entry.name
    assert figures.output_tokens_per_s == pytest.approx(1000 / figures.itl_p50_ms, rel=0.05)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_metric_can_guard_a_rollout(name: str) -> None:
    """Guarded alone, each metric compares the two versions' windows and names itself."""
    metrics = GatewayMetrics()
    rng = random.Random(2)
    for _ in range(60):
        streamed_and_plain(metrics, "v1", rng)
        streamed_and_plain(metrics, "v2", rng, slower=2.0)
    sides = windows(metrics)
    thresholds = HealthThresholds(guarded_metrics=[GuardedMetric(metric=name)],
                                  latency_p95_ms_max=1e9)
    verdict = judge(sides["v2"], sides["v1"], thresholds)
    entry = verdict.analysis["metrics"][name]
    assert entry["compared"] and entry["label"] == CATALOGUE[name].label
    if CATALOGUE[name].kind is Kind.RATE:
        assert verdict.outcome == "healthy"  # no errors on either side
    else:  # twice as slow, half the output rate: worse on every time and rate metric
        assert verdict.outcome == "unhealthy", (name, verdict.reason)
        assert verdict.reason.startswith(CATALOGUE[name].label)


def test_guarded_metrics_are_checked_against_the_catalogue() -> None:
    assert GuardedMetric(metric="output_tokens_per_s").direction == "higher_is_better"
    assert GuardedMetric(metric="itl_p95").direction == "lower_is_better"
    with pytest.raises(ValidationError, match="unknown metric 'latency_p90'"):
        SwitchAnalysis.model_validate({"guarded_metrics": [{"metric": "latency_p90"}]})
    schema = GuardedMetric.model_json_schema()["properties"]["metric"]
    assert schema["enum"] == list(CATALOGUE)


def test_the_readme_lists_every_metric() -> None:
    text = README.read_text()
    for entry in CATALOGUE.values():
        assert f"| `{entry.name}` | {entry.label} |" in text, entry.name


def test_prometheus_names_follow_vllm_and_keep_the_old_ones_for_a_release() -> None:
    metrics = GatewayMetrics()
    streamed_and_plain(metrics, "v1", random.Random(3))
    text = generate_latest(metrics.registry).decode()
    for info in SAMPLE_SOURCES.values():
        for name in (info.prometheus, *info.aliases):
            assert f'{name}_count{{model_id="m",version="v1"}}' in text, name
    assert "turnout_gateway_time_to_first_token_seconds_bucket" in text
    assert "turnout_gateway_time_to_first_byte_seconds_bucket" in text
