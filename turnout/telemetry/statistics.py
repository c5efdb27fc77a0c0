"""Statistics of verdicts: the one quantile function and the two-sample tests.

Computed with `math` only. Samples are either raw values or `Histogram`s (what windows
travel in): every function reads both as sorted (value, count) pairs, so a quantile or a
rank test means the same thing whatever form its samples came in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from turnout.telemetry.sketch import Histogram

Samples = Sequence[float] | Histogram

# Below this many observations per side the normal approximation of Mann-Whitney U is
# too rough to act on; the comparison then says "no evidence".
MWU_MIN_SAMPLE = 8


def _pairs(values: Samples) -> list[tuple[float, int]]:
    """(value, count) pairs in increasing order of value."""
    if isinstance(values, Histogram):
        return list(values)
    return [(float(v), 1) for v in sorted(values)]


def _order_statistics(pairs: list[tuple[float, int]], ranks: Sequence[int]) -> list[float]:
    """The values at 0-based `ranks` (increasing) of the sample `pairs` stand for."""
    result: list[float] = []
    seen = 0
    wanted = iter(ranks)
    rank = next(wanted, None)
    for value, count in pairs:
        seen += count
        while rank is not None and rank < seen:
            result.append(value)
            rank = next(wanted, None)
        if rank is None:
            break
    return result


def count(values: Samples) -> int:
    return values.count if isinstance(values, Histogram) else len(values)


def quantile(values: Samples, q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics.

    The one quantile of turnout: verdicts, the monitor, the in-process `HealthMonitor`,
    the gateway's summaries and the benchmarks all use it. Interpolation (numpy's
    default) rather than nearest rank, so that p95 of a few hundred samples moves
    smoothly and two versions' percentiles compare fairly. None when empty: no samples is
    not "fast".
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    pairs = _pairs(values)
    n = sum(c for _, c in pairs)
    return _pair_quantile(pairs, n, q) if n else None


def _pair_quantile(pairs: list[tuple[float, int]], n: int, q: float) -> float:
    """The q-quantile of n > 0 samples given as sorted (value, count) pairs."""
    position = (n - 1) * q
    low = math.floor(position)
    below, above = _order_statistics(pairs, [low, min(low + 1, n - 1)])
    return below + (position - low) * (above - below)


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


def quantile_interval(values: Samples, q: float, alpha: float) -> tuple[float, float] | None:
    """Distribution-free interval of the q-quantile, each side missing with about `alpha`.

    Order statistics whose ranks bracket `n q` by `z sqrt(n q (1 - q))` (the normal
    approximation of the binomial count below the quantile): no assumption on the shape
    of latency, which is what makes it honest for skewed LLM timings. None when empty.
    """
    pairs = _pairs(values)
    n = sum(c for _, c in pairs)
    if n == 0:
        return None
    spread = normal_isf(alpha) * math.sqrt(n * q * (1.0 - q))
    low = max(1, math.floor(n * q - spread))
    high = min(n, math.ceil(n * q + spread) + 1)
    lower, upper = _order_statistics(pairs, [low - 1, high - 1])
    return lower, upper


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


def _scaled(pairs: list[tuple[float, int]], margin: float,
            shift: float) -> list[tuple[float, int]]:
    """`pairs` under the null hypothesis's tolerance: each value times `margin`, or plus
    `shift` where that is more (a monotone map, so the pairs stay in order)."""
    if shift > 0:
        return [(max(value * margin, value + shift), c) for value, c in pairs]
    return [(value * margin, c) for value, c in pairs]


def mann_whitney_u(a: Samples, b: Samples, *, margin: float = 1.0, shift: float = 0.0,
                   min_size: int = MWU_MIN_SAMPLE) -> float | None:
    """One-sided p-value of "values of `a` are stochastically greater than those of `b`
    multiplied by `margin`".

    Rank-based, so a few huge outliers (one stuck generation) cannot fake a slowdown and
    latency's skew needs no distribution assumption. Normal approximation with tie
    correction and continuity correction (as scipy's `mannwhitneyu(..., method=
    "asymptotic")`); values of one histogram bin are ties. None when either side has
    fewer than `min_size` values.

    `margin` puts a tolerance into the null hypothesis: with `margin=1.1` the test asks
    whether `a` is more than 10% greater than `b`, so a difference within the tolerance
    (two engines on different cores, say 5% apart) is never called significant however
    many samples there are, while a plain test (`margin=1`) would call any systematic
    difference significant once the samples are many. `shift` (> 0) is an absolute
    tolerance beside it: `b`'s values are raised by at least `shift`.
    """
    pa = _pairs(a)
    pb = _scaled(_pairs(b), margin, shift)
    n1, n2 = sum(c for _, c in pa), sum(c for _, c in pb)
    if n1 < min_size or n2 < min_size or n1 == 0 or n2 == 0:
        return None
    counts: dict[float, list[int]] = {}
    for value, c in pa:
        counts.setdefault(value, [0, 0])[0] += c
    for value, c in pb:
        counts.setdefault(value, [0, 0])[1] += c
    rank_sum = 0.0
    tie_sum = 0
    start = 0
    for value in sorted(counts):
        in_a, in_b = counts[value]
        t = in_a + in_b
        rank_sum += in_a * (start + (t + 1) / 2.0)  # midrank of the tie group
        if t > 1:
            tie_sum += t**3 - t
        start += t
    u1 = rank_sum - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    mean = n1 * n2 / 2.0
    tie_term = tie_sum / (n * (n - 1))
    variance = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if variance <= 0.0:  # every value tied: no evidence either way
        return 1.0
    z = (u1 - mean - 0.5) / math.sqrt(variance)
    return normal_sf(z)


def tail_test(a: Samples, b: Samples, q: float, *, margin: float = 1.0, shift: float = 0.0,
              upper: bool = True, min_size: int = MWU_MIN_SAMPLE) -> float | None:
    """One-sided p-value of "the q-quantile of `a` is above that of `b` x `margin`"
    (`upper=False`: below it), a two-sample quantile test in the manner of Mood's median
    test.

    Pool `a` with `b` scaled by `margin`, take the pooled q-quantile M, and compare the
    shares of each side beyond M with Fisher's exact test. Only counts beyond one point
    matter, so it answers for the quantile a guard names (a p95 regression carried by a
    tenth of the requests, which a rank test of the whole distribution hardly sees),
    and a difference in the bulk within the margin leaves it unmoved. `shift` as in
    `mann_whitney_u`. None when either side has fewer than `min_size` values.
    """
    pa = _pairs(a)
    pb = _scaled(_pairs(b), margin, shift)
    n1, n2 = sum(c for _, c in pa), sum(c for _, c in pb)
    if n1 < min_size or n2 < min_size:
        return None
    point = _pair_quantile(sorted([*pa, *pb]), n1 + n2, q)
    if upper:
        beyond_a = sum(c for v, c in pa if v > point)
        beyond_b = sum(c for v, c in pb if v > point)
    else:
        beyond_a = sum(c for v, c in pa if v < point)
        beyond_b = sum(c for v, c in pb if v < point)
    return fisher_exact_greater(beyond_a, n1, beyond_b, n2)


