"""The one figures model, and the samples of one version over a window they come from.

`Figures` is what a verdict publishes for target and stable, what the monitor keeps per
version for `GET /health/models`, and what the in-process `HealthMonitor` judges: one
shape, its field names those of the catalogue (`latency_p95_ms` holds `latency_p95`).
`WindowSamples` holds a version's requests, errors and per-request samples over a
window, merged from every gateway's `VersionWindow`; `figures()` summarises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, BaseModel, Field

from turnout.telemetry.catalogue import CATALOGUE, SAMPLE_SOURCES, Kind, Metric, Source
from turnout.telemetry.sketch import Histogram
from turnout.telemetry.statistics import Samples, count, quantile

if TYPE_CHECKING:
    from turnout.gateway_protocol import VersionWindow


class Figures(BaseModel):
    """One version over one window, merged across gateways (and, for the monitor, engines).

    Traffic figures come from the gateways; `inflight` and the resource figures (memory,
    CPU, queue, KV cache) only from the monitor's look. Quantiles are None without
    samples: nothing measured is not "fast". Verdicts recorded by earlier releases named
    the latency quantiles `p50_ms`, `p95_ms`, `p99_ms`, and monitor looks named the median
    inter-token latency `time_per_output_token_ms`: those names are still read.
    """

    version: str = ""
    requests: int = 0
    errors: int = 0
    error_rate: float | None = None
    success_rate: float | None = None
    latency_p50_ms: float | None = Field(None, validation_alias=AliasChoices(
        "latency_p50_ms", "p50_ms"))
    latency_p95_ms: float | None = Field(None, validation_alias=AliasChoices(
        "latency_p95_ms", "p95_ms"))
    latency_p99_ms: float | None = Field(None, validation_alias=AliasChoices(
        "latency_p99_ms", "p99_ms"))
    # Successful streamed answers: the samples of time to first token, inter-token
    # latency and output rate.
    ttft_samples: int = 0
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = Field(None, validation_alias=AliasChoices(
        "itl_p50_ms", "time_per_output_token_ms"))
    itl_p95_ms: float | None = None
    itl_p99_ms: float | None = None
    output_tokens_per_s: float | None = None
    # The monitor's look only.
    inflight: int = 0
    queued: float | None = None
    memory_mb: float | None = None
    memory_percent: float | None = None
    cpu_percent: float | None = None
    kv_cache_usage: float | None = None
    custom: dict[str, float] = Field(default_factory=dict)

    def value(self, metric: Metric | str) -> float | None:
        """The figure of one catalogue metric."""
        entry = CATALOGUE[metric] if isinstance(metric, str) else metric
        value = getattr(self, entry.figure)
        return None if value is None else float(value)


class WindowSamples:
    """One version's outcomes over a window, summed over gateways: the input of a verdict.

    `samples[source]` holds the per-request samples of successful answers only: a failed
    request's latency (often a fast 500 or a long timeout) says nothing about how fast
    the version answers. Time to first token, inter-token latency and output rate come
    from successful streamed answers only: a plain answer's first token arrives with its
    last, which its latency already says.

    `judged_since` is the latest start any gateway's window could be judged from (its
    histograms keep whole minutes or hours of older traffic); `cut` names the gateways
    whose record no longer reached back to the window's start.
    """

    def __init__(self, version: str) -> None:
        self.version = version
        self.requests = 0
        self.errors = 0
        self.samples: dict[Source, Histogram] = {s: Histogram() for s in SAMPLE_SOURCES}
        self.judged_since: float | None = None
        self.cut: list[str] = []
        # First outcomes left out as a fresh engine's warm-up (summed over gateways).
        self.warmup_excluded = 0

    def add(self, requests: int, errors: int, samples: dict[Source, Histogram] | None = None,
            ) -> None:
        self.requests += requests
        self.errors += errors
        for source, histogram in (samples or {}).items():
            self.samples[Source(source)].merge(histogram)

    def add_values(self, requests: int, errors: int, latencies_ms: Sequence[float],
                   ttft_ms: Sequence[float] = ()) -> None:
        """Raw samples (simulations, in-process records)."""
        self.add(requests, errors, {Source.LATENCY: Histogram.of(latencies_ms),
                                    Source.TTFT: Histogram.of(ttft_ms)})

    def add_window(self, window: VersionWindow, gateway_id: str = "") -> None:
        """Merge one gateway's window of this version."""
        self.add(window.requests, window.errors,
                 {Source(name): Histogram(dict(bins)) for name, bins in window.samples.items()})
        if window.judged_since is not None and window.judged_since > window.since:
            self.judged_since = max(self.judged_since or window.since, window.judged_since)
        if window.cut:
            self.cut.append(gateway_id or "a gateway")
        self.warmup_excluded += window.warmup_excluded

    def values(self, source: Source) -> Samples:
        return self.samples[source]

    def figures(self) -> Figures:
        """The window's figures: counts, rates and every catalogue quantile."""
        values: dict[str, Any] = {}
        for entry in CATALOGUE.values():
            if entry.kind is Kind.RATE:
                continue
            assert entry.quantile is not None
            values[entry.figure] = quantile(self.samples[entry.source], entry.quantile)
        n = self.requests
        return Figures(version=self.version, requests=n, errors=self.errors,
                       error_rate=self.errors / n if n else None,
                       success_rate=(n - self.errors) / n if n else None,
                       ttft_samples=count(self.samples[Source.TTFT]), **values)
