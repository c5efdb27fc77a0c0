"""`AlertSystem` isolation and the built-in handlers, webhooks against a real local receiver."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support import free_port
from turnout.alerting import (
    AlertSystem,
    WebhookHandler,
    handlers_from_settings,
    log_alert,
)
from turnout.config import ModelSwitchingConfig
from turnout.domain import Alert, AlertSeverity, AlertState

SECRET = "T000/B000/XXXXsecretXXXX"


def make_alert(**changes: Any) -> Alert:
    fields: dict[str, Any] = {
        "id": 7, "model_id": "m_default", "version": "v2", "type": "error_rate",
        "severity": AlertSeverity.WARNING, "title": "High error rate on m_default/v2",
        "message": "error_rate 9.0% over the warning level 5.0%"}
    return Alert(**{**fields, **changes})


# ---------------------------------------------------------------------- a real receiver


@dataclass
class Receiver:
    """An HTTP server in a thread answering POSTs with the next status of `statuses`
    (the last one repeats), after `delay_s`; keeps every body it got."""

    statuses: list[int] = field(default_factory=lambda: [200])
    delay_s: float = 0.0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/{SECRET}"


@contextmanager
def receiver(statuses: list[int] | None = None, delay_s: float = 0.0) -> Iterator[Receiver]:
    state = Receiver(statuses=statuses or [200], delay_s=delay_s)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length", 0))
            body = json.loads(self.rfile.read(length))
            status = state.statuses.pop(0) if len(state.statuses) > 1 else state.statuses[0]
            state.bodies.append(body)
            state.paths.append(self.path)
            time.sleep(state.delay_s)
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def silent_listener() -> Iterator[str]:
    """A port that accepts connections (kernel backlog) and never answers a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/services/{SECRET}"
    finally:
        sock.close()


# ---------------------------------------------------------------------- AlertSystem


async def test_every_handler_runs_whatever_the_others_do(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def raising(alert: Alert) -> None:
        raise RuntimeError("boom")

    def hanging(alert: Alert) -> None:
        time.sleep(3)
        calls.append("hanging-finished")

    async def slow_async(alert: Alert) -> None:
        await asyncio.sleep(3)

    async def async_ok(alert: Alert) -> str:
        calls.append(f"async:{alert.title}")
        return "async-done"

    def sync_ok(alert: Alert) -> str:
        calls.append(f"sync:{alert.id}")
        return "sync-done"

    async def async_raising(alert: Alert) -> None:
        raise ValueError("bad")

    system = AlertSystem([raising, hanging], handler_timeout_s=0.3)
    for handler in (slow_async, async_ok, sync_ok, async_raising):
        system.add_handler(handler)
    started = time.monotonic()
    deliveries = await system.notify(make_alert())
    assert time.monotonic() - started < 1.5  # all at once, each bounded by the timeout

    by_name = {d.handler.rsplit(".", 1)[-1]: d for d in deliveries}
    assert [d.ok for d in deliveries] == [False, False, False, True, True, False]
    assert by_name["async_ok"].result == "async-done"
    assert by_name["sync_ok"].result == "sync-done"
    assert by_name["hanging"].error == "timed out after 0.3s"
    assert by_name["raising"].error == "RuntimeError"
    assert sorted(calls) == ["async:High error rate on m_default/v2", "sync:7"]
    # Logged with the alert's context and the handler's name.
    failures = [r.getMessage() for r in caplog.records if r.name == "turnout.alerting"]
    assert any("raising" in m and "alert 7 (error_rate, warning, firing) of m_default/v2"
               in m and "RuntimeError" in m for m in failures)
    assert any("hanging" in m and "within 0.3s" in m for m in failures)
    assert any("async_raising" in m and "ValueError" in m for m in failures)


async def test_a_sync_handler_never_blocks_the_event_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    def blocking(alert: Alert) -> None:
        time.sleep(0.5)  # the guide's `requests.post` to a slow Slack

    task = asyncio.create_task(ticker())
    deliveries = await AlertSystem([blocking]).notify(make_alert())
    task.cancel()
    assert deliveries[0].ok
    assert ticks >= 20


async def test_handlers_get_their_own_copy_of_the_alert() -> None:
    seen: list[str] = []

    def vandal(alert: Alert) -> None:
        alert.title = "changed"

    def reader(alert: Alert) -> None:
        time.sleep(0.05)
        seen.append(alert.title)

    alert = make_alert()
    await AlertSystem([vandal, reader]).notify(alert)
    assert seen == [alert.title] and alert.title != "changed"


def test_send_alert_from_sync_code_waits_for_the_handlers() -> None:
    got: list[int | None] = []
    deliveries = AlertSystem([lambda a: got.append(a.id)]).send_alert(make_alert())
    assert got == [7] and [d.ok for d in deliveries] == [True]


async def test_send_alert_inside_a_running_loop_delivers_in_the_background() -> None:
    got: list[int | None] = []
    system = AlertSystem([lambda a: got.append(a.id)])
    assert system.send_alert(make_alert()) == []
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    assert got == [7]


def test_log_alert_level_follows_severity(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="turnout.alerts")
    log_alert(make_alert(severity=AlertSeverity.CRITICAL))
    log_alert(make_alert())
    log_alert(make_alert(state=AlertState.RESOLVED, severity=AlertSeverity.CRITICAL))
    records = [r for r in caplog.records if r.name == "turnout.alerts"]
    assert [r.levelno for r in records] == [logging.CRITICAL, logging.WARNING, logging.INFO]
    assert "High error rate on m_default/v2" in records[0].getMessage()


# ---------------------------------------------------------------------- webhooks


async def test_webhook_posts_slack_compatible_json(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with receiver() as rx:
        handler = WebhookHandler(rx.url, timeout_s=2, retries=0)
        assert await handler(make_alert()) is True
    assert rx.paths == [f"/services/{SECRET}"]
    body = rx.bodies[0]
    assert body["text"] == ("Model Alert: High error rate on m_default/v2\n"
                            "error_rate 9.0% over the warning level 5.0%")
    assert body["alert"]["id"] == 7 and body["alert"]["severity"] == "warning"
    assert SECRET not in caplog.text


async def test_webhook_retries_5xx_then_delivers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with receiver([500, 502, 200]) as rx:
        handler = WebhookHandler(rx.url, timeout_s=2, retries=3, backoff_s=0.01)
        deliveries = await AlertSystem([handler]).notify(make_alert())
    assert deliveries[0].ok and deliveries[0].result is True
    assert len(rx.bodies) == 3
    assert SECRET not in caplog.text


async def test_webhook_gives_up_on_a_receiver_that_always_fails(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with receiver([500]) as rx:
        handler = WebhookHandler(rx.url, timeout_s=2, retries=2, backoff_s=0.01)
        assert await handler(make_alert()) is False
    assert len(rx.bodies) == 3
    gave_up = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert gave_up and "HTTP 500" in gave_up[0] and f"127.0.0.1:{rx.port}" in gave_up[0]
    assert SECRET not in caplog.text and "/services/" not in caplog.text


async def test_webhook_does_not_retry_4xx(caplog: pytest.LogCaptureFixture) -> None:
    with receiver([404, 200]) as rx:
        handler = WebhookHandler(rx.url, timeout_s=2, retries=3, backoff_s=0.01)
        assert await handler(make_alert()) is False
    assert len(rx.bodies) == 1
    assert SECRET not in caplog.text


async def test_webhook_gives_up_on_a_receiver_that_never_answers(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with silent_listener() as url:
        handler = WebhookHandler(url, timeout_s=0.3, retries=1, backoff_s=0.01)
        started = time.monotonic()
        deliveries = await AlertSystem([handler], handler_timeout_s=0.1).notify(make_alert())
        elapsed = time.monotonic() - started
    # The handler's own budget (two attempts) wins over the system's default timeout.
    assert deliveries[0].ok and deliveries[0].result is False
    assert 0.6 <= elapsed < 3
    assert "TimeoutError" in caplog.text or "ServerTimeoutError" in caplog.text
    assert SECRET not in caplog.text


async def test_webhook_connection_refused_is_retried_then_given_up(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    handler = WebhookHandler(f"http://127.0.0.1:{free_port()}/services/{SECRET}",
                             timeout_s=1, retries=2, backoff_s=0.01)
    assert await handler(make_alert()) is False
    assert "after 3 attempt(s)" in caplog.text
    assert SECRET not in caplog.text


async def test_failure_logs_name_handlers_without_their_arguments(
        caplog: pytest.LogCaptureFixture) -> None:
    def post(url: str, alert: Alert) -> None:
        raise ConnectionError(f"cannot reach {url}")  # as `requests` does, URL included

    class Pager:
        def __init__(self, url: str) -> None:
            self.url = url

        def __repr__(self) -> str:
            return f"Pager({self.url})"

        def __call__(self, alert: Alert) -> None:
            raise RuntimeError(self.url)

    port = free_port()
    url = f"http://127.0.0.1:{port}/services/{SECRET}"
    handlers = [functools.partial(post, url), Pager(url), WebhookHandler(url, retries=0)]
    deliveries = await AlertSystem(handlers).notify(make_alert())
    assert [d.handler for d in deliveries] == [
        "partial(test_failure_logs_name_handlers_without_their_arguments.<locals>.post)",
        "test_failure_logs_name_handlers_without_their_arguments.<locals>.Pager",
        f"WebhookHandler(host='127.0.0.1:{port}')"]
    assert [d.error for d in deliveries[:2]] == ["ConnectionError", "RuntimeError"]
    assert "ConnectionError at " in caplog.text
    assert SECRET not in caplog.text


def test_webhook_never_shows_its_url() -> None:
    handler = WebhookHandler(f"https://hooks.slack.com/services/{SECRET}")
    assert repr(handler) == "WebhookHandler(host='hooks.slack.com')"
    assert SECRET not in str(handler) and SECRET not in str(vars(handler).get("host"))
    with pytest.raises(ValueError) as bad:
        WebhookHandler(f"hooks.slack.com/services/{SECRET}")
    assert SECRET not in str(bad.value)


def test_handlers_from_settings_log_then_one_webhook_per_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MODEL_SWITCHING_ALERT_WEBHOOK_URLS",
                       f"https://hooks.slack.com/services/{SECRET}, http://alerts.local/hook")
    monkeypatch.setenv("VLLM_MODEL_SWITCHING_ALERT_WEBHOOK_RETRIES", "1")
    handlers = handlers_from_settings(ModelSwitchingConfig.from_env())
    assert handlers[0] is log_alert
    webhooks = [h for h in handlers[1:] if isinstance(h, WebhookHandler)]
    assert [w.host for w in webhooks] == ["hooks.slack.com", "alerts.local"]
    assert all(w.retries == 1 and w.timeout_s == 5 for w in webhooks)
    assert SECRET not in repr(handlers)
    assert handlers_from_settings(ModelSwitchingConfig()) == [log_alert]
