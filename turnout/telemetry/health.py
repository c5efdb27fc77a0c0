"""Continuous health of model versions: thresholds, states and the levels crossed.

Pure code shared by the stack's monitor (a workflow that looks at every live and candidate
version each interval), `GET /health/models`, and the guide's in-process `HealthMonitor`.
A rollout step's verdict (`turnout.telemetry.verdicts`) compares a target with the stable
version; this module instead judges one version on its own against warning and critical
levels, the way an on-call engineer reads a dashboard.

States: `no_data` (too few requests in the interval and no resource figures to judge: says
nothing), `healthy`, `degraded` (a warning level crossed), `unhealthy` (a critical one).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from turnout.config import ModelSwitchingConfig
from turnout.domain import AlertSeverity
from turnout.telemetry.figures import Figures


class VersionState(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    NO_DATA = "no_data"
    # The monitor's looks fail (the reason is in `ModelHealth.last_failure`), or its last
    # look is too old to stand for now: nothing is known.
    UNKNOWN = "unknown"


class AlertType(StrEnum):
    ERROR_RATE = "error_rate"
    LATENCY = "latency"
    RESOURCE = "resource"
    ROLLOUT = "rollout"
    CUSTOM = "custom"
    ENGINE = "engine"  # an engine process died (raised and resolved by its replacement)


class MetricLimit(BaseModel):
    """Warning and critical levels of a custom metric; `above` means high values are bad."""

    model_config = ConfigDict(extra="forbid")

    warning: float | None = None
    critical: float | None = None
    direction: Literal["above", "below"] = "above"


LEVEL_PAIRS = (("error_rate_warning", "error_rate_critical"),
               ("latency_p95_warning", "latency_p95_critical"),
               ("memory_warning_percent", "memory_critical_percent"),
               ("cpu_warning_percent", "cpu_critical_percent"),
               ("kv_cache_warning", "kv_cache_critical"))
# How busy CPUs are judged: a CPU engine busy with its work is not unhealthy, so by default
# CPU levels raise nothing (`off`); `with_latency` judges them only while the version's p95
# latency is over its warning level too; `on` judges them alone.
CpuAlerts = Literal["off", "with_latency", "on"]


class MonitorThresholds(BaseModel):
    """Levels one version is judged against; the guide's `update_thresholds` keys.

    Every field is optional in an update (`PUT /health/thresholds`); unknown keys are
    refused so that a typo never silently leaves a limit unset.
    """

    model_config = ConfigDict(extra="forbid")

    error_rate_warning: float = Field(0.05, ge=0, le=1)
    error_rate_critical: float = Field(0.25, ge=0, le=1)
    latency_p95_warning: float = Field(5000, gt=0, description="milliseconds")
    latency_p95_critical: float = Field(15000, gt=0, description="milliseconds")
    memory_warning_percent: float = Field(85, gt=0, le=100,
                                          description="engine memory, % of host memory")
    memory_critical_percent: float = Field(95, gt=0, le=100)
    cpu_warning_percent: float = Field(90, gt=0, le=100,
                                       description="engine CPU, % of all host cores")
    cpu_critical_percent: float = Field(98, gt=0, le=100)
    cpu_alerts: CpuAlerts = Field("off", description="off, with_latency or on")
    # A KV cache this full (fraction) while requests wait in the engine's queue: the
    # engine is out of room for the work it is given.
    kv_cache_warning: float = Field(0.90, gt=0, le=1,
                                    description="KV cache use with requests queued, 0..1")
    kv_cache_critical: float = Field(0.98, gt=0, le=1)
    # Fewer requests than this in an interval: error rate and latency are not judged.
    min_requests: int = Field(10, ge=1)
    custom: dict[str, MetricLimit] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _warning_below_critical(self) -> MonitorThresholds:
        problems = self.level_conflicts()
        if problems:
            raise ValueError("; ".join(message for _, message in problems))
        return self

    def level_conflicts(self) -> list[tuple[str, str]]:
        """(warning field, message) for each warning level set above its critical level."""
        problems = []
        for warning, critical in LEVEL_PAIRS:
            low, high = getattr(self, warning), getattr(self, critical)
            if low > high:
                problems.append((warning, f"{warning} ({low:g}) is above {critical} "
                                          f"({high:g})"))
        return problems

    @classmethod
    def from_settings(cls, settings: ModelSwitchingConfig) -> MonitorThresholds:
        return cls(error_rate_warning=settings.error_rate_warning,
                   error_rate_critical=max(settings.error_rate_critical,
                                           settings.error_rate_warning),
                   latency_p95_warning=settings.latency_warning_ms,
                   latency_p95_critical=max(settings.latency_critical_ms,
                                            settings.latency_warning_ms),
                   memory_warning_percent=settings.memory_warning_percent,
                   memory_critical_percent=max(settings.memory_critical_percent,
                                               settings.memory_warning_percent),
                   cpu_warning_percent=settings.cpu_warning_percent,
                   cpu_critical_percent=max(settings.cpu_critical_percent,
                                            settings.cpu_warning_percent),
                   cpu_alerts=settings.cpu_alerts)

    def updated(self, changes: dict[str, Any]) -> MonitorThresholds:
        """A copy with `changes` applied and validated as a whole (raises ValidationError)."""
        return MonitorThresholds.model_validate({**self.model_dump(), **changes})


def applied_thresholds(settings: ModelSwitchingConfig,
                       *overrides: dict[str, Any]) -> MonitorThresholds:
    """Settings' levels, then each override in turn (every model's, then one model's).

    A stored override that no longer validates together with newer defaults (a warning
    now above a lowered critical level) is skipped rather than breaking monitoring.
    """
    thresholds = MonitorThresholds.from_settings(settings)
    for changes in overrides:
        if changes:
            try:
                thresholds = thresholds.updated(changes)
            except ValueError:
                continue
    return thresholds


class EngineResources(BaseModel):
    """What the host and vLLM's own metrics say about one engine of a version."""

    host: str = ""
    url: str = ""
    memory_mb: float | None = None
    memory_percent: float | None = None
    cpu_percent: float | None = None
    # From vLLM's /metrics where present (GPU engines report cache and queue figures).
    running_requests: float | None = None
    queued_requests: float | None = None
    kv_cache_usage: float | None = Field(None, description="fraction 0..1")


class Breach(BaseModel):
    """One level crossed: the alert it raises is keyed by (model, version, type, metric)."""

    type: AlertType
    metric: str
    severity: AlertSeverity
    value: float
    limit: float

    @property
    def text(self) -> str:
        return f"{self.metric} {_fmt(self.metric, self.value)} over the " \
               f"{self.severity.value} level {_fmt(self.metric, self.limit)}"


class VersionHealth(BaseModel):
    version: str
    # `registered`: neither live, nor served, nor loaded: nothing to measure.
    role: Literal["live", "candidate", "shadow", "cached", "registered"] = "live"
    state: VersionState = VersionState.NO_DATA
    # Why the state is `no_data` or `unknown` (None when the look judged it).
    reason: str | None = None
    figures: Figures = Field(default_factory=Figures)
    breaches: list[Breach] = Field(default_factory=list)
    engines: list[EngineResources] = Field(default_factory=list)


class ModelHealth(BaseModel):
    """What `GET /health/models` returns per model."""

    model_id: str
    live_version: str | None = None
    checked_at: datetime | None = None
    interval_s: float | None = None
    # When the monitor looks next (at the latest: a new monitor spreads its looks).
    next_look_at: datetime | None = None
    versions: list[VersionHealth] = Field(default_factory=list)
    thresholds: MonitorThresholds = Field(default_factory=MonitorThresholds)
    # Looks of the model's monitor that failed (counted since it started), and the last.
    failed_looks: int = 0
    last_failure: str | None = None
    last_failure_at: datetime | None = None

    def stale(self, now: datetime, interval_s: float) -> ModelHealth:
        """This look as it stands at `now`: versions `unknown`, with the reason, when the
        last look failed after it or when it is older than two intervals (the monitor is
        not looking); as it is otherwise."""
        failed = self.last_failure_at is not None and (
            self.checked_at is None or self.last_failure_at > self.checked_at)
        old = self.checked_at is not None and \
            (now - self.checked_at).total_seconds() > 2 * interval_s + LOOK_SLACK_S
        if not (failed or old):
            return self
        since = f"since {self.checked_at:%H:%M:%S} UTC" if self.checked_at else "yet"
        reason = f"no look {since}" + (f": the last failed ({self.last_failure})"
                                       if failed else ": the monitor is not looking")
        versions = [v.model_copy(update={"state": VersionState.UNKNOWN, "reason": reason})
                    for v in self.versions]
        return self.model_copy(update={"versions": versions})


# How late a look may be (a busy worker, a slow store) before its model counts as unwatched.
LOOK_SLACK_S = 15.0


def _fmt(metric: str, value: float) -> str:
    if metric == "error_rate":
        return f"{value:.1%}"
    if metric.endswith("_percent"):
        return f"{value:.0f}%"
    if "latency" in metric or metric.endswith("_ms"):
        return f"{value:.0f} ms"
    return f"{value:g}"


def _level(value: float | None, warning: float | None, critical: float | None,
           above: bool = True) -> tuple[AlertSeverity, float] | None:
    if value is None:
        return None
    for severity, limit in ((AlertSeverity.CRITICAL, critical),
                            (AlertSeverity.WARNING, warning)):
        if limit is not None and (value > limit if above else value < limit):
            return severity, limit
    return None


def _cpu_judged(figures: Figures, thresholds: MonitorThresholds) -> bool:
    """Whether this look judges the engines' CPU (`MonitorThresholds.cpu_alerts`)."""
    if thresholds.cpu_alerts == "with_latency":
        return (figures.requests >= thresholds.min_requests
                and figures.latency_p95_ms is not None
                and figures.latency_p95_ms > thresholds.latency_p95_warning)
    return thresholds.cpu_alerts == "on"


def evaluate(figures: Figures, thresholds: MonitorThresholds) -> VersionHealth:
    """State and breaches of one version (the `version` field is left for the caller).

    Rates and latencies are judged only on `min_requests` or more requests: two failures
    out of three requests are an anecdote, not a 66% error rate. Resource figures are
    judged whenever present, on what hurts: memory near the limit, a full KV cache with
    requests queued, and busy CPUs only as `cpu_alerts` says (not by default: a CPU engine
    busy with its work is not unhealthy).
    """
    checks: list[tuple[AlertType, str, float | None, float | None, float | None, bool]] = []
    enough = figures.requests >= thresholds.min_requests
    if enough:
        checks += [
            (AlertType.ERROR_RATE, "error_rate", figures.error_rate,
             thresholds.error_rate_warning, thresholds.error_rate_critical, True),
            (AlertType.LATENCY, "latency_p95_ms", figures.latency_p95_ms,
             thresholds.latency_p95_warning, thresholds.latency_p95_critical, True),
        ]
    checks.append((AlertType.RESOURCE, "memory_percent", figures.memory_percent,
                   thresholds.memory_warning_percent, thresholds.memory_critical_percent,
                   True))
    if _cpu_judged(figures, thresholds):
        checks.append((AlertType.RESOURCE, "cpu_percent", figures.cpu_percent,
                       thresholds.cpu_warning_percent, thresholds.cpu_critical_percent,
                       True))
    if (figures.queued or 0) > 0:  # a full cache hurts only when work waits for it
        checks.append((AlertType.RESOURCE, "kv_cache_usage", figures.kv_cache_usage,
                       thresholds.kv_cache_warning, thresholds.kv_cache_critical, True))
    for name, limit in thresholds.custom.items():
        checks.append((AlertType.CUSTOM, name, figures.custom.get(name), limit.warning,
                       limit.critical, limit.direction == "above"))
    breaches = []
    judged = False
    for alert_type, metric, value, warning, critical, above in checks:
        if value is None:
            continue
        judged = True
        level = _level(value, warning, critical, above)
        if level is not None:
            breaches.append(Breach(type=alert_type, metric=metric, severity=level[0],
                                   value=value, limit=level[1]))
    if any(b.severity is AlertSeverity.CRITICAL for b in breaches):
        state = VersionState.UNHEALTHY
    elif breaches:
        state = VersionState.DEGRADED
    elif judged:
        state = VersionState.HEALTHY
    else:
        state = VersionState.NO_DATA
    return VersionHealth(version="", state=state, figures=figures, breaches=breaches)


def judged_types(figures: Figures, thresholds: MonitorThresholds) -> set[str]:
    """The alert types these figures say something about: only those may resolve an alert
    (too few requests says nothing about the error rate, so it does not end one)."""
    judged = set()
    if figures.requests >= thresholds.min_requests:
        if figures.error_rate is not None:
            judged.add(AlertType.ERROR_RATE.value)
        if figures.latency_p95_ms is not None:
            judged.add(AlertType.LATENCY.value)
    if figures.memory_percent is not None or \
            (figures.cpu_percent is not None and _cpu_judged(figures, thresholds)):
        judged.add(AlertType.RESOURCE.value)
    if any(name in figures.custom for name in thresholds.custom):
        judged.add(AlertType.CUSTOM.value)
    return judged


def summarize(model_id: str, versions: list[VersionHealth]) -> str:
    """One line for the Web UI's current details and the logs."""
    if not versions:
        return f"{model_id}: no version to monitor"
    parts = []
    for h in versions:
        f = h.figures
        figures = [f"{f.requests} req"]
        if f.error_rate is not None:
            figures.append(f"{f.error_rate:.1%} errors")
        if f.latency_p95_ms is not None:
            figures.append(f"p95 {f.latency_p95_ms:.0f} ms")
        line = f"{h.version} ({h.role}) {h.state.value}: {', '.join(figures)}"
        if h.breaches:
            line += " — " + "; ".join(b.text for b in h.breaches)
        parts.append(line)
    return f"{model_id}: " + " | ".join(parts)
