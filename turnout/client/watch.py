"""The CLI's `--watch` loop: fetch, render, redraw in place on a terminal; print each
change as plain text anywhere else (a CI log, a pipe, `| tee`).

A watch only reads: Ctrl-C (KeyboardInterrupt) ends the watch, never what is watched.
An API that stops answering for a moment (a restart, a Temporal hiccup) is shown in the
view and retried at the next interval rather than ending the watch.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from turnout.sdk import TurnoutAPIError

T = TypeVar("T")
Render = Callable[[T, datetime, bool], RenderableType]


def _transient(exc: Exception) -> bool:
    """Worth retrying: the API is away or answers 5xx (503 while Temporal reconnects)."""
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, TurnoutAPIError) and exc.status_code >= 500


def _plain_text(renderable: RenderableType, width: int) -> str:
    text = io.StringIO()
    capture = Console(file=text, width=width, no_color=True, force_terminal=False,
                      color_system=None, highlight=False, emoji=False)
    capture.print(renderable)
    return text.getvalue()


def watch(fetch: Callable[[], T], render: Render[T], *, done: Callable[[T], bool],
          interval_s: float, console: Console | None = None,
          once: bool = False) -> T:
    """Show `render(fetch(), now, plain)` every `interval_s` until `done(data)`; returns the
    last data. `once`: one look (no loop), shown as the watch would show it."""
    console = console or Console()
    if console.is_terminal:
        with Live(console=console, auto_refresh=False, redirect_stdout=False,
                  redirect_stderr=False) as live:
            return _loop(fetch, render, done, interval_s, once,
                         lambda view: live.update(view, refresh=True), plain=False)
    last = ""

    def show(view: RenderableType) -> None:
        nonlocal last
        text = _plain_text(view, console.width)
        if text != last:  # plain output is a log: a new block only when something changed
            console.file.write(f"--- {datetime.now().astimezone():%H:%M:%S}\n{text}")
            console.file.flush()
            last = text

    return _loop(fetch, render, done, interval_s, once, show, plain=True)


def _loop(fetch: Callable[[], T], render: Render[T], done: Callable[[T], bool],
          interval_s: float, once: bool, show: Callable[[RenderableType], None], *,
          plain: bool) -> T:
    data: T | None = None
    while True:
        try:
            data = fetch()
        except Exception as exc:
            if not _transient(exc) or once:
                raise
            problem = Text(f"the API does not answer ({exc}); trying again every "
                           f"{interval_s:g} s", style="" if plain else "yellow")
            show(problem if data is None else Group(render(data, _now(), plain), problem))
        else:
            show(render(data, _now(), plain))
            if once or done(data):
                return data
        time.sleep(interval_s)


def _now() -> datetime:
    return datetime.now(UTC)
