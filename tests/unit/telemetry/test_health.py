"""The monitor's pure rules: levels, states and thresholds merging."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.unit.telemetry.looks import T, busy, health
from turnout.config import ModelSwitchingConfig
from turnout.domain import AlertSeverity
from turnout.telemetry.figures import Figures
from turnout.telemetry.health import (
    MetricLimit,
    MonitorThresholds,
    VersionState,
    applied_thresholds,
    evaluate,
    summarize,
)


def test_states_follow_the_worst_level_crossed() -> None:
    assert evaluate(busy(error_rate=0.01, latency_p95_ms=800), T).state is \
        VersionState.HEALTHY
    degraded = evaluate(busy(error_rate=0.10, latency_p95_ms=800), T)
    assert degraded.state is VersionState.DEGRADED
    assert [(b.metric, b.severity) for b in degraded.breaches] == \
        [("error_rate", AlertSeverity.WARNING)]
    unhealthy = evaluate(busy(error_rate=0.10, latency_p95_ms=20_000), T)
    assert unhealthy.state is VersionState.UNHEALTHY
    assert {b.metric: b.severity for b in unhealthy.breaches} == {
        "error_rate": AlertSeverity.WARNING, "latency_p95_ms": AlertSeverity.CRITICAL}


def test_a_quiet_version_is_not_judged_on_rates_but_on_resources() -> None:
    quiet = Figures(requests=3, errors=2, error_rate=0.67, latency_p95_ms=99_000)
    assert evaluate(quiet, T).state is VersionState.NO_DATA
    hot = quiet.model_copy(update={"memory_percent": 97.0})
    result = evaluate(hot, T)
    assert result.state is VersionState.UNHEALTHY
    assert [b.metric for b in result.breaches] == ["memory_percent"]


def test_custom_metrics_have_directions() -> None:
    limits = T.updated({"custom": {"gpu_temp_c": {"warning": 80, "critical": 90},
                                   "cache_hit": {"warning": 0.5, "direction": "below"}}})
    result = evaluate(busy(custom={"gpu_temp_c": 85, "cache_hit": 0.2}), limits)
    assert {(b.metric, b.severity) for b in result.breaches} == {
        ("gpu_temp_c", AlertSeverity.WARNING), ("cache_hit", AlertSeverity.WARNING)}
    assert evaluate(busy(custom={"gpu_temp_c": 95, "cache_hit": 0.9}), limits).state is \
        VersionState.UNHEALTHY


def test_thresholds_take_settings_then_every_model_then_one_model() -> None:
    settings = ModelSwitchingConfig(error_rate_warning=0.04, latency_warning_ms=4000)
    applied = applied_thresholds(settings, {"error_rate_warning": 0.03,
                                            "latency_p95_warning": 3000},
                                 {"latency_p95_warning": 1000})
    assert (applied.error_rate_warning, applied.latency_p95_warning) == (0.03, 1000)
    assert applied.error_rate_critical == settings.error_rate_critical


def test_a_stored_override_that_no_longer_fits_is_skipped() -> None:
    settings = ModelSwitchingConfig(error_rate_critical=0.1)
    applied = applied_thresholds(settings, {"error_rate_warning": 0.2})
    assert applied.error_rate_warning == settings.error_rate_warning


def test_updates_are_validated_as_a_whole() -> None:
    with pytest.raises(ValidationError, match="error_rate_warning"):
        T.updated({"error_rate_warning": 0.5})
    with pytest.raises(ValidationError, match="latency_p95_warnin"):
        T.updated({"latency_p95_warnin": 10})
    with pytest.raises(ValidationError):
        MetricLimit.model_validate({"warning": 1, "direction": "sideways"})
    conflicts = MonitorThresholds.model_construct(
        **{**T.model_dump(), "cpu_warning_percent": 99}).level_conflicts()
    assert [field for field, _ in conflicts] == ["cpu_warning_percent"]


def test_summary_names_states_and_breaches() -> None:
    line = summarize("m", [health("v1", busy(error_rate=0.0, latency_p95_ms=120)),
                           health("v2", busy(error_rate=0.3, latency_p95_ms=90))])
    assert line.startswith("m: v1 (live) healthy: 100 req, 0.0% errors, p95 120 ms")
    assert "v2 (live) unhealthy" in line and "error_rate 30.0%" in line
    assert summarize("m", []) == "m: no version to monitor"


def test_a_busy_cpu_alone_is_not_trouble_by_default() -> None:
    """A CPU engine at 100% while it serves fast raises nothing; a full KV cache with
    requests waiting does; `cpu_alerts` brings CPU levels back, alone or with latency."""
    busy_and_fast = busy(error_rate=0.0, latency_p95_ms=15, cpu_percent=100.0,
                         memory_percent=40.0, kv_cache_usage=0.99, queued=0)
    assert evaluate(busy_and_fast, T).state is VersionState.HEALTHY
    full = busy_and_fast.model_copy(update={"queued": 3.0})
    [breach] = evaluate(full, T).breaches
    assert (breach.metric, breach.severity) == ("kv_cache_usage", AlertSeverity.CRITICAL)
    assert evaluate(full.model_copy(update={"kv_cache_usage": 0.5}), T).breaches == []
    on = T.updated({"cpu_alerts": "on"})
    assert [b.metric for b in evaluate(busy_and_fast, on).breaches] == ["cpu_percent"]
    with_latency = T.updated({"cpu_alerts": "with_latency"})
    assert evaluate(busy_and_fast, with_latency).breaches == []
    slow = busy_and_fast.model_copy(update={"latency_p95_ms": 6000.0})
    assert {b.metric for b in evaluate(slow, with_latency).breaches} == {
        "latency_p95_ms", "cpu_percent"}
    settings = ModelSwitchingConfig(cpu_alerts="with_latency")
    assert MonitorThresholds.from_settings(settings).cpu_alerts == "with_latency"
    with pytest.raises(ValidationError):
        T.updated({"kv_cache_warning": 0.99, "kv_cache_critical": 0.9})
