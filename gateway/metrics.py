"""Per-version request metrics of one gateway: Prometheus series and an in-memory window.

Prometheus series (on a per-app registry, so tests can run several gateways in one process)
are for dashboards; the in-memory window backs `/admin/stats` and `/admin/state`, which the
traffic and health activities read directly (in-flight counts for draining, latency
percentiles for health verdicts) without needing a Prometheus server.

Stats of a version that no longer takes traffic are forgotten after a retention period
(`forget_unrouted`), so memory and the number of series stay bounded over any number of
rollouts; see `GATEWAY_STATS_RETENTION_S` for why the default is a day.

Health verdicts need figures over a time window, merged across gateways, and windows may
last days (a 48-hour A/B test). Each version keeps a timestamped outcome per finished
request (`outcomes`: latency, error, time to first token and inter-token latency of a
streamed answer) for the last hour (at most `OUTCOMES` of them), and folds older outcomes
into per-minute histograms (`turnout.telemetry.sketch`), rolled up into per-hour ones after
a day and kept for `SKETCH_RETENTION_S`. A window `[since, until]` is answered as
histograms (`turnout.gateway_protocol.VersionWindow`), which add up exactly across
gateways; what the minute or hour histograms cannot split is left out and said
(`judged_since`), and a window reaching past what is kept says it was cut (`cut`).
Folding runs in the gateway's once-a-second loop (`fold`), not on the request path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from turnout.gateway_protocol import Summary, VersionWindow
from turnout.gateway_protocol import VersionStats as VersionStatsView
from turnout.telemetry.catalogue import SAMPLE_SOURCES, Source
from turnout.telemetry.sketch import Histogram
from turnout.telemetry.statistics import quantile

log = logging.getLogger("gateway.metrics")

VersionKey = tuple[str, str]  # (model id, version)

# LLM requests run from tens of milliseconds (cache hit, tiny model) to minutes (long output).
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
                     120.0, 300.0)
# Time to first byte of a stream: queueing plus prefill.
TTFB_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Mean time between streamed tokens of one answer.
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
# Output tokens per second of one streamed answer, after its first token.
TOKENS_PER_S_BUCKETS = (1, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500)
# How many recent samples per version the in-memory percentiles are computed from.
WINDOW = 2048
# Timestamped outcomes kept raw per version (windows end exactly where they ask): an
# hour's worth, but at most this many (~30 MB; at 100 req/s that is 33 minutes). Older
# outcomes are folded into minute histograms.
OUTCOMES = 200_000
RAW_KEEP_S = 3600.0
# Minute histograms are rolled into hour histograms after a day; hours are kept for 31
# days, the longest window a switch asks for (an A/B test lasts at most 30 days).
MINUTE_KEEP_S = 24 * 3600.0
SKETCH_RETENTION_S = 31 * 24 * 3600.0
# How far before a window's start its backward scan goes on, for wall-clock steps back.
CLOCK_SLACK_S = 60.0
# How long the stats of a version that left every route (and has nothing in flight) are
# kept, unless the gateway is told otherwise (`GATEWAY_STATS_RETENTION_S`).
STATS_RETENTION_S = 24 * 3600.0
# Failure classes that are the version's fault (its error rate); a 4xx is the request's.
VERSION_FAULTS = frozenset({"connect", "timeout", "5xx", "stream_broken"})


def _summary(samples: deque[float]) -> Summary:
    values = list(samples)
    return Summary(p50=quantile(values, 0.50), p95=quantile(values, 0.95),
                   p99=quantile(values, 0.99), count=len(values))


# One finished request: (unix time at completion, latency ms, is error, time to first
# token ms or None, inter-token latency ms or None), in completion order.
Outcome = tuple[float, float, bool, float | None, float | None]


@dataclass
class Slice:
    """Outcomes of one minute or one hour, as counts and histograms. `first_at` and
    `last_at` are the times of its first and last outcome: a window takes the slice when
    both lie inside it."""

    first_at: float = math.inf
    last_at: float = -math.inf
    requests: int = 0
    errors: int = 0
    samples: dict[Source, Histogram] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        self.first_at = min(self.first_at, outcome[0])
        self.last_at = max(self.last_at, outcome[0])
        self.requests += 1
        if outcome[2]:
            self.errors += 1
            return
        _add_samples(self.samples, outcome)

    def merge(self, other: Slice) -> None:
        self.first_at = min(self.first_at, other.first_at)
        self.last_at = max(self.last_at, other.last_at)
        self.requests += other.requests
        self.errors += other.errors
        for source, histogram in other.samples.items():
            self.samples.setdefault(source, Histogram()).merge(histogram)


def _add_samples(samples: dict[Source, Histogram], outcome: Outcome) -> None:
    """A successful outcome's samples, one per source it has."""
    _, latency_ms, _, ttft_ms, itl_ms = outcome
    samples.setdefault(Source.LATENCY, Histogram()).add(latency_ms)
    if ttft_ms is not None:
        samples.setdefault(Source.TTFT, Histogram()).add(ttft_ms)
    if itl_ms is not None and itl_ms > 0:
        samples.setdefault(Source.ITL, Histogram()).add(itl_ms)
        samples.setdefault(Source.OUTPUT_RATE, Histogram()).add(1000.0 / itl_ms)


class BucketCounts:
    """A Prometheus histogram's state as plain numbers, rendered only when scraped.

    `prometheus_client`'s own series take a lock and a label lookup per update (about
    5 us each here, ~65 us per streamed request over nine updates); the gateway updates
    them from one event-loop thread, so plain integers are safe and ten times cheaper.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Buckets are "less than or equal": the first bound >= value takes it.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        result: list[tuple[str, float]] = []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result


@dataclass
class VersionStats:
    """Counters of one (model id, version) since the gateway started, its recent outcomes
    and the histograms of older ones."""

    requests: int = 0
    errors: int = 0
    inflight: int = 0
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    ttfb_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    itl_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    tokens_per_s: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    output_tokens: int = 0
    outcomes: deque[Outcome] = field(default_factory=deque)
    # Everything that finished before `folded_until` is in `minutes` or `hours` (keyed by
    # their start); `dropped_until` is the last outcome of the newest histogram dropped as
    # too old.
    minutes: dict[int, Slice] = field(default_factory=dict)
    hours: dict[int, Slice] = field(default_factory=dict)
    folded_until: float = -math.inf
    dropped_until: float = -math.inf
    latency_s: BucketCounts = field(default_factory=lambda: BucketCounts(LATENCY_BUCKETS_S))
    ttfb_s: BucketCounts = field(default_factory=lambda: BucketCounts(TTFB_BUCKETS_S))
    itl_s: BucketCounts = field(default_factory=lambda: BucketCounts(ITL_BUCKETS_S))
    tokens_per_s_hist: BucketCounts = field(
        default_factory=lambda: BucketCounts(TOKENS_PER_S_BUCKETS))

    def histogram_of(self, source: Source) -> BucketCounts:
        """The Prometheus histogram of one sample source."""
        return {Source.LATENCY: self.latency_s, Source.TTFT: self.ttfb_s,
                Source.ITL: self.itl_s, Source.OUTPUT_RATE: self.tokens_per_s_hist}[source]

    def view(self) -> VersionStatsView:
        return VersionStatsView(
            requests=self.requests, errors=self.errors, inflight=self.inflight,
            latency_ms=_summary(self.latency_ms), ttfb_ms=_summary(self.ttfb_ms),
            itl_ms=_summary(self.itl_ms), tokens_per_s=_summary(self.tokens_per_s),
            output_tokens=self.output_tokens)

    def fold(self, now: float) -> None:
        """Fold outcomes older than `RAW_KEEP_S` (or beyond `OUTCOMES`) into minute
        histograms, whole minutes at a time; roll minutes older than a day into hours;
        drop hours beyond `SKETCH_RETENTION_S`."""
        outcomes = self.outcomes
        boundary = math.floor((now - RAW_KEEP_S) / 60) * 60.0
        if len(outcomes) > OUTCOMES:
            boundary = max(boundary, math.floor(outcomes[-OUTCOMES - 1][0] / 60) * 60.0 + 60)
        while outcomes and outcomes[0][0] < boundary:
            outcome = outcomes.popleft()
            start = math.floor(outcome[0] / 60) * 60
            piece = self.minutes.get(start)
            if piece is None:
                piece = self.minutes[start] = Slice()
            piece.add(outcome)
        if outcomes or self.minutes:
            self.folded_until = max(self.folded_until, boundary)
        for start in [m for m in self.minutes if m + 60 <= now - MINUTE_KEEP_S]:
            minute = self.minutes.pop(start)
            hour_start = start // 3600 * 3600
            hour = self.hours.get(hour_start)
            if hour is None:
                self.hours[hour_start] = minute
            else:
                hour.merge(minute)
        for start in [h for h in self.hours if h + 3600 <= now - SKETCH_RETENTION_S]:
            self.dropped_until = max(self.dropped_until, self.hours.pop(start).last_at)

    def warmup_end(self, since: float, until: float, requests: int) -> tuple[float, int]:
        """Just after the `requests`-th outcome in [since, until] (its warm-up), and how
        many outcomes that leaves out (all of them, and `until`, when there are fewer)."""
        times = sorted(o[0] for o in self.outcomes if since <= o[0] <= until)
        if len(times) < requests:
            return until, len(times)
        return math.nextafter(times[requests - 1], math.inf), requests

    def window(self, since: float, until: float) -> VersionWindow:
        """Outcomes finished in [since, until] as histograms: counts plus the samples of
        successes (latency) and of successful streamed answers (time to first token,
        inter-token latency, output rate).

        Recent outcomes are scanned from the newest back, so a look at the last few
        seconds costs a few seconds' worth of outcomes, not the whole buffer (the monitor
        asks every interval). Outcomes are stamped with the wall clock in completion
        order, so they are sorted but for clock steps; the scan goes `CLOCK_SLACK_S` past
        `since`. Older traffic comes from the minute and hour histograms that lie wholly
        inside the window: one that straddles `since` is left out, and `judged_since`
        says where the window then really starts (after that slice's last outcome).
        """
        judged_since = since
        pieces: list[Slice] = []
        if since < self.folded_until:
            slices = [*self.hours.values(), *self.minutes.values()]
            straddling = [p.last_at for p in slices if p.first_at < since <= p.last_at]
            if straddling:
                judged_since = math.nextafter(max(straddling), math.inf)
            pieces = [p for p in slices if p.first_at >= judged_since and p.last_at <= until]
        window = VersionWindow(since=since, until=until, judged_since=judged_since,
                               cut=since < self.dropped_until)
        samples: dict[Source, Histogram] = {}
        stop_before = judged_since - CLOCK_SLACK_S
        requests = errors = 0
        for outcome in reversed(self.outcomes):
            at = outcome[0]
            if at < stop_before:
                break
            if judged_since <= at <= until:
                requests += 1
                if outcome[2]:
                    errors += 1
                else:
                    _add_samples(samples, outcome)
        for piece in pieces:
            requests += piece.requests
            errors += piece.errors
            for source, histogram in piece.samples.items():
                samples.setdefault(source, Histogram()).merge(histogram)
        window.requests, window.errors = requests, errors
        window.samples = {source: h.bins for source, h in samples.items() if h}
        return window


class VersionCollector(Collector):
    """Renders the per-version series from `VersionStats` at scrape time."""

    def __init__(self, stats: dict[tuple[str, str], VersionStats]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # rendered on demand; nothing to check for name clashes up front

    def collect(self) -> Iterator[Metric]:
        labels = ["model_id", "version"]
        requests = CounterMetricFamily("turnout_gateway_requests",
                                       "Requests forwarded to a version", labels=labels)
        errors = CounterMetricFamily(
            "turnout_gateway_errors", "Requests that failed upstream (5xx or connection "
            "failure)", labels=labels)
        output_tokens = CounterMetricFamily(
            "turnout_gateway_output_tokens", "Tokens generated in answers (streamed "
            "events, or the usage of plain answers)", labels=labels)
        inflight = GaugeMetricFamily("turnout_gateway_inflight",
                                     "Requests in flight to a version", labels=labels)
        # One histogram per sample source of the catalogue, under vLLM-style names, and
        # the same series under each name earlier releases used (for one release).
        histograms = []
        for source, info in SAMPLE_SOURCES.items():
            histograms.append((HistogramMetricFamily(info.prometheus, info.prometheus_help,
                                                     labels=labels), source))
            histograms += [(HistogramMetricFamily(
                alias, f"{info.prometheus_help} (deprecated name of {info.prometheus})",
                labels=labels), source) for alias in info.aliases]
        for (model_id, version), stats in sorted(self._stats.items()):
            key = [model_id, version]
            requests.add_metric(key, stats.requests)
            errors.add_metric(key, stats.errors)
            output_tokens.add_metric(key, stats.output_tokens)
            inflight.add_metric(key, stats.inflight)
            for family, source in histograms:
                counts = stats.histogram_of(source)
                family.add_metric(key, counts.cumulative(), counts.total)
        yield from (requests, errors, output_tokens, inflight)
        yield from (family for family, _ in histograms)


class GatewayMetrics:
    """All request metrics of one gateway; cheap enough to update on every request.

    Per-request updates touch plain numbers in `VersionStats` (the Prometheus series of
    requests, errors, in-flight, latency, time to first byte, inter-token latency and
    output rate are rendered from them when `/metrics` is scraped); the rare events
    (failures by class, failovers, mirrored and skipped shadow copies, rejections, route
    generations) use ordinary series.
    """

    def __init__(self, *, retention_s: float = STATS_RETENTION_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stats: dict[tuple[str, str], VersionStats] = {}
        self.retention_s = retention_s
        self._clock = clock
        # Since when each version with stats has taken no traffic and had nothing in
        # flight (clock seconds); a version that takes traffic has no entry.
        self._idle_since: dict[VersionKey, float] = {}
        # The labelled series of the rare-event counters that name each version, so that
        # forgetting a version removes them too.
        self._series: dict[VersionKey, set[tuple[Counter, tuple[str, ...]]]] = {}
        # Versions whose route share fell to 0, and since when: their weight series goes
        # after the retention period, as idle versions' stats do.
        self._zero_weight_since: dict[VersionKey, float] = {}
        self.registry.register(VersionCollector(self._stats))
        labels = ("model_id", "version")
        self.errors_by_class = Counter(
            "turnout_gateway_upstream_errors", "Upstream failures by class (connect, "
            "timeout, 5xx, stream_broken, 4xx)", (*labels, "class"), registry=self.registry)
        self.failovers = Counter("turnout_gateway_failovers",
                                 "Requests retried after a replica of the version failed "
                                 "before the first byte: on another replica of it (to is "
                                 "the version itself) or on the stable version",
                                 ("model_id", "version", "to"), registry=self.registry)
        self.mirrored = Counter("turnout_gateway_mirrored",
                                "Requests copied to a model's shadow version (their answers "
                                "are measured, never returned)", labels, registry=self.registry)
        self.mirror_skipped = Counter("turnout_gateway_mirror_skipped",
                                      "Copies to a shadow version skipped because the "
                                      "gateway's mirror in-flight cap was reached", labels,
                                      registry=self.registry)
        self.rejected = Counter("turnout_gateway_rejected",
                                "Requests answered by the gateway itself with an error",
                                ("reason",), registry=self.registry)
        self.weight = Gauge("turnout_gateway_route_weight",
                            "Percent of a model's traffic the route this gateway serves "
                            "gives a version (dashboards draw a rollout's steps from it)",
                            ("model_id", "version"), registry=self.registry)
        self.generation = Gauge("turnout_gateway_route_generation",
                                "Route generation this gateway serves", ("model_id",),
                                registry=self.registry)

    def _get(self, model_id: str, version: str) -> VersionStats:
        key = (model_id, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = VersionStats()
        return stats

    def started(self, model_id: str, version: str) -> None:
        stats = self._get(model_id, version)
        stats.requests += 1
        stats.inflight += 1

    def first_byte(self, model_id: str, version: str, seconds: float) -> None:
        stats = self._get(model_id, version)
        stats.ttfb_ms.append(seconds * 1000.0)
        stats.ttfb_s.observe(seconds)

    def generated(self, model_id: str, version: str, tokens: int,
                  stream_seconds: float | None = None) -> float | None:
        """Tokens of one answer; for a stream, also the time from its first token to its
        last, which gives the inter-token latency and the output rate. Returns the
        inter-token latency (seconds) of a stream with two tokens or more, for the
        request's outcome (`finished`)."""
        stats = self._get(model_id, version)
        stats.output_tokens += tokens
        if stream_seconds is not None and tokens > 1 and stream_seconds > 0:
            itl = stream_seconds / (tokens - 1)
            stats.itl_ms.append(itl * 1000.0)
            stats.tokens_per_s.append(1.0 / itl)
            stats.itl_s.observe(itl)
            stats.tokens_per_s_hist.observe(1.0 / itl)
            return itl
        return None

    def finished(self, model_id: str, version: str, seconds: float, *,
                 failure: str | None = None, completed: bool = True,
                 ttfb_s: float | None = None, itl_s: float | None = None) -> None:
        """End of a request; latency is recorded only for answers that completed.

        `failure` is the error class: `connect`, `timeout`, `5xx`, `stream_broken` (the
        version's fault: counted as its errors) or `4xx` (the engine refused the request
        itself: counted by class only, never charged to the version's health).
        The windowed outcome is recorded for answers that completed and for the version's
        errors; a client that left mid-answer says nothing about the version.
        `ttfb_s` is the time to the first streamed byte the proxy measured (None for a
        plain answer, whose first token arrives with its last): it rides on the outcome
        because `first_byte` has no request id to tie it to this request's outcome, and so
        does `itl_s`, the stream's inter-token latency (`generated`'s answer).
        """
        stats = self._get(model_id, version)
        stats.inflight -= 1
        error = failure is not None and failure in VERSION_FAULTS
        if failure is not None:
            self._count(self.errors_by_class, (model_id, version, failure), version)
        if error:
            stats.errors += 1
        if completed:
            stats.latency_ms.append(seconds * 1000.0)
            stats.latency_s.observe(seconds)
        if completed or error:
            stats.outcomes.append((time.time(), seconds * 1000.0, error,
                                   None if ttfb_s is None else ttfb_s * 1000.0,
                                   None if itl_s is None else itl_s * 1000.0))

    def failed_over(self, model_id: str, failed: str, to: str) -> None:
        self._count(self.failovers, (model_id, failed, to), failed, to)

    def mirror_sent(self, model_id: str, shadow_version: str) -> None:
        self._count(self.mirrored, (model_id, shadow_version), shadow_version)

    def mirror_skip(self, model_id: str, shadow_version: str) -> None:
        self._count(self.mirror_skipped, (model_id, shadow_version), shadow_version)

    def _count(self, counter: Counter, labels: tuple[str, ...], *versions: str) -> None:
        """Count a rare event in `counter`'s series `labels` (model id first), and remember
        that the series names `versions`, so that it goes when any of their stats do."""
        counter.labels(*labels).inc()
        for version in versions:
            key = (labels[0], version)
            self._get(*key)  # every version a series names has stats to be forgotten with
            self._series.setdefault(key, set()).add((counter, labels))

    def forget_unrouted(self, routed: Collection[VersionKey]) -> list[VersionKey]:
        """Forget the stats and series of versions idle for longer than `retention_s`.

        Idle: the version is in no route (`routed`: every version with a share of a split
        or mirrored copies) and has nothing in flight. A version idle for the whole
        retention period is dropped from the windows, `/admin/stats`, `/admin/state` and
        `/metrics`; one that comes back starts from zero (Prometheus reads that as a
        counter reset). Called once a second by the gateway's reconcile loop, never on the
        request path; returns the versions forgotten.
        """
        now = self._clock()
        for key, since in list(self._zero_weight_since.items()):
            if now - since >= self.retention_s:
                del self._zero_weight_since[key]
                with contextlib.suppress(KeyError):
                    self.weight.remove(*key)
        forgotten = []
        for key, stats in list(self._stats.items()):
            if key in routed or stats.inflight > 0:
                self._idle_since.pop(key, None)
                continue
            idle_since = self._idle_since.setdefault(key, now)
            if now - idle_since < self.retention_s:
                continue
            del self._stats[key], self._idle_since[key]
            for counter, labels in self._series.pop(key, ()):
                with contextlib.suppress(KeyError):  # already gone with the other version
                    counter.remove(*labels)
            forgotten.append(key)
            log.info("forgot the stats of %s %s: in no route and idle for %.0f s", *key,
                     now - idle_since)
        return forgotten

    def route_applied(self, model_id: str, generation: int, weights: dict[str, float],
                      previous: Collection[str] = ()) -> None:
        """A new route of `model_id` is served: its generation and each version's share
        (versions of the `previous` route it no longer names go to 0, not away, so a
        dashboard sees the share fall)."""
        self.generation.labels(model_id).set(generation)
        now = self._clock()
        for version in previous:
            if version not in weights:
                self.weight.labels(model_id, version).set(0)
                self._zero_weight_since.setdefault((model_id, version), now)
        for version, percent in weights.items():
            self.weight.labels(model_id, version).set(percent)
            self._zero_weight_since.pop((model_id, version), None)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def fold(self, now: float | None = None) -> None:
        """Fold each version's older outcomes into histograms (see `VersionStats.fold`);
        called once a second by the gateway's reconcile loop."""
        at = time.time() if now is None else now
        for stats in self._stats.values():
            stats.fold(at)

    def inflight_by_model(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for (model_id, version), stats in sorted(self._stats.items()):
            result.setdefault(model_id, {})[version] = stats.inflight
        return result

    def stats_by_model(self, since: float | None = None, until: float | None = None, *,
                       model_id: str | None = None, warmup_version: str | None = None,
                       warmup_requests: int = 0
                       ) -> dict[str, dict[str, VersionStatsView]]:
        """Counters per model and version (of one model with `model_id`); with `since` or
        `until`, also each `window`.

        With `warmup_version` and `warmup_requests` (a model's new version on its first
        judged window), the first `warmup_requests` outcomes of that version after `since`
        are a fresh engine's warm-up: every version's window of that model then starts
        after them, so target and stable are still judged over the same span."""
        windowed = since is not None or until is not None
        low = -math.inf if since is None else since
        high = math.inf if until is None else until
        result: dict[str, dict[str, VersionStatsView]] = {}
        cuts: dict[str, tuple[float, int]] = {}
        if windowed and model_id is not None and warmup_version and warmup_requests > 0:
            warming = self._stats.get((model_id, warmup_version))
            if warming is not None:
                cuts[model_id] = warming.warmup_end(low, high, warmup_requests)
        for (model, version), stats in sorted(self._stats.items()):
            if model_id is not None and model != model_id:
                continue
            entry = stats.view()
            if windowed:
                cut, excluded = cuts.get(model, (low, 0))
                entry.window = stats.window(max(low, cut), high)
                entry.window.since = low
                if version == warmup_version:
                    entry.window.warmup_excluded = excluded
            result.setdefault(model, {})[version] = entry
        return result


class UnrecordedMetrics(GatewayMetrics):
    """Per-request recording switched off (`GATEWAY_REQUEST_METRICS=false`): for measuring
    the cost of recording; in-flight counts, windows and verdicts then stay empty."""

    def started(self, model_id: str, version: str) -> None:
        pass

    def first_byte(self, model_id: str, version: str, seconds: float) -> None:
        pass

    def generated(self, model_id: str, version: str, tokens: int,
                  stream_seconds: float | None = None) -> None:
        pass

    def finished(self, model_id: str, version: str, seconds: float, *,
                 failure: str | None = None, completed: bool = True,
                 ttfb_s: float | None = None, itl_s: float | None = None) -> None:
        pass
