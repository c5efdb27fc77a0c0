"""Health analysis of a rollout step: figures, two-sample tests and the verdict.

Pure functions, no I/O, so the rules that can roll a release back are unit-tested on
simulated traffic. A verdict rests on three ideas:

- Too little data is `inconclusive`, never `healthy`: a quiet canary has proved nothing.
- Absolute limits (error rate, p95/p99 latency) catch a target that is bad on its own.
- Relative checks compare the target with the stable version over the same window, so a
  slow hour for everyone does not fail the target. A relative failure needs both a
  *material* difference (beyond the tolerance) and a *significant* one (a one-sided test at
  `1 - confidence`), so noise on small samples does not roll back a good release and a
  statistically real but negligible difference does not either.

The tests are the classic large-sample ones (pooled two-proportion z-test, Mann-Whitney U
with the normal approximation and tie correction), computed with `math` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from turnout.contracts import HealthThresholds, Verdict, VersionFigures

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
    500 or a long timeout) says nothing about how fast the version answers.
    """

    version: str
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, requests: int, errors: int, latencies_ms: Iterable[float]) -> None:
        """Merge another gateway's window of the same version (exact: raw samples)."""
        self.requests += requests
        self.errors += errors
        self.latencies_ms.extend(latencies_ms)

    def figures(self) -> VersionFigures:
        return figures(self.version, self.requests, self.errors, self.latencies_ms)


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


def figures(version: str, requests: int, errors: int,
            latencies: Sequence[float]) -> VersionFigures:
    """Summary of a version's window as published in a verdict."""
    ordered = sorted(latencies)
    return VersionFigures(
        version=version, requests=requests, errors=errors,
        error_rate=errors / requests if requests else None,
        p50_ms=quantile(ordered, 0.50), p95_ms=quantile(ordered, 0.95),
        p99_ms=quantile(ordered, 0.99))


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z (erfc keeps precision far in the tail)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


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


def judge(target: Sample, stable: Sample | None, thresholds: HealthThresholds,
          compare: bool = False) -> Verdict:
    """The verdict on `target` over one window, optionally against `stable`.

    Order of rules: too few target requests → inconclusive; then every absolute limit and
    relative check is evaluated, and any failure → unhealthy with all failures named;
    otherwise healthy. `analysis` always carries `error_rate` and `latency` entries (numbers,
    p-values, limits, `failed`); with `compare` (A/B tests) each also names a `winner`
    ("target", "stable" or None) and whether the target is `not_worse`.
    """
    t = target.figures()
    s = stable.figures() if stable is not None else None
    alpha = 1.0 - thresholds.confidence
    comparable = (stable is not None and s is not None
                  and s.requests >= thresholds.min_requests)

    # Error rate.
    err: dict[str, Any] = {
        "target": t.error_rate, "stable": s.error_rate if s else None,
        "limit": thresholds.error_rate_max, "tolerance": thresholds.error_rate_tolerance,
        "alpha": alpha, "compared": comparable,
        "difference": None, "p_value": None, "significant": False,
        "over_limit": False, "worse": False,
    }
    # Latency.
    lat: dict[str, Any] = {
        "target_p95_ms": t.p95_ms, "target_p99_ms": t.p99_ms,
        "stable_p95_ms": s.p95_ms if s else None, "stable_p99_ms": s.p99_ms if s else None,
        "limit_p95_ms": thresholds.latency_p95_ms_max,
        "limit_p99_ms": thresholds.latency_p99_ms_max,
        "tolerance": thresholds.latency_tolerance, "alpha": alpha, "compared": comparable,
        "ratio": None, "p_value": None, "significant": False,
        "over_limit": False, "worse": False,
    }
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

    if stable is not None and s is not None and target.requests and stable.requests:
        assert t.error_rate is not None and s.error_rate is not None
        err["difference"] = t.error_rate - s.error_rate
        err["p_value"] = two_proportion_test(target.errors, target.requests,
                                             stable.errors, stable.requests)
        err["significant"] = err["p_value"] is not None and err["p_value"] < alpha
        if compare:
            err["p_value_better"] = two_proportion_test(stable.errors, stable.requests,
                                                        target.errors, target.requests)
    if stable is not None and s is not None:
        if t.p95_ms is not None and s.p95_ms:
            lat["ratio"] = t.p95_ms / s.p95_ms
        lat["p_value"] = mann_whitney_u(target.latencies_ms, stable.latencies_ms)
        lat["significant"] = lat["p_value"] is not None and lat["p_value"] < alpha
        if compare:
            lat["p_value_better"] = mann_whitney_u(stable.latencies_ms, target.latencies_ms)

    if comparable and s is not None:
        if err["difference"] is not None and (err["difference"] > thresholds.error_rate_tolerance
                                              and err["significant"]):
            err["worse"] = True
            failures.append(
                f"error rate {_pct(t.error_rate)} vs stable {_pct(s.error_rate)} "
                f"(+{err['difference'] * 100:.1f} points > "
                f"{thresholds.error_rate_tolerance * 100:.1f} tolerance, "
                f"p={_p(err['p_value'])})")
        if lat["ratio"] is not None and (lat["ratio"] > 1.0 + thresholds.latency_tolerance
                                         and lat["significant"]):
            lat["worse"] = True
            failures.append(
                f"p95 latency {_ms(t.p95_ms)} vs stable {_ms(s.p95_ms)} "
                f"(+{(lat['ratio'] - 1) * 100:.0f}% > "
                f"{thresholds.latency_tolerance * 100:.0f}% tolerance, "
                f"p={_p(lat['p_value'])})")

    for entry in (err, lat):
        entry["failed"] = entry["over_limit"] or entry["worse"]
        if compare:
            entry["not_worse"] = not entry["failed"]
            entry["winner"] = (_winner(entry["p_value"], entry.get("p_value_better"), alpha)
                               if comparable else None)
    analysis = {"error_rate": err, "latency": lat}

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
