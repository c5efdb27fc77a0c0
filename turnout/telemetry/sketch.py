"""Mergeable histograms of per-request samples: the form windows are kept and sent in.

A verdict compares the target with the stable version over a window that may last two
days and be served by several gateways. Raw samples merge exactly but grow without bound
(a 48-hour A/B test at 100 requests/s is 17 million of them); a percentile per gateway
does not merge at all. A histogram with logarithmic bins does both: counts add up across
gateways and across time slices, and its size is bounded by the number of bins whatever
the traffic.

Bins are `BIN_RATIO` (2%) wide: a value is stood for by its bin's geometric centre, within
1% of it, well inside the tolerances verdicts apply (10% by default). Ties between
values of one bin are what the rank test's tie correction is for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

BIN_RATIO = 1.02
_LOG_RATIO = math.log(BIN_RATIO)
# Values at or below this (ms, tokens/s) share the lowest bin: nothing measured here is
# meaningfully smaller, and log(0) is not a number.
FLOOR = 1e-3
_FLOOR_INDEX = math.floor(math.log(FLOOR) / _LOG_RATIO)


def bin_index(value: float) -> int:
    """The bin of a value (ms or tokens/s)."""
    if value <= FLOOR:
        return _FLOOR_INDEX
    return math.floor(math.log(value) / _LOG_RATIO)


def bin_value(index: int) -> float:
    """The value a bin stands for: the geometric centre of [ratio^i, ratio^(i+1))."""
    return float(BIN_RATIO ** (index + 0.5))


class Histogram:
    """Counts of samples per logarithmic bin; adds up exactly with others.

    `bins` maps a bin index to its count. Iterating gives (value, count) pairs in
    increasing order of value, which is what the statistics read.
    """

    __slots__ = ("bins",)

    def __init__(self, bins: dict[int, int] | None = None) -> None:
        self.bins: dict[int, int] = bins if bins is not None else {}

    @classmethod
    def of(cls, values: Iterable[float]) -> Histogram:
        histogram = cls()
        for value in values:
            histogram.add(value)
        return histogram

    def add(self, value: float, count: int = 1) -> None:
        index = bin_index(value)
        self.bins[index] = self.bins.get(index, 0) + count

    def merge(self, other: Histogram | dict[int, int]) -> None:
        bins = other.bins if isinstance(other, Histogram) else other
        for index, count in bins.items():
            self.bins[index] = self.bins.get(index, 0) + count

    @property
    def count(self) -> int:
        return sum(self.bins.values())

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return any(self.bins.values())

    def __iter__(self) -> Iterator[tuple[float, int]]:
        for index in sorted(self.bins):
            count = self.bins[index]
            if count > 0:
                yield bin_value(index), count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return {k: v for k, v in self.bins.items() if v} == \
            {k: v for k, v in other.bins.items() if v}

    def __repr__(self) -> str:
        return f"Histogram({self.count} samples in {len(self.bins)} bins)"
