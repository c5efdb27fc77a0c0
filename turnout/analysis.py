"""Health analysis of a rollout step: figures, two-sample tests and the verdict.

Pure functions, no I/O, so the rules that can roll a release back are unit-tested on
simulated traffic. A verdict rests on four ideas:

- Too little data is `inconclusive`, never `healthy`: a quiet canary has proved nothing.
- Absolute limits (error rate, p95/p99 latency) catch a target that is bad on its own.
- Relative checks compare the target with the stable version over the same window, per
  guarded metric (`HealthThresholds.guarded_metrics`: error rate, p95 latency and p95 time
  to first token by default, each with a direction and a tolerance), so a slow hour for
  everyone does not fail the target. A relative failure needs both a *material*
  difference (worse than the tolerance) and a *significant* one (a one-sided test), so
  noise on small samples does not roll back a good release and a statistically real but
  negligible difference does not either. A metric without enough samples on either side
  (no streamed answers, hence no time to first token) is not compared, with a note: it
  can neither fail nor vouch for the target.
- Repeated looks stay valid. A rollout judges one look per step (and re-judges an
  inconclusive step), each on a fresh window. Testing every look at `1 - confidence` would
  let an identical target fail *some* look with probability up to `looks x (1 -
  confidence)`. Each look therefore tests at `alpha = (1 - confidence) / looks`
  (Bonferroni): by the union bound the whole rollout's chance of rolling back a target as
  good as the stable version stays within `1 - confidence`, whatever the dependence
  between looks. `looks` (the most looks the switch's plan can take) is set per switch;
  overcounting only costs a little power, since the material check, not significance,
  binds on realistic samples.

The tests are computed with `math` only: Fisher's exact test for rates (errors are rare,
and the small per-look alpha is where the pooled z-test's normal tail is too liberal) and
Mann-Whitney U (normal approximation, tie correction) for latency and time to first token. Every
verdict's `analysis` carries, per metric, the samples, estimates, interval, p-value, alpha
and tolerance it was decided on, so the status and the Web UI can say why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from turnout.contracts import HealthThresholds, Verdict, VersionFigures
from turnout.domain import GuardedMetric

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
INCONCLUSIVE = "inconclusive"

# Below this many observations per side the normal approximation of Mann-Whitney U is
# too rough to act on; the latency comparison then says "no evidence".
MWU_MIN_SAMPLE = 8


@dataclass
class Sample:
    """One version's raw outcomes over a window: the input of `judge`.

    `latencies_ms` holds successful requests only: a failed request's latency (often a fast
    500 or a long timeout) says nothing about how fast the version answers. `ttft_ms` holds
    the time to first token of successful streamed answers only: a plain answer's first
    token arrives with its last, which its latency already says.
    """

    version: str
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)

    def add(self, requests: int, errors: int, latencies_ms: Iterable[float],
            ttft_ms: Iterable[float] = ()) -> None:
        """Merge another gateway's window of the same version (exact: raw samples)."""
        self.requests += requests
        self.errors += errors
        self.latencies_ms.extend(latencies_ms)
        self.ttft_ms.extend(ttft_ms)

    def add_window(self, window: dict[str, Any]) -> None:
        """Merge one gateway's `window` as `/admin/stats` sends it (`ttft_ms` is absent
        from gateways older than time-to-first-token windows: they add no TTFT samples)."""
        self.add(int(window.get("requests", 0)), int(window.get("errors", 0)),
                 [float(x) for x in window.get("latencies_ms", ())],
                 [float(x) for x in window.get("ttft_ms", ())])

    def values(self, source: str) -> list[float]:
        """The raw samples a quantile metric is computed from (`latency` or `ttft`)."""
        return self.ttft_ms if source == "ttft" else self.latencies_ms

    def figures(self) -> VersionFigures:
        return figures(self.version, self.requests, self.errors, self.latencies_ms,
                       self.ttft_ms)


# ---------------------------------------------------------------------- statistics


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics.

    Interpolation (numpy's default) rather than nearest rank, so that p95 of a few hundred
    samples moves smoothly and two versions' percentiles compare fairly. None when empty:
    no samples is not "fast".
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def figures(version: str, requests: int, errors: int, latencies: Sequence[float],
            ttft: Sequence[float] = ()) -> VersionFigures:
    """Summary of a version's window as published in a verdict."""
    ordered = sorted(latencies)
    ttft_ordered = sorted(ttft)
    return VersionFigures(
        version=version, requests=requests, errors=errors,
        error_rate=errors / requests if requests else None,
        p50_ms=quantile(ordered, 0.50), p95_ms=quantile(ordered, 0.95),
        p99_ms=quantile(ordered, 0.99), ttft_samples=len(ttft_ordered),
        ttft_p50_ms=quantile(ttft_ordered, 0.50), ttft_p95_ms=quantile(ttft_ordered, 0.95))


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z (erfc keeps precision far in the tail)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def normal_isf(p: float) -> float:
    """The z with P(Z > z) = p (0 < p < 1): bisection on `normal_sf`, exact to 1e-12.

    Bisection rather than a rational approximation: it needs nothing but `normal_sf`, and
    a verdict asks for it a handful of times.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability {p} is outside (0, 1)")
    low, high = -40.0, 40.0
    while high - low > 1e-12:
        mid = (low + high) / 2.0
        if normal_sf(mid) > p:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def quantile_interval(values: Sequence[float], q: float,
                      alpha: float) -> tuple[float, float] | None:
    """Distribution-free interval of the q-quantile, each side missing with about `alpha`.

    Order statistics whose ranks bracket `n q` by `z sqrt(n q (1 - q))` (the normal
    approximation of the binomial count below the quantile): no assumption on the shape
    of latency, which is what makes it honest for skewed LLM timings. None when empty.
    """
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    spread = normal_isf(alpha) * math.sqrt(n * q * (1.0 - q))
    low = max(1, math.floor(n * q - spread))
    high = min(n, math.ceil(n * q + spread) + 1)
    return ordered[low - 1], ordered[high - 1]


def difference_interval(x1: int, n1: int, x2: int, n2: int,
                        alpha: float) -> tuple[float, float] | None:
    """Interval of rate 1 - rate 2 (unpooled Wald), each side missing with about `alpha`."""
    if n1 <= 0 or n2 <= 0:
        return None
    r1, r2 = x1 / n1, x2 / n2
    half = normal_isf(alpha) * math.sqrt(r1 * (1 - r1) / n1 + r2 * (1 - r2) / n2)
    return r1 - r2 - half, r1 - r2 + half


def two_proportion_test(e1: int, n1: int, e2: int, n2: int) -> float | None:
    """One-sided p-value of "rate 1 (target) is greater than rate 2 (stable)".

    Pooled z-test: under the null hypothesis both versions share one error rate, so its
    pooled estimate gives the standard error. None without data on either side; 1.0 when
    the pooled rate is 0 or 1 (both sides identical: no evidence of a difference).
    """
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (e1 + e2) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return 1.0
    z = (e1 / n1 - e2 / n2) / math.sqrt(variance)
    return normal_sf(z)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_exact_greater(e1: int, n1: int, e2: int, n2: int) -> float | None:
    """One-sided exact p-value of "rate 1 (target) is greater than rate 2 (stable)".

    Fisher's exact test: given the errors of both versions together, how likely is it that
    at least `e1` of them fell on the target if both share one rate (hypergeometric
    tail). The verdict uses it rather than `two_proportion_test` because errors are rare:
    at a 2% error rate, 300 requests per side hold about 6 errors each, and at the small
    per-look alpha of a multi-look rollout the z-test's tail is up to twice too small
    (9 vs 1 errors: z-test p 0.005, exact 0.011), which would roll back good releases more
    often than `confidence` promises. Exact is slightly conservative, never liberal.
    The tail is summed by the pmf's ratio recurrence from `e1` up until terms vanish.
    None without data on either side.
    """
    if n1 <= 0 or n2 <= 0:
        return None
    total, events = n1 + n2, e1 + e2
    high = min(events, n1)
    if e1 > high:
        return 0.0
    term = math.exp(_log_comb(events, e1) + _log_comb(total - events, n1 - e1)
                    - _log_comb(total, n1))
    p = 0.0
    x = e1
    while True:
        p += term
        if x >= high:
            break
        term *= (events - x) * (n1 - x) / ((x + 1) * (total - events - n1 + x + 1))
        x += 1
        if term < p * 1e-17:
            break
    return min(1.0, p)


def _midranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Ranks (1-based, ties share their mean rank) and the sizes of the tie groups."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    ties: list[int] = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        rank = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            ranks[order[k]] = rank
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


def mann_whitney_u(a: Sequence[float], b: Sequence[float], *,
                   min_size: int = MWU_MIN_SAMPLE) -> float | None:
    """One-sided p-value of "values of `a` are stochastically greater than those of `b`".

    Rank-based, so a few huge outliers (one stuck generation) cannot fake a slowdown and
    latency's skew needs no distribution assumption. Normal approximation with tie
    correction and continuity correction (as scipy's `mannwhitneyu(..., method=
    "asymptotic")`). None when either side has fewer than `min_size` values.
    """
    n1, n2 = len(a), len(b)
    if n1 < min_size or n2 < min_size or n1 == 0 or n2 == 0:
        return None
    ranks, ties = _midranks([*a, *b])
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    mean = n1 * n2 / 2.0
    tie_term = sum(t**3 - t for t in ties) / (n * (n - 1))
    variance = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if variance <= 0.0:  # every value tied: no evidence either way
        return 1.0
    z = (u1 - mean - 0.5) / math.sqrt(variance)
    return normal_sf(z)


# ---------------------------------------------------------------------- verdict

# Quantile metrics: (samples the quantile is taken from, q).
QUANTILE_METRICS: dict[str, tuple[str, float]] = {
    "latency_p50": ("latency", 0.50), "latency_p95": ("latency", 0.95),
    "latency_p99": ("latency", 0.99), "ttft_p50": ("ttft", 0.50),
    "ttft_p95": ("ttft", 0.95), "ttft_p99": ("ttft", 0.99),
}
RATE_METRICS = frozenset({"error_rate", "success_rate"})
# How a metric is named in a verdict's reason. "error rate" is what operators (and tests of
# automatic rollbacks) look for.
LABELS: dict[str, str] = {
    "error_rate": "error rate", "success_rate": "success rate",
    "latency_p50": "p50 latency", "latency_p95": "p95 latency", "latency_p99": "p99 latency",
    "ttft_p50": "p50 time to first token", "ttft_p95": "p95 time to first token",
    "ttft_p99": "p99 time to first token",
}


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _summary(f: VersionFigures) -> str:
    return f"p95 {_ms(f.p95_ms)}, errors {_pct(f.error_rate)} over {f.requests} requests"


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
    if metric.metric in RATE_METRICS:
        return thresholds.error_rate_tolerance
    return thresholds.latency_tolerance


def _rate_counts(metric: str, sample: Sample) -> int:
    """What the rate counts: errors, or successes for `success_rate`."""
    return sample.errors if metric == "error_rate" else sample.requests - sample.errors


def compare_metric(metric: GuardedMetric, target: Sample, stable: Sample | None,
                   thresholds: HealthThresholds, *, compare: bool = False) -> dict[str, Any]:
    """One guarded metric, target against stable: numbers, test, and whether it failed.

    `change` is how much worse the target is in the metric's own terms (rate points for
    rates, a fraction of the stable quantile for quantiles; negative = better), so one
    rule, `material = change > tolerance`, serves both directions. The p-value is the
    one-sided test of "target worse" in the metric's direction.
    """
    name = metric.metric
    higher = metric.direction == "higher_is_better"
    alpha = per_look_alpha(thresholds)
    tolerance = _tolerance(metric, thresholds)
    entry: dict[str, Any] = {
        "metric": name, "label": LABELS[name], "direction": metric.direction,
        "kind": "rate" if name in RATE_METRICS else "quantile",
        "test": "fisher_exact" if name in RATE_METRICS else "mann_whitney_u",
        "tolerance": tolerance, "alpha": alpha, "confidence": thresholds.confidence,
        "looks": thresholds.looks, "min_samples": thresholds.min_requests,
        "target": None, "stable": None, "samples": {"target": 0, "stable": 0},
        "change": None, "interval": None, "p_value": None,
        "compared": False, "material": False, "significant": False, "worse": False,
        "failed": False, "note": None,
    }
    if name in RATE_METRICS:
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
        source, q = QUANTILE_METRICS[name]
        t_values = target.values(source)
        s_values = stable.values(source) if stable is not None else []
        n_t, n_s = len(t_values), len(s_values)
        entry["target"], entry["stable"] = quantile(t_values, q), quantile(s_values, q)
        entry["ratio"] = None
        entry["target_interval"] = quantile_interval(t_values, q, alpha)
        entry["stable_interval"] = quantile_interval(s_values, q, alpha)
        if entry["target"] is not None and entry["stable"]:
            ratio = entry["target"] / entry["stable"]
            entry["ratio"] = ratio
            entry["change"] = 1.0 - ratio if higher else ratio - 1.0
        if stable is not None:
            worse, better = ((s_values, t_values) if higher else (t_values, s_values))
            entry["p_value"] = mann_whitney_u(worse, better)
            if compare:
                entry["p_value_better"] = mann_whitney_u(better, worse)
    entry["samples"] = {"target": n_t, "stable": n_s}
    entry["significant"] = entry["p_value"] is not None and entry["p_value"] < alpha
    entry["material"] = entry["change"] is not None and entry["change"] > tolerance

    need = thresholds.min_requests
    if stable is None:
        entry["note"] = "no stable version to compare with"
    elif n_t == 0 or n_s == 0:
        side = "either side" if n_t == n_s == 0 else ("target" if n_t == 0 else "stable")
        entry["note"] = f"skipped: no {LABELS[name]} samples on {side}"
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
    return (f"{label} {_ms(entry['target'])} vs stable {_ms(entry['stable'])} "
            f"({percent:+.0f}% {bound} tolerance, {p})")


def judge(target: Sample, stable: Sample | None, thresholds: HealthThresholds,
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
        "target_p95_ms": t.p95_ms, "target_p99_ms": t.p99_ms,
        "stable_p95_ms": s.p95_ms if s else None, "stable_p99_ms": s.p99_ms if s else None,
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
    if t.p95_ms is not None and t.p95_ms > thresholds.latency_p95_ms_max:
        lat["over_limit"] = True
        failures.append(f"p95 latency {_ms(t.p95_ms)} > {_ms(thresholds.latency_p95_ms_max)}"
                        " limit")
    if (thresholds.latency_p99_ms_max is not None and t.p99_ms is not None
            and t.p99_ms > thresholds.latency_p99_ms_max):
        lat["over_limit"] = True
        failures.append(f"p99 latency {_ms(t.p99_ms)} > {_ms(thresholds.latency_p99_ms_max)}"
                        " limit")
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
