"""The metric catalogue: every figure turnout measures per version, defined once.

A *source* is a kind of per-request sample the gateway measures (latency, time to first
token, inter-token latency, output rate) or the request counts. A *metric* is one figure
computed from a source (the p95 of latency, the error rate of the counts) that verdicts
compare, the monitor shows and `analysis.guarded_metrics` may name. The analysis, the
monitor, the in-process `HealthMonitor`, the API's validation of `guarded_metrics`, the
gateway's Prometheus series and the README's table all read this module, so adding a
guarded metric is one entry here (plus, for a new source, its measurement in the gateway).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Direction = Literal["lower_is_better", "higher_is_better"]
LOWER: Direction = "lower_is_better"
HIGHER: Direction = "higher_is_better"


class Kind(StrEnum):
    """How a metric is computed and compared."""

    RATE = "rate"  # a share of requests; compared with Fisher's exact test
    QUANTILE = "quantile"  # a quantile of per-request times; Mann-Whitney U
    THROUGHPUT = "throughput"  # a quantile of per-request rates; Mann-Whitney U


class Source(StrEnum):
    """What a metric's samples are, as the gateway measures them per request."""

    REQUESTS = "requests"  # counts: requests answered and the version's errors
    LATENCY = "latency"  # ms from request to last byte, successful answers
    TTFT = "ttft"  # ms to the first streamed token, successful streamed answers
    ITL = "itl"  # ms between tokens of one successful streamed answer (its mean)
    OUTPUT_RATE = "output_rate"  # tokens/s of one successful streamed answer after its first


@dataclass(frozen=True)
class SourceInfo:
    """A per-request sample source: its unit and its Prometheus histogram.

    `prometheus` follows vLLM's names (`vllm:e2e_request_latency_seconds`,
    `vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`); `aliases`
    are the names earlier releases exported, still rendered for one release so that
    dashboards keep working while they move.
    """

    source: Source
    unit: str
    description: str
    prometheus: str
    prometheus_help: str
    aliases: tuple[str, ...] = ()
    # Samples are in `unit`; the Prometheus histogram is in seconds (or tokens/s).
    prometheus_scale: float = 0.001


SAMPLE_SOURCES: dict[Source, SourceInfo] = {
    Source.LATENCY: SourceInfo(
        Source.LATENCY, "ms", "request to last byte of successful answers",
        "turnout_gateway_e2e_request_latency_seconds",
        "Time from request to last byte of the answer",
        aliases=("turnout_gateway_request_latency_seconds",)),
    Source.TTFT: SourceInfo(
        Source.TTFT, "ms", "time to first token of successful streamed answers",
        "turnout_gateway_time_to_first_token_seconds",
        "Time to the first streamed token of an answer",
        aliases=("turnout_gateway_time_to_first_byte_seconds",)),
    Source.ITL: SourceInfo(
        Source.ITL, "ms", "inter-token latency (time per output token) of successful "
        "streamed answers", "turnout_gateway_inter_token_latency_seconds",
        "Mean time between streamed tokens of an answer"),
    Source.OUTPUT_RATE: SourceInfo(
        Source.OUTPUT_RATE, "tokens/s", "output tokens per second of successful streamed "
        "answers, after their first token", "turnout_gateway_output_tokens_per_second",
        "Output tokens per second of a streamed answer after its first token",
        prometheus_scale=1.0),
}


@dataclass(frozen=True)
class Metric:
    """One figure of a version over a window.

    `figure` is the field of `turnout.telemetry.figures.Figures` that holds its value;
    `quantile` is None for rates. `test` is the one-sided test a verdict compares target
    and stable with.
    """

    name: str
    source: Source
    kind: Kind
    direction: Direction
    unit: str
    label: str
    figure: str
    quantile: float | None = None

    @property
    def test(self) -> str:
        return "fisher_exact" if self.kind is Kind.RATE else "mann_whitney_u"

    @property
    def higher_is_better(self) -> bool:
        return self.direction == HIGHER


def _quantiles(prefix: str, source: Source, what: str, kind: Kind = Kind.QUANTILE,
               direction: Direction = LOWER) -> list[Metric]:
    info = SAMPLE_SOURCES[source]
    return [Metric(name=f"{prefix}_p{int(q * 100)}", source=source, kind=kind,
                   direction=direction, unit=info.unit, quantile=q,
                   label=f"p{int(q * 100)} {what}",
                   figure=f"{prefix}_p{int(q * 100)}_ms")
            for q in (0.50, 0.95, 0.99)]


_METRICS: list[Metric] = [
    Metric("error_rate", Source.REQUESTS, Kind.RATE, LOWER, "fraction", "error rate",
           "error_rate"),
    Metric("success_rate", Source.REQUESTS, Kind.RATE, HIGHER, "fraction", "success rate",
           "success_rate"),
    *_quantiles("latency", Source.LATENCY, "latency"),
    *_quantiles("ttft", Source.TTFT, "time to first token"),
    *_quantiles("itl", Source.ITL, "inter-token latency"),
    # The median answer's output rate: a throughput, better when higher.
    Metric("output_tokens_per_s", Source.OUTPUT_RATE, Kind.THROUGHPUT, HIGHER, "tokens/s",
           "output tokens per second", "output_tokens_per_s", quantile=0.5),
]

CATALOGUE: dict[str, Metric] = {m.name: m for m in _METRICS}
METRIC_NAMES: tuple[str, ...] = tuple(CATALOGUE)
# What a rollout guards when its `analysis` names no metrics.
DEFAULT_GUARDED: tuple[str, ...] = ("error_rate", "latency_p95", "ttft_p95")


def metric(name: str) -> Metric:
    """The catalogue entry of `name`; a `ValueError` naming the known metrics otherwise."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)}") \
            from None


def quantile_metrics(source: Source) -> list[Metric]:
    """The catalogue's quantiles of one sample source, lowest quantile first."""
    return [m for m in _METRICS if m.source is source and m.quantile is not None]
