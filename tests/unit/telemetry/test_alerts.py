"""The alert lifecycle, shared by the stack's monitor and the in-process HealthMonitor."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.unit.telemetry.looks import T, busy, health
from turnout.domain import Alert, AlertSeverity, AlertState
from turnout.telemetry.alerts import apply_plan, plan_alerts
from turnout.telemetry.figures import Figures


def firing(version: str, alert_type: str, severity: AlertSeverity) -> Alert:
    return Alert(model_id="m", version=version, type=alert_type, severity=severity,
                 title="t")


def test_one_alert_per_version_and_type_with_the_worst_severity() -> None:
    sick = health("v2", busy(error_rate=0.5, memory_percent=90, cpu_percent=99),
                  T.updated({"cpu_alerts": "on"}))
    plan = plan_alerts("m", [sick], [], T)
    by_type = {a.type: a for a in plan.fire}
    assert set(by_type) == {"error_rate", "resource"}
    assert by_type["resource"].severity is AlertSeverity.CRITICAL
    assert "memory_percent" in by_type["resource"].message
    assert "cpu_percent" in by_type["resource"].message
    assert by_type["error_rate"].figures["error_rate"] == 0.5
    assert plan.resolve == []


def test_recovery_resolves_but_silence_does_not() -> None:
    alerts = [firing("v1", "error_rate", AlertSeverity.CRITICAL),
              firing("v2", "latency", AlertSeverity.WARNING),
              firing("v3", "error_rate", AlertSeverity.WARNING),
              firing("v1", "rollout", AlertSeverity.CRITICAL)]
    recovered = health("v1", busy(error_rate=0.0, latency_p95_ms=100))
    quiet = health("v2", Figures(requests=2))
    # v3 is no longer monitored (rolled back and unloaded); rollout alerts are not ours.
    plan = plan_alerts("m", [recovered, quiet], alerts, T)
    assert plan.fire == []
    assert sorted((r.version, r.type) for r in plan.resolve) == [("v1", "error_rate"),
                                                                 ("v3", "error_rate")]
    assert "back within its error_rate levels" in plan.resolve[0].message


def test_in_memory_alerts_follow_the_plan_as_stored_ones_do() -> None:
    """`apply_plan` is the lifecycle on alerts held in memory: fire once, refresh with a
    count, escalate, resolve once."""
    firing: dict[tuple[str | None, str], Alert] = {}
    at = datetime(2026, 1, 1, tzinfo=UTC)
    sick = health("v2", busy(error_rate=0.10))
    [fired] = apply_plan(firing, plan_alerts("m", [sick], [], T), at)
    assert (fired.count, fired.severity, fired.state) == (1, AlertSeverity.WARNING,
                                                          AlertState.FIRING)
    worse = health("v2", busy(error_rate=0.40))
    later = at + timedelta(seconds=30)
    [escalated] = apply_plan(firing, plan_alerts("m", [worse], list(firing.values()), T),
                             later)
    assert (escalated.count, escalated.severity) == (2, AlertSeverity.CRITICAL)
    assert escalated.first_seen == at and escalated.last_seen == later
    quiet = health("v2", Figures(requests=2))
    assert apply_plan(firing, plan_alerts("m", [quiet], list(firing.values()), T), later) == []
    well = health("v2", busy(error_rate=0.0, latency_p95_ms=50))
    [resolved] = apply_plan(firing, plan_alerts("m", [well], list(firing.values()), T), later)
    assert resolved.state is AlertState.RESOLVED and resolved.title.startswith("Resolved")
    assert firing == {}
