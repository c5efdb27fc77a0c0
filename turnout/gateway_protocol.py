"""The gateway's admin surface as typed models: what a gateway sends, what activities read.

One module for both sides (as vLLM keeps each server surface's wire models in a
`protocol.py`): the gateway builds these models and serves them as JSON; the traffic,
health and monitor activities parse the JSON back into them. A key the analysis needs
cannot drift apart between the two processes, and a new per-request measurement is a
field here plus its `Source` in the catalogue.

Every field has a default, so a gateway of the previous release (no `replicas`, raw
`latencies_ms` windows) still parses: a rolling upgrade mixes both.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from turnout.telemetry.catalogue import Source
from turnout.telemetry.sketch import Histogram


class ReplicaLoad(BaseModel):
    """One replica of a version at this gateway: where, requests in flight, whether the
    gateway sends it requests now."""

    url: str = ""
    host: str = ""
    inflight: int = 0
    routed: bool = False


class AdminState(BaseModel):
    """`GET /admin/state`, also the answer of `POST /admin/routes/refresh`."""

    gateway_id: str = ""
    # The route generation applied, per model.
    generations: dict[str, int] = Field(default_factory=dict)
    # Requests in flight per model and version.
    inflight: dict[str, dict[str, int]] = Field(default_factory=dict)
    # Per model and version, each replica's load; None from gateways before replicas.
    replicas: dict[str, dict[str, list[ReplicaLoad]]] | None = None

    def generation(self, model_id: str) -> int:
        return self.generations.get(model_id, 0)

    def inflight_of(self, model_id: str, version: str) -> int:
        return self.inflight.get(model_id, {}).get(version, 0)

    def replicas_of(self, model_id: str, version: str) -> list[ReplicaLoad]:
        return (self.replicas or {}).get(model_id, {}).get(version, [])


class VersionWindow(BaseModel):
    """One version's outcomes at one gateway over [since, until] (unix seconds).

    `requests` counts the answers that completed and the version's errors; `samples`
    holds, per `Source`, the histogram of the successful answers' samples (bin index →
    count, see `turnout.telemetry.sketch`). Traffic older than the gateway's raw
    outcomes is kept as minute (and, beyond a day, hour) histograms: `judged_since` is
    then the first whole minute or hour after `since` (what is before it in the window is
    left out, and said), and `cut` is true when the gateway no longer keeps the version's
    traffic back to `since` at all.
    """

    since: float = 0.0
    until: float = 0.0
    judged_since: float | None = None
    cut: bool = False
    # The version's first outcomes of the window left out as a fresh engine's warm-up
    # (asked with `warmup_version`); every version's window then starts after them.
    warmup_excluded: int = 0
    requests: int = 0
    errors: int = 0
    samples: dict[Source, dict[int, int]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _raw_windows(cls, data: Any) -> Any:
        """A gateway of the previous release sends raw `latencies_ms` and `ttft_ms`."""
        if isinstance(data, dict) and "samples" not in data and (
                "latencies_ms" in data or "ttft_ms" in data):
            data = dict(data)
            data["samples"] = {
                Source.LATENCY: Histogram.of(data.pop("latencies_ms", ()) or ()).bins,
                Source.TTFT: Histogram.of(data.pop("ttft_ms", ()) or ()).bins}
        return data

    def histogram(self, source: Source) -> Histogram:
        return Histogram(dict(self.samples.get(source, {})))


class Summary(BaseModel):
    """p50/p95/p99 of a version's most recent samples (for people reading the stats)."""

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    count: int = 0


class VersionStats(BaseModel):
    """One version's counters at one gateway since it started, with its `window` when the
    request asked for one."""

    requests: int = 0
    errors: int = 0
    inflight: int = 0
    output_tokens: int = 0
    latency_ms: Summary = Field(default_factory=Summary)
    ttfb_ms: Summary = Field(default_factory=Summary)
    itl_ms: Summary = Field(default_factory=Summary)
    tokens_per_s: Summary = Field(default_factory=Summary)
    window: VersionWindow | None = None


class StatsResponse(BaseModel):
    """`GET /admin/stats[?since=&until=&model_id=]`: per model and version."""

    gateway_id: str = ""
    stats: dict[str, dict[str, VersionStats]] = Field(default_factory=dict)
