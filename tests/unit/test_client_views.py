"""The CLI's live views: which controls are offered in which phase, the exit code of each
ending, and what a person reads (rendered with rich's recording console)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console

from turnout.client.views import (
    engines_view,
    exit_code,
    legal_actions,
    operations_view,
    switch_view,
)
from turnout.telemetry.figures import WindowSamples
from turnout.telemetry.verdicts import HealthThresholds, judge

NOW = datetime(2026, 12, 1, 14, 30, tzinfo=UTC)


def Sample(version: str, requests: int, errors: int,  # noqa: N802 - reads as a type
           latencies: list[float]) -> WindowSamples:
    """A version's window from raw samples."""
    sample = WindowSamples(version)
    sample.add_values(requests, errors, latencies, [])
    return sample


def render(renderable: Any, *, terminal: bool = True) -> str:
    console = Console(file=io.StringIO(), width=120, record=True, force_terminal=terminal,
                      color_system="truecolor" if terminal else None)
    console.print(renderable)
    return console.export_text()


def canary_status(**changes: Any) -> dict[str, Any]:
    verdict = judge(Sample("v2", 200, 1, [10.0 + i % 5 for i in range(199)]),
                    Sample("v1", 800, 2, [10.0 + i % 5 for i in range(798)]),
                    HealthThresholds())
    status = {"operation_id": "op-1", "model_id": "M_chat", "target_version": "v2",
              "from_version": "v1", "strategy": "canary", "status": "running",
              "phase": "evaluating", "progress": 0.37, "weights": {"v1": 80.0, "v2": 20.0},
              "step": 1, "total_steps": 3, "message": "canary at 20%, next check at 14:30:12",
              "next_check_at": (NOW + timedelta(seconds=12)).isoformat(),
              "last_verdict": verdict.model_dump(mode="json"),
              "verdicts": [verdict.model_dump(mode="json")], "outcome": None, "reason": None}
    return {**status, **changes}


@pytest.mark.parametrize(("status", "phase", "expected"), [
    ("running", "evaluating", ["pause", "promote", "rollback", "abort"]),
    ("running", "loading", ["pause", "promote", "rollback", "abort"]),
    ("paused", "paused", ["resume", "promote", "rollback", "abort"]),
    # An A/B test waiting for its decision: resuming is refused by the workflow.
    ("paused", "awaiting_decision", ["promote", "rollback", "abort"]),
    ("running", "rolling_back", []),
    ("running", "marking_live", []),
    ("completed", "completed", []),
    ("failed", "failed", []),
])
def test_legal_actions_follow_the_phase(status: str, phase: str, expected: list[str]) -> None:
    assert legal_actions({"status": status, "phase": phase}) == expected


@pytest.mark.parametrize(("status", "outcome", "code"), [
    ("running", None, None), ("paused", None, None), ("pending", None, None),
    ("completed", "promoted", 0), ("failed", "rolled_back", 3), ("failed", "aborted", 4),
    ("failed", "load_failed", 5), ("failed", "error", 6), ("failed", None, 6),
])
def test_exit_code_is_zero_only_when_promoted(status: str, outcome: str | None,
                                              code: int | None) -> None:
    assert exit_code({"status": status, "outcome": outcome}) == code


def test_a_running_canary_shows_split_step_verdict_next_check_and_actions() -> None:
    text = render(switch_view(canary_status(), NOW))
    assert "canary switch of M_chat: v1 → v2   operation op-1" in text
    assert "status running   phase evaluating   step 1 of 3   progress 37%" in text
    assert "v1 " + "█" * 24 + "░" * 6 + "  80.0%  stable" in text
    assert "v2 " + "█" * 6 + "░" * 24 + "  20.0%  target" in text
    assert "last check (1 so far): healthy" in text
    # One row per default guarded metric, target against stable.
    for label in ("error rate", "p95 latency", "p95 time to first token"):
        assert label in text, text
    assert "0.50%" in text and "0.25%" in text and "FAILED" not in text  # 1/200 vs 2/800
    assert "200 target requests, 800 stable (v1)" in text
    assert "next check" in text and "(in 12 s)" in text
    assert "actions now: turnout pause op-1  turnout promote op-1  turnout rollback op-1  " \
           "turnout abort op-1" in text


def test_a_failed_metric_and_the_ending_are_named() -> None:
    worse = judge(Sample("v2", 200, 40, [30.0] * 160), Sample("v1", 800, 0, [10.0] * 800),
                  HealthThresholds())
    status = canary_status(status="failed", phase="failed", outcome="rolled_back",
                           reason=worse.reason, last_verdict=worse.model_dump(mode="json"),
                           next_check_at=None, weights={"v1": 100.0}, message="failed")
    text = render(switch_view(status, NOW))
    assert "last check (1 so far): unhealthy" in text
    assert "FAILED" in text
    assert "ended: rolled_back" in text and "(exit code 3)" in text
    assert "actions now" not in text and "next check" not in text, text


def test_plain_output_has_no_escapes_and_no_ticking_clock() -> None:
    text = render(switch_view(canary_status(), NOW, plain=True), terminal=False)
    assert "\x1b" not in text and "█" not in text
    assert "v2 " + "#" * 6 + "-" * 24 + "  20.0%  target" in text
    # A plain log prints a block per change: a countdown would change it every second.
    assert "next check" in text and "(in " not in text


def test_operations_and_engines_tables() -> None:
    operations = [{"operation_id": "a" * 32, "model_id": "M_chat", "target_version": "v2",
                   "strategy": "canary", "status": "running", "outcome": None,
                   "created_at": NOW.isoformat()},
                  {"operation_id": "b" * 32, "model_id": "M_chat", "target_version": "v1",
                   "strategy": "immediate", "status": "completed", "outcome": "promoted",
                   "created_at": NOW.isoformat()}]
    text = render(operations_view(operations, {"a" * 32: canary_status()}))
    assert "a" * 32 in text and "b" * 32 in text  # whole: `turnout status OP` needs it
    assert "evaluating" in text and "20%" in text and "promoted" in text
    fleet = {"hosts": [{"host_id": "gpu-1", "live": True, "capacity": {
        "memory_bytes": 8 * 2 ** 30, "max_cached_models": 5}, "used_bytes": 2 ** 30,
        "free_bytes": 7 * 2 ** 30, "engines": 1, "cached": 0}],
        "engines": [{"model_id": "M_chat", "version": "v2", "host": "gpu-1", "port": 8101,
                     "role": "candidate", "state": "ready", "memory_bytes": 2 ** 30,
                     "held_by": ["switch:op-1"], "sleeping": False}]}
    text = render(engines_view(fleet, plain=True), terminal=False)
    assert "gpu-1" in text and "8.00 GiB" in text and "7.00 GiB" in text and "0/5" in text
    assert "candidate" in text and "switch:op-1" in text and "8101" in text
