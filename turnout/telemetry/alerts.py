"""The alert lifecycle: what one look at some versions fires, refreshes and resolves.

One function for both places alerts are judged: the stack's monitor (its alerts are
stored, `Store.raise_alert` / `resolve_alert` carry a plan out in the database) and the
guide's in-process `HealthMonitor` (its alerts live in memory, `apply_plan` carries a plan
out there). The rules are the same in both:

- one alert per (model, version, type) while firing, at the worst severity of its
  breaches; a repeat refreshes it (count, last seen, severity, figures);
- a firing alert resolves when its version was judged on that type this look and crossed
  no level of it, or when the version is no longer looked at (rolled back, unloaded);
- a version that merely went quiet keeps its alert: no data is not a recovery.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from turnout.domain import Alert, AlertSeverity, AlertState
from turnout.telemetry.figures import Figures
from turnout.telemetry.health import (
    AlertType,
    Breach,
    MonitorThresholds,
    VersionHealth,
    judged_types,
)

# Alert types the monitor owns (a rollout alert is the switch workflow's to raise, an
# engine alert the replacement workflow's).
MONITOR_ALERT_TYPES = frozenset({AlertType.ERROR_RATE.value, AlertType.LATENCY.value,
                                 AlertType.RESOURCE.value, AlertType.CUSTOM.value})
TITLES = {AlertType.ERROR_RATE: "High error rate", AlertType.LATENCY: "High latency",
          AlertType.RESOURCE: "High resource usage", AlertType.CUSTOM: "Metric out of range"}
_RANK = {AlertSeverity.INFO: 0, AlertSeverity.WARNING: 1, AlertSeverity.CRITICAL: 2}

AlertKey = tuple[str | None, str]  # (version, type)


class Resolution(BaseModel):
    """A firing alert this look ends, with the sentence that says why."""

    version: str | None = None
    type: str
    message: str = ""
    figures: dict[str, object] = Field(default_factory=dict)


class AlertPlan(BaseModel):
    """What one look changes: alerts to fire or refresh, and alerts to resolve."""

    fire: list[Alert] = Field(default_factory=list)
    resolve: list[Resolution] = Field(default_factory=list)


def figures_summary(figures: Figures) -> str:
    parts = [f"{figures.requests} requests"]
    if figures.error_rate is not None:
        parts.append(f"errors {figures.error_rate:.1%}")
    if figures.latency_p95_ms is not None:
        parts.append(f"p95 {figures.latency_p95_ms:.0f} ms")
    return ", ".join(parts)


def _subject(model_id: str, version: str | None) -> str:
    return f"{model_id} {version}" if version else model_id


def plan_alerts(model_id: str, versions: list[VersionHealth], firing: list[Alert],
                thresholds: MonitorThresholds, *, window_s: float | None = None,
                ) -> AlertPlan:
    """Alerts to fire or refresh for the breaches of `versions`, and the `firing` ones
    (of this model) to resolve.

    A `VersionHealth` whose `version` is empty judges the model itself (the in-process
    `HealthMonitor` judges model keys such as `"model_v1.0"`): its alerts carry no
    version. `window_s` is how long a span the look judged, said in the message.
    """
    plan = AlertPlan()
    monitored = {h.version or None: h for h in versions}
    over = f" over the last {window_s:g}s" if window_s else ""
    for health in versions:
        version = health.version or None
        by_type: dict[str, list[Breach]] = {}
        for breach in health.breaches:
            by_type.setdefault(breach.type.value, []).append(breach)
        for alert_type, breaches in by_type.items():
            worst = max(breaches, key=lambda b: _RANK[b.severity])
            text = "; ".join(b.text for b in breaches)
            role = f"{health.role} version {version} of {model_id}: " if version else ""
            plan.fire.append(Alert(
                model_id=model_id, version=version, type=alert_type,
                severity=worst.severity,
                title=f"{TITLES[AlertType(alert_type)]} on {_subject(model_id, version)}: "
                      f"{worst.text}",
                message=f"{role}{text}{over} ({figures_summary(health.figures)}).",
                figures={"breaches": [b.model_dump(mode="json") for b in breaches],
                         **health.figures.model_dump(mode="json", exclude_none=True)}))
    firing_now = {(a.version, a.type) for a in plan.fire}
    for alert in firing:
        key = (alert.version, alert.type)
        if alert.type not in MONITOR_ALERT_TYPES or key in firing_now:
            continue
        looked = monitored.get(alert.version)
        if looked is None:
            plan.resolve.append(Resolution(
                version=alert.version, type=alert.type,
                message=f"{_subject(model_id, alert.version)} is no longer monitored"))
        elif alert.type in judged_types(looked.figures, thresholds):
            plan.resolve.append(Resolution(
                version=alert.version, type=alert.type,
                message=f"{_subject(model_id, alert.version)} is back within its "
                        f"{alert.type} levels ({figures_summary(looked.figures)})",
                figures=looked.figures.model_dump(mode="json", exclude_none=True)))
    return plan


def apply_plan(firing: dict[AlertKey, Alert], plan: AlertPlan, at: datetime) -> list[Alert]:
    """Carry `plan` out on alerts held in memory (`firing`, by (version, type)), as the
    store does on stored ones; returns the alerts that changed: fired, refreshed or
    resolved (copies)."""
    changed: list[Alert] = []
    for alert in plan.fire:
        key = (alert.version, alert.type)
        held = firing.get(key)
        if held is None:
            held = firing[key] = alert.model_copy(update={"first_seen": at, "last_seen": at})
        else:
            held.count += 1
            held.severity, held.title, held.message = alert.severity, alert.title, \
                alert.message
            held.figures, held.last_seen = alert.figures, at
        changed.append(held.model_copy())
    for resolution in plan.resolve:
        held = firing.pop((resolution.version, resolution.type), None)
        if held is None:
            continue
        held.state, held.last_seen = AlertState.RESOLVED, at
        held.title = f"Resolved: {held.title}"
        held.message = resolution.message
        if resolution.figures:
            held.figures = dict(resolution.figures)
        changed.append(held.model_copy())
    return changed
