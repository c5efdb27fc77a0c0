"""A rollout step's verdict: the target against thresholds and against the stable version.

Pure functions, no I/O, so the rules that can roll a release back are unit-tested on
simulated traffic. A verdict rests on four ideas:

- Too little data is `inconclusive`, never `healthy`: a quiet canary has proved nothing.
- Absolute limits (error rate, p95/p99 latency) catch a target that is bad on its own.
- Relative checks compare the target with the stable version over the same window, per
  guarded metric (`HealthThresholds.guarded_metrics`: error rate, p95 latency and p95 time
  to first token by default, any metric of the catalogue on request, each with a direction
  and a tolerance), so a slow hour for everyone does not fail the target. A relative
  failure needs both a *material* difference (worse than the tolerance) and a
  *significant* one (a one-sided test), so noise on small samples does not roll back a
  good release and a statistically real but negligible difference does not either.
  Metrics in milliseconds also have an absolute tolerance (`latency_tolerance_ms`): two
  identical engines on a CPU host that runs other processes differ at p95 by a scheduler
  time slice or two (measured here: 22 vs 30 ms, +37%, p = 0.006 over 500 requests each),
  which no user notices and a relative tolerance alone calls a regression. A
  metric without enough samples on either side (no streamed answers, hence no time to
  first token) is not compared, with a note: it can neither fail nor vouch for the target.
- Repeated looks stay valid. A rollout judges one look per step (and re-judges an
  inconclusive step), each on a fresh window. Testing every look at `1 - confidence` would
  let an identical target fail *some* look with probability up to `looks x (1 -
  confidence)`. Each look therefore tests at `alpha = (1 - confidence) / looks`
  (Bonferroni): by the union bound the whole rollout's chance of rolling back a target as
  good as the stable version stays within `1 - confidence`, whatever the dependence
  between looks. `looks` (the most looks the switch's plan can take) is set per switch;
  overcounting only costs a little power, since the material check, not significance,
  binds on realistic samples.

Rates use Fisher's exact test (errors are rare, and the small per-look alpha is where the
pooled z-test's normal tail is too liberal); quantiles and throughputs Mann-Whitney U
(`turnout.telemetry.statistics`). Every verdict's `analysis` carries, per metric, the
samples, estimates, interval, p-value, alpha and tolerance it was decided on, so the
status and the Web UI can say why.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from turnout.telemetry.catalogue import (
    CATALOGUE,
    DEFAULT_GUARDED,
    METRIC_NAMES,
    Direction,
    Kind,
    metric,
)
from turnout.telemetry.figures import Figures, WindowSamples
from turnout.telemetry.sketch import Histogram
from turnout.telemetry.statistics import (
    Samples,
    count,
    difference_interval,
    fisher_exact_greater,
    mann_whitney_u,
    quantile,
    quantile_interval,
    tail_test,
)

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
INCONCLUSIVE = "inconclusive"


class GuardedMetric(BaseModel):
    """One metric a target must not be worse on than the stable version.

    `metric` is a name of the catalogue (`turnout.telemetry.catalogue`). `direction`
    defaults to the metric's natural one (`success_rate` and `output_tokens_per_s` are
    better when higher), so `{"metric": "ttft_p95"}` is enough. `tolerance` is how much
    worse the target may be before it fails: absolute for rates (0.02 = 2 points),
    relative for quantiles and throughputs (0.1 = 10% slower); None takes the thresholds'
    `error_rate_tolerance` or `latency_tolerance`, so the settings keep governing the
    defaults.
    """

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(json_schema_extra={"enum": list(METRIC_NAMES)})
    direction: Direction | None = None
    tolerance: float | None = Field(None, ge=0)

    @field_validator("metric")
    @classmethod
    def _in_the_catalogue(cls, value: str) -> str:
        metric(value)  # raises ValueError naming the known metrics
        return value

    @model_validator(mode="after")
    def _natural_direction(self) -> GuardedMetric:
        if self.direction is None:
            self.direction = CATALOGUE[self.metric].direction
        return self


def _default_guarded_metrics() -> list[GuardedMetric]:
    return [GuardedMetric(metric=name) for name in DEFAULT_GUARDED]


def unique_metrics(metrics: list[GuardedMetric] | None) -> list[GuardedMetric] | None:
    """One entry per metric: two tolerances for one metric would make the verdict ambiguous."""
    if metrics is not None:
        names = [m.metric for m in metrics]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"metric guarded more than once: {', '.join(repeated)}")
    return metrics


class HealthThresholds(BaseModel):
    """Limits a target must stay within; defaults come from the settings.

    Every field has a default: recorded workflow histories carry older versions of this
    model and must still deserialize.
    """

    error_rate_max: float = Field(0.05, ge=0, le=1)
    latency_p95_ms_max: float = Field(5000, gt=0)
    latency_p99_ms_max: float | None = Field(None, gt=0)
    min_requests: int = Field(20, ge=1)
    # How much worse than the stable version the target may be before it fails.
    error_rate_tolerance: float = Field(0.02, ge=0, le=1)
    latency_tolerance: float = Field(0.1, ge=0)
    # An absolute tolerance beside the relative one, for the metrics in milliseconds
    # (latency, time to first token, inter-token latency): the target fails one only when
    # it is worse by more than both. 0 in histories recorded before it existed.
    latency_tolerance_ms: float = Field(0, ge=0, le=60_000)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # Metrics compared with the stable version at every judged step.
    guarded_metrics: list[GuardedMetric] = Field(default_factory=_default_guarded_metrics)
    # The most judged looks this rollout can take: each look tests at (1 - confidence) /
    # looks, so the whole rollout's false-rollback rate stays within 1 - confidence.
    looks: int = Field(1, ge=1, le=10_000)
    # A fresh engine's warm-up, left out of the target's first judged window (target and
    # stable alike, so both are still judged over the same span): its first
    # `warmup_requests` requests at each gateway, and its first `warmup_seconds`.
    # 0 in histories recorded before warm-up exclusion: their verdicts stay as they were.
    warmup_requests: int = Field(0, ge=0, le=100_000)
    warmup_seconds: float = Field(0, ge=0, le=3600)

    _check_metrics = field_validator("guarded_metrics")(unique_metrics)


class Verdict(BaseModel):
    """`healthy`, `unhealthy` or `inconclusive` (too little data: never counted as healthy)."""

    outcome: str = INCONCLUSIVE
    reason: str = ""
    target: Figures = Field(default_factory=Figures)
    stable: Figures | None = None
    # Per-metric test results: {"metrics": {"error_rate": {"p_value":..., ...}}, ...}
    analysis: dict[str, Any] = Field(default_factory=dict)
    window_start: float = 0
    window_end: float = 0

    @property
    def healthy(self) -> bool:
        return self.outcome == HEALTHY

    @property
    def over_limits(self) -> bool:
        """Whether the target crossed an absolute limit (error rate, p95 or p99 latency),
        as opposed to being worse than the stable version only."""
        return any(bool(self.analysis.get(kind, {}).get("over_limit"))
                   for kind in ("error_rate", "latency"))


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _amount(value: float | None, unit: str) -> str:
    if unit == "ms":
        return _ms(value)
    return "n/a" if value is None else f"{value:.3g} {unit}"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _summary(f: Figures) -> str:
    return f"p95 {_ms(f.latency_p95_ms)}, errors {_pct(f.error_rate)} over {f.requests} requests"


def _winner(p_target_worse: float | None, p_target_better: float | None,
            alpha: float) -> str | None:
    """Which version is significantly better on a metric (A/B tests); None if neither."""
    if p_target_better is not None and p_target_better < alpha:
        return "target"
    if p_target_worse is not None and p_target_worse < alpha:
        return "stable"
    return None


def per_look_alpha(thresholds: HealthThresholds) -> float:
    """The significance level of one look: `1 - confidence` shared by `looks` (Bonferroni)."""
    return (1.0 - thresholds.confidence) / thresholds.looks


def _tolerance(metric: GuardedMetric, thresholds: HealthThresholds) -> float:
    if metric.tolerance is not None:
        return metric.tolerance
    if CATALOGUE[metric.metric].kind is Kind.RATE:
        return thresholds.error_rate_tolerance
    return thresholds.latency_tolerance


def _rate_counts(metric: str, sample: WindowSamples) -> int:
    """What the rate counts: errors, or successes for `success_rate`."""
    return sample.errors if metric == "error_rate" else sample.requests - sample.errors


def compare_metric(metric: GuardedMetric, target: WindowSamples, stable: WindowSamples | None,
                   thresholds: HealthThresholds, *, compare: bool = False) -> dict[str, Any]:
    """One guarded metric, target against stable: numbers, test, and whether it failed.

    `change` is how much worse the target is in the metric's own terms (rate points for
    rates, a fraction of the stable quantile for quantiles; negative = better), so one
    rule, `material = change > tolerance`, serves both directions. The p-value is the
    one-sided test of "target worse" in the metric's direction.
    """
    name = metric.metric
    entry_of = CATALOGUE[name]
    is_rate = entry_of.kind is Kind.RATE
    higher = metric.direction == "higher_is_better"
    alpha = per_look_alpha(thresholds)
    tolerance = _tolerance(metric, thresholds)
    tolerance_ms = (thresholds.latency_tolerance_ms
                    if entry_of.unit == "ms" and not higher else 0.0)
    entry: dict[str, Any] = {
        "metric": name, "label": entry_of.label, "direction": metric.direction,
        "kind": entry_of.kind.value, "unit": entry_of.unit, "test": entry_of.test,
        "tolerance": tolerance, "tolerance_ms": tolerance_ms or None, "alpha": alpha,
        "confidence": thresholds.confidence,
        "looks": thresholds.looks, "min_samples": thresholds.min_requests,
        "target": None, "stable": None, "samples": {"target": 0, "stable": 0},
        "change": None, "interval": None, "p_value": None,
        "compared": False, "material": False, "significant": False, "worse": False,
        "failed": False, "note": None,
    }
    if is_rate:
        n_t, n_s = target.requests, stable.requests if stable else 0
        x_t = _rate_counts(name, target)
        entry["target"] = x_t / n_t if n_t else None
        entry["difference"] = None
        if stable is not None and n_s:
            x_s = _rate_counts(name, stable)
            entry["stable"] = x_s / n_s
        if stable is not None and n_t and n_s:
            x_s = _rate_counts(name, stable)
            difference = x_t / n_t - x_s / n_s
            entry["difference"] = difference
            entry["change"] = -difference if higher else difference
            entry["interval"] = difference_interval(x_t, n_t, x_s, n_s, alpha)
            worse_p = (fisher_exact_greater(x_s, n_s, x_t, n_t) if higher
                       else fisher_exact_greater(x_t, n_t, x_s, n_s))
            better_p = (fisher_exact_greater(x_t, n_t, x_s, n_s) if higher
                        else fisher_exact_greater(x_s, n_s, x_t, n_t))
            entry["p_value"] = worse_p
            if compare:
                entry["p_value_better"] = better_p
    else:
        source, q = entry_of.source, entry_of.quantile
        assert q is not None
        t_values = target.values(source)
        s_values = stable.values(source) if stable is not None else Histogram()
        n_t, n_s = count(t_values), count(s_values)
        entry["target"], entry["stable"] = quantile(t_values, q), quantile(s_values, q)
        entry["ratio"] = None
        entry["target_interval"] = quantile_interval(t_values, q, alpha)
        entry["stable_interval"] = quantile_interval(s_values, q, alpha)
        entry["difference"] = None
        if entry["target"] is not None and entry["stable"]:
            ratio = entry["target"] / entry["stable"]
            entry["ratio"] = ratio
            entry["change"] = 1.0 - ratio if higher else ratio - 1.0
            entry["difference"] = entry["target"] - entry["stable"]
        if stable is not None:
            _worse_beyond_tolerance(entry, t_values, s_values, q, tolerance, higher,
                                    tolerance_ms)
            if compare:
                worse, better = ((s_values, t_values) if higher else (t_values, s_values))
                entry["p_value_better"] = mann_whitney_u(better, worse)
    entry["samples"] = {"target": n_t, "stable": n_s}
    entry["significant"] = entry["p_value"] is not None and entry["p_value"] < alpha
    entry["material"] = (entry["change"] is not None and entry["change"] > tolerance
                         and (not tolerance_ms or entry["difference"] > tolerance_ms))

    need = thresholds.min_requests
    if stable is None:
        entry["note"] = "no stable version to compare with"
    elif n_t == 0 or n_s == 0:
        side = "either side" if n_t == n_s == 0 else ("target" if n_t == 0 else "stable")
        entry["note"] = f"skipped: no {entry_of.label} samples on {side}"
    elif n_t < need or n_s < need:
        entry["note"] = (f"not compared: {n_t} target and {n_s} stable samples, "
                         f"need {need} each")
    else:
        entry["compared"] = True
    entry["worse"] = entry["compared"] and entry["material"] and entry["significant"]
    entry["failed"] = entry["worse"]
    if compare:
        entry["not_worse"] = not entry["failed"]
        entry["winner"] = (_winner(entry["p_value"], entry.get("p_value_better"), alpha)
                           if entry["compared"] else None)
    return entry


def _worse_beyond_tolerance(entry: dict[str, Any], target: Samples, stable: Samples,
                            q: float, tolerance: float, higher: bool,
                            tolerance_ms: float = 0.0) -> None:
    """The p-value of "the target is worse than stable by more than the tolerance", for a
    quantile (or throughput) metric: the tolerance is in the null hypothesis, so two
    engines a few percent apart are never called significantly different however many
    requests they served, and the materiality check and the test ask the same question.

    Two one-sided tests against stable scaled by the margin (x (1 + tolerance), or
    x (1 - tolerance) when higher is better), each at half the level (Bonferroni), their
    smaller p-value doubled: a rank test of the whole distribution (Mann-Whitney U:
    powerful for a version slower everywhere, blind to a few outliers) and a test of the
    guarded quantile itself (`tail_test`: sees a regression carried by the slowest tenth
    of the requests). With an absolute `tolerance_ms` stable's values are raised
    by at least that much too: "worse by more than 10% and by more than 20 ms".
    """
    if higher:
        margin = max(0.0, 1.0 - tolerance)
        rank = mann_whitney_u(stable, target, margin=1.0 / margin) if margin > 0 else None
        tail = tail_test(target, stable, q, margin=margin, upper=False) if margin > 0 \
            else None
    else:
        margin = 1.0 + tolerance
        rank = mann_whitney_u(target, stable, margin=margin, shift=tolerance_ms)
        tail = tail_test(target, stable, q, margin=margin, shift=tolerance_ms)
    p_values = [p for p in (rank, tail) if p is not None]
    entry["margin"] = margin
    entry["p_rank"], entry["p_tail"] = rank, tail
    entry["p_value"] = min(1.0, 2.0 * min(p_values)) if p_values else None


def _relative_failure(entry: dict[str, Any]) -> str:
    """The short sentence naming a metric on which the target is worse than stable."""
    label, tol = entry["label"], entry["tolerance"]
    higher = entry["direction"] == "higher_is_better"
    p = f"p={_p(entry['p_value'])}"
    if entry["kind"] == "rate":
        points = entry["difference"] * 100
        bound = f"< -{tol * 100:.1f}" if higher else f"> {tol * 100:.1f}"
        return (f"{label} {_pct(entry['target'])} vs stable {_pct(entry['stable'])} "
                f"({points:+.1f} points {bound} tolerance, {p})")
    percent = (entry["ratio"] - 1) * 100
    bound = f"< -{tol * 100:.0f}%" if higher else f"> {tol * 100:.0f}%"
    if entry.get("tolerance_ms"):
        bound += f" and {entry['difference']:+.0f} ms > {entry['tolerance_ms']:g} ms"
    unit = entry.get("unit", "ms")
    return (f"{label} {_amount(entry['target'], unit)} vs stable "
            f"{_amount(entry['stable'], unit)} ({percent:+.0f}% {bound} tolerance, {p})")


def judge(target: WindowSamples, stable: WindowSamples | None, thresholds: HealthThresholds,
          compare: bool = False) -> Verdict:
    """The verdict on `target` over one window (one look), optionally against `stable`.

    Order of rules: too few target requests → inconclusive (so an inconclusive look can
    never fail, whatever its figures); then every absolute limit and every guarded
    metric is evaluated, and any failure → unhealthy with all failures named (absolute
    limits first); otherwise healthy.

    `analysis["metrics"]` holds one entry per guarded metric (see `compare_metric`);
    `analysis["error_rate"]` and `analysis["latency"]` keep their earlier shape (numbers,
    p-values, limits, `over_limit`, `worse`, `failed`) for the status, the UI and older
    readers; with `compare` (A/B tests) every entry also names a `winner` ("target",
    "stable" or None) and whether the target is `not_worse`.
    """
    t = target.figures()
    s = stable.figures() if stable is not None else None
    alpha = per_look_alpha(thresholds)
    comparable = (stable is not None and s is not None
                  and s.requests >= thresholds.min_requests)
    metrics = {m.metric: compare_metric(m, target, stable, thresholds, compare=compare)
               for m in thresholds.guarded_metrics}

    # The earlier per-kind entries: absolute limits, plus the guarded error rate and
    # (p95, or else the first guarded) latency comparison when guarded.
    guarded_err = metrics.get("error_rate", {})
    err: dict[str, Any] = {
        "target": t.error_rate, "stable": s.error_rate if s else None,
        "limit": thresholds.error_rate_max,
        "tolerance": guarded_err.get("tolerance", thresholds.error_rate_tolerance),
        "alpha": alpha, "compared": comparable and "error_rate" in metrics,
        "difference": guarded_err.get("difference"), "p_value": guarded_err.get("p_value"),
        "interval": guarded_err.get("interval"),
        "significant": guarded_err.get("significant", False),
        "over_limit": False, "worse": guarded_err.get("worse", False),
    }
    latency_metrics = [entry for name, entry in metrics.items() if name.startswith("latency")]
    guarded_lat = metrics.get("latency_p95") or (latency_metrics[0] if latency_metrics else {})
    lat: dict[str, Any] = {
        "target_p95_ms": t.latency_p95_ms, "target_p99_ms": t.latency_p99_ms,
        "stable_p95_ms": s.latency_p95_ms if s else None,
        "stable_p99_ms": s.latency_p99_ms if s else None,
        "limit_p95_ms": thresholds.latency_p95_ms_max,
        "limit_p99_ms": thresholds.latency_p99_ms_max, "metric": guarded_lat.get("metric"),
        "tolerance": guarded_lat.get("tolerance", thresholds.latency_tolerance),
        "alpha": alpha, "compared": guarded_lat.get("compared", False),
        "ratio": guarded_lat.get("ratio"), "p_value": guarded_lat.get("p_value"),
        "significant": guarded_lat.get("significant", False),
        "over_limit": False, "worse": any(e["worse"] for e in latency_metrics),
    }
    if compare:
        for legacy, entry in ((err, guarded_err), (lat, guarded_lat)):
            legacy["p_value_better"] = entry.get("p_value_better")

    failures: list[str] = []
    if t.error_rate is not None and t.error_rate > thresholds.error_rate_max:
        err["over_limit"] = True
        failures.append(f"error rate {_pct(t.error_rate)} > {_pct(thresholds.error_rate_max)}"
                        " limit")
    if t.latency_p95_ms is not None and t.latency_p95_ms > thresholds.latency_p95_ms_max:
        lat["over_limit"] = True
        failures.append(f"p95 latency {_ms(t.latency_p95_ms)} > "
                        f"{_ms(thresholds.latency_p95_ms_max)} limit")
    if (thresholds.latency_p99_ms_max is not None and t.latency_p99_ms is not None
            and t.latency_p99_ms > thresholds.latency_p99_ms_max):
        lat["over_limit"] = True
        failures.append(f"p99 latency {_ms(t.latency_p99_ms)} > "
                        f"{_ms(thresholds.latency_p99_ms_max)} limit")
    if stable is not None:
        failures += [_relative_failure(entry)
                     for entry in metrics.values() if entry["worse"]]

    for entry in (err, lat):
        entry["failed"] = entry["over_limit"] or entry["worse"]
    if compare:
        for legacy, entry in ((err, guarded_err), (lat, guarded_lat)):
            legacy["not_worse"] = not legacy["failed"]
            legacy["winner"] = entry.get("winner") if comparable else None
    analysis: dict[str, Any] = {
        "error_rate": err, "latency": lat, "metrics": metrics,
        "confidence": thresholds.confidence, "looks": thresholds.looks, "alpha": alpha,
        "min_requests": thresholds.min_requests,
        "skipped": {name: e["note"] for name, e in metrics.items() if not e["compared"]},
    }
    sides = [side for side in (target, stable) if side is not None]
    judged_since = max((side.judged_since for side in sides if side.judged_since), default=None)
    if judged_since is not None:
        analysis["judged_since"] = judged_since
    cut = sorted({gateway for side in sides for gateway in side.cut})
    if cut:
        analysis["cut"] = cut
        return Verdict(outcome=INCONCLUSIVE, target=t, stable=s, analysis=analysis,
                       reason=f"the window reaches past what gateways {', '.join(cut)} "
                              f"keep: not judged on part of it")
    if target.requests < thresholds.min_requests:
        return Verdict(outcome=INCONCLUSIVE, target=t, stable=s, analysis=analysis,
                       reason=f"only {target.requests} requests to {target.version}, "
                              f"need {thresholds.min_requests}")
    if failures:
        return Verdict(outcome=UNHEALTHY, target=t, stable=s, analysis=analysis,
                       reason="; ".join(failures))
    reason = _summary(t)
    if s is not None and comparable:
        reason += f" (stable {s.version}: {_summary(s)})"
    elif s is not None:
        reason += (f" (not compared with stable: only {s.requests} requests, "
                   f"need {thresholds.min_requests})")
    return Verdict(outcome=HEALTHY, target=t, stable=s, analysis=analysis, reason=reason)
