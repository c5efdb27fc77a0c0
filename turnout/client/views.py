"""What the CLI's live views show: a switch (weights, step, last verdict, next check, the
controls legal now), the operations list and the engine fleet, built from the REST API's
JSON as `rich` renderables.

Pure functions of the API's answers and the time: the watch loop (`turnout.client.watch`)
fetches and redraws, these decide what a person reads. `plain=True` gives the same
content in ASCII for output that is not a terminal (a CI log, a pipe).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from turnout.domain import OperationStatus, Outcome

BAR_WIDTH = 30

# How a watched switch ends, as the process's exit code: 0 only when the target was
# promoted, so a script or a CI job can gate on `turnout switch ... --watch`.
EXIT_CODES: dict[str, int] = {
    Outcome.PROMOTED: 0,
    Outcome.ROLLED_BACK: 3,
    Outcome.ABORTED: 4,
    Outcome.LOAD_FAILED: 5,
    Outcome.ERROR: 6,
}
EXIT_FAILED_UNKNOWN = 6  # failed without an outcome (a switch from before outcomes)
EXIT_INTERRUPTED = 130  # Ctrl-C: the watch stopped, the switch goes on

# Phases in which the switch is already ending on its own: no control is offered.
_ENDING_PHASES = {"rolling_back", "marking_live", "draining", "unloading", "completed",
                  "failed"}

_OUTCOME_STYLE = {"healthy": "green", "unhealthy": "red", "inconclusive": "yellow"}


def exit_code(status: dict[str, Any]) -> int | None:
    """The exit code for a switch that has ended (None while it runs)."""
    if not OperationStatus(status["status"]).terminal:
        return None
    if status["status"] == OperationStatus.COMPLETED:
        return 0
    return EXIT_CODES.get(status.get("outcome") or "", EXIT_FAILED_UNKNOWN)


def legal_actions(status: dict[str, Any]) -> list[str]:
    """The operator controls the switch accepts now (the workflow's update validators
    refuse the others): none once it has ended or is ending on its own; a paused switch
    resumes (unless an A/B test waits for its decision), a running one pauses; promote,
    rollback and abort while it is in progress."""
    state = OperationStatus(status["status"])
    if state.terminal or status.get("phase") in _ENDING_PHASES:
        return []
    if state is OperationStatus.PAUSED:
        first = [] if status.get("phase") == "awaiting_decision" else ["resume"]
    else:
        first = ["pause"]
    return [*first, "promote", "rollback", "abort"]


def _when(value: str | None, now: datetime, *, plain: bool) -> str:
    """`14:32:05 (in 12 s)` in local time, from the API's ISO time; plain output (printed
    anew at each change, not redrawn) says only the time, which does not tick."""
    if not value:
        return "-"
    at = datetime.fromisoformat(value)
    if plain:
        return f"{at.astimezone():%H:%M:%S}"
    seconds = (at - now).total_seconds()
    relative = f"in {seconds:.0f} s" if seconds >= 0 else f"{-seconds:.0f} s ago"
    return f"{at.astimezone():%H:%M:%S} ({relative})"


def weight_bar(percent: float, *, plain: bool, width: int = BAR_WIDTH) -> str:
    filled = round(width * max(0.0, min(100.0, percent)) / 100)
    full, empty = ("#", "-") if plain else ("█", "░")
    return full * filled + empty * (width - filled)


def _figure(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f}%" if kind == "rate" else f"{value:.1f} ms"


def _change(entry: dict[str, Any]) -> str:
    change = entry.get("change")
    if change is None:
        return "-"
    if entry.get("kind") == "rate":
        return f"{change * 100:+.2f} pt"
    return f"{change * 100:+.0f}%"


def _result(entry: dict[str, Any]) -> str:
    if entry.get("failed"):
        return "FAILED"
    if entry.get("compared"):
        return "ok"
    return entry.get("note") or "not compared"


def verdict_table(verdict: dict[str, Any], *, plain: bool) -> Table:
    """One row per guarded metric: target and stable figures, the change, the p-value
    against the level it was tested at, and whether it failed."""
    table = Table(box=box.ASCII if plain else box.SIMPLE_HEAD, pad_edge=False,
                  show_edge=plain)
    for column in ("metric", "target", "stable", "change", "p", "result"):
        table.add_column(column, justify="left" if column in ("metric", "result")
                         else "right")
    samples = verdict.get("target", {}).get("requests", 0)
    stable = verdict.get("stable") or {}
    for entry in (verdict.get("analysis") or {}).get("metrics", {}).values():
        p = entry.get("p_value")
        table.add_row(entry.get("label") or entry.get("metric", "?"),
                      _figure(entry.get("target"), entry.get("kind", "")),
                      _figure(entry.get("stable"), entry.get("kind", "")),
                      _change(entry),
                      "-" if p is None else f"{p:.3g} (level {entry.get('alpha', 0):.3g})",
                      _result(entry),
                      style="red" if entry.get("failed") and not plain else None)
    table.caption = (f"{samples} target requests, {stable.get('requests', 0)} stable "
                     f"({stable.get('version') or 'none'})")
    return table


def switch_view(status: dict[str, Any], now: datetime, *, plain: bool = False
                ) -> RenderableType:
    """A switch as the operator follows it: what, where it stands, the split, the last
    verdict metric by metric, the next check and what may be done now."""
    parts: list[RenderableType] = []
    op = status.get("operation_id", "?")
    from_version = status.get("from_version") or "nothing"
    parts.append(Text.assemble(
        (f"{status.get('strategy', '?')} ", "bold"),
        f"switch of {status.get('model_id', '?')}: {from_version} → "
        f"{status.get('target_version', '?')}   operation {op}"))
    step, total = status.get("step", 0), status.get("total_steps", 0)
    state = status.get("status", "?")
    parts.append(Text(f"status {state}   phase {status.get('phase', '?')}   "
                      f"step {step} of {total}   progress "
                      f"{status.get('progress', 0) * 100:.0f}%"))
    if status.get("message"):
        parts.append(Text(f"  {status['message']}", style="" if plain else "italic"))
    weights: dict[str, float] = status.get("weights") or {}
    if weights:
        width = max(len(v) for v in weights)
        for version, percent in sorted(weights.items()):
            role = "target" if version == status.get("target_version") else "stable"
            parts.append(Text(f"  {version:<{width}} {weight_bar(percent, plain=plain)} "
                              f"{percent:5.1f}%  {role}"))
    verdict = status.get("last_verdict")
    verdicts = status.get("verdicts") or []
    if verdict:
        outcome = verdict.get("outcome", "?")
        parts.append(Text.assemble(
            f"last check ({status.get('verdict_count') or len(verdicts)} so far): ",
            (outcome, "" if plain else _OUTCOME_STYLE.get(outcome, "")),
            f" — {verdict.get('reason', '')}"))
        if (verdict.get("analysis") or {}).get("metrics"):
            parts.append(verdict_table(verdict, plain=plain))
    else:
        parts.append(Text("last check: none yet"))
    if status.get("next_check_at"):
        parts.append(Text(f"next check {_when(status['next_check_at'], now, plain=plain)}"))
    code = exit_code(status)
    if code is not None:
        outcome = status.get("outcome") or state
        parts.append(Text.assemble(("ended: ", "bold"), f"{outcome}"
                                   + (f" — {status['reason']}" if status.get("reason") else "")
                                   + f" (exit code {code})"))
    else:
        actions = legal_actions(status)
        parts.append(Text("actions now: " + ("  ".join(f"turnout {a} {op}" for a in actions)
                                             if actions else "none (the switch is ending)")))
    return Group(*parts)


def operations_view(operations: list[dict[str, Any]],
                    live: dict[str, dict[str, Any]], *, plain: bool = False) -> Table:
    """Switching operations, newest first; `live` holds the status of those still active
    (their phase and the target's share)."""
    table = Table(title="switching operations", box=box.ASCII if plain else box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    for column in ("operation", "model", "target", "strategy", "status", "phase",
                   "target %", "outcome", "started"):
        # The id whole: it is what `turnout status OP --watch` needs.
        table.add_column(column, no_wrap=column in ("operation", "status", "phase", "target %"))
    for op in operations:
        current = live.get(op["operation_id"], {})
        weight = (current.get("weights") or {}).get(op["target_version"])
        started = op.get("created_at")
        table.add_row(op["operation_id"], op["model_id"], op["target_version"], op["strategy"],
                      op["status"], current.get("phase", "-"),
                      "-" if weight is None else f"{weight:g}%", op.get("outcome") or "-",
                      f"{datetime.fromisoformat(started).astimezone():%H:%M:%S}"
                      if started else "-")
    return table


def _gib(value: int | None) -> str:
    return "-" if not value else f"{value / 2 ** 30:.2f} GiB"


def engines_view(fleet: dict[str, Any], *, plain: bool = False) -> RenderableType:
    """`GET /engines`: hosts with capacity, used and free memory; engines with their role
    (serving, candidate, shadow, preloaded, standby, idle), state and holders."""
    style = box.ASCII if plain else box.SIMPLE_HEAD
    hosts = Table(title="engine hosts", box=style)
    for column in ("host", "live", "memory", "used", "free", "engines", "cached"):
        hosts.add_column(column)
    for host in fleet.get("hosts", []):
        capacity = host.get("capacity", {})
        hosts.add_row(host["host_id"], "yes" if host.get("live") else "NO",
                      _gib(capacity.get("memory_bytes")), _gib(host.get("used_bytes")),
                      _gib(host.get("free_bytes")), str(host.get("engines", 0)),
                      f"{host.get('cached', 0)}/{capacity.get('max_cached_models', '-')}")
    engines = Table(title="engines", box=style)
    for column in ("model", "version", "host", "port", "role", "state", "memory", "held by"):
        engines.add_column(column)
    for engine in fleet.get("engines", []):
        state = engine.get("state", "?") + (" (sleeping)" if engine.get("sleeping") else "")
        engines.add_row(engine["model_id"], engine["version"], engine["host"],
                        "external" if engine.get("external") else str(engine.get("port") or "-"),
                        engine.get("role", "?"), state, _gib(engine.get("memory_bytes")),
                        ", ".join(engine.get("held_by") or []) or "-")
    return Group(hosts, engines)
