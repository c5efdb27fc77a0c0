"""Alert delivery: the guide's `AlertSystem` and the handlers turnout ships with.

An alert is worth most when a version is misbehaving, which is exactly when the
things handlers talk to (Slack, PagerDuty, a mail relay) may be slow or down. So delivery
is defensive: every handler runs on its own with a time limit, a raising or hanging
handler is logged with the alert's context and never stops the others or the caller, and
plain (sync) handlers such as the guide's `requests.post` run in a thread so they never
block the event loop that monitors health.

The stack's own monitor builds its handlers with `handlers_from_settings`, so the
`VLLM_MODEL_SWITCHING_ALERT_WEBHOOK_URLS` setting alone makes the guide's Slack example
work without code. Webhook URLs embed secrets: they are never logged, shown in a repr, or
put in an exception message; the host is the most that appears.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from turnout.config import ModelSwitchingConfig
from turnout.domain import Alert, AlertSeverity, AlertState

AlertHandler = Callable[[Alert], Any]

# Where `log_alert` writes: one logger name operators can route (file, syslog, ...).
alert_log = logging.getLogger("turnout.alerts")
# Delivery problems (a handler that failed), apart from the alerts themselves.
log = logging.getLogger(__name__)

DEFAULT_HANDLER_TIMEOUT_S = 10.0

_LEVELS = {AlertSeverity.INFO: logging.INFO, AlertSeverity.WARNING: logging.WARNING,
           AlertSeverity.CRITICAL: logging.CRITICAL}


@dataclass(frozen=True)
class Delivery:
    """What became of one handler's call: `ok` False when it raised or ran out of time."""

    handler: str
    ok: bool
    result: Any = None
    error: str | None = None
    duration_s: float = 0.0


def handler_name(handler: AlertHandler) -> str:
    """A name for logs: the function's qualified name, or the handler object's class.

    Never an arbitrary repr: `functools.partial(post, url)` shows its arguments, and
    those may be a webhook URL. `WebhookHandler`'s repr is made to show the host only.
    """
    if isinstance(handler, WebhookHandler):
        return repr(handler)
    if isinstance(handler, functools.partial):
        return f"partial({handler_name(handler.func)})"
    name = getattr(handler, "__qualname__", None)
    return name if isinstance(name, str) else type(handler).__qualname__


def alert_context(alert: Alert) -> str:
    """The alert's identity for a log line; local alerts (not stored) have no id."""
    alert_id = alert.id if alert.id is not None else "local"
    return (f"alert {alert_id} ({alert.type}, {alert.severity.value}, {alert.state.value}) "
            f"of {alert.model_id}{'/' + alert.version if alert.version else ''}")


class AlertSystem:
    """Calls every handler for each alert; the guide's `AlertSystem(alert_handlers=[...])`.

    A handler may be a plain function (run in a daemon thread, so a hung one cannot block
    the loop nor the interpreter's exit) or a coroutine function (awaited). Each gets
    `handler_timeout_s`, or its own `max_duration_s` attribute when it has one (a webhook
    with retries needs longer than one attempt).
    """

    def __init__(self, alert_handlers: Sequence[AlertHandler] | None = None, *,
                 handler_timeout_s: float = DEFAULT_HANDLER_TIMEOUT_S) -> None:
        self.alert_handlers: list[AlertHandler] = list(alert_handlers or [])
        self.handler_timeout_s = handler_timeout_s
        # Deliveries started by `send_alert` from inside a running loop: kept referenced so
        # the loop does not drop them half way.
        self._background: set[asyncio.Task[list[Delivery]]] = set()

    def add_handler(self, handler: AlertHandler) -> None:
        self.alert_handlers.append(handler)

    def remove_handler(self, handler: AlertHandler) -> None:
        self.alert_handlers.remove(handler)

    async def notify(self, alert: Alert) -> list[Delivery]:
        """Deliver `alert` to every handler at once; never raises for a handler's fault."""
        handlers = list(self.alert_handlers)
        return list(await asyncio.gather(*(self._deliver(h, alert) for h in handlers)))

    def send_alert(self, alert: Alert) -> list[Delivery]:
        """`notify` for synchronous code.

        Outside an event loop it waits for every handler and returns their deliveries.
        Called (synchronously) from inside a running loop it cannot wait without freezing
        that loop, so it schedules the delivery on the loop and returns `[]`.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.notify(alert))
        task = loop.create_task(self.notify(alert))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return []

    async def _deliver(self, handler: AlertHandler, alert: Alert) -> Delivery:
        name = handler_name(handler)
        timeout = float(getattr(handler, "max_duration_s", self.handler_timeout_s))
        started = time.monotonic()
        # Each handler gets its own copy: one that edits the alert cannot change what the
        # others see.
        copy = alert.model_copy(deep=True)
        try:
            async with asyncio.timeout(timeout):
                if _is_async(handler):
                    result = await handler(copy)
                else:
                    result = await _in_daemon_thread(handler, copy, name)
                if inspect.isawaitable(result):
                    result = await result
        except TimeoutError:
            log.warning("alert handler %s gave no answer within %.1fs for %s; moving on",
                        name, timeout, alert_context(alert))
            return Delivery(name, False, error=f"timed out after {timeout:g}s",
                            duration_s=time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - a handler's fault must not stop the rest
            # Type and place only: the message of an HTTP library's error quotes the URL
            # (`requests`: "... with url: /services/T000/B000/secret").
            log.warning("alert handler %s failed for %s: %s at %s", name,
                        alert_context(alert), type(exc).__name__, _where(exc))
            return Delivery(name, False, error=type(exc).__name__,
                            duration_s=time.monotonic() - started)
        return Delivery(name, True, result=result, duration_s=time.monotonic() - started)


def _where(exc: BaseException) -> str:
    """`file:line in function` of the innermost frame the exception passed through."""
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}"


def _is_async(handler: AlertHandler) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        type(handler).__call__)


def _in_daemon_thread(handler: AlertHandler, alert: Alert, name: str) -> Awaitable[Any]:
    """Run a sync handler in a daemon thread; the returned future ends with it.

    Not `asyncio.to_thread`: the default executor's threads are joined at `asyncio.run`'s
    end and at interpreter exit, so one hung `requests.post` would hang both.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():  # timed out and cancelled meanwhile
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            outcome = (True, handler(alert))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop closed while the handler ran
            pass

    threading.Thread(target=run, name=f"alert-handler:{name}", daemon=True).start()
    return future


# ---------------------------------------------------------------------- built-in handlers


def log_alert(alert: Alert) -> None:
    """Write the alert to the `turnout.alerts` logger, at a level matching its severity
    (a resolution at INFO)."""
    level = logging.INFO if alert.state is AlertState.RESOLVED else _LEVELS[alert.severity]
    alert_log.log(level, "[%s %s] %s: %s (%s)", alert.severity.value.upper(),
                  alert.state.value, alert.title, alert.message, alert_context(alert))


def slack_text(alert: Alert) -> str:
    """The guide's Slack line: `Model Alert: <title>` then the message."""
    return f"Model Alert: {alert.title}\n{alert.message}"


class WebhookHandler:
    """POSTs each alert as JSON: `{"text": "Model Alert: ...", "alert": {...}}`.

    `text` makes a Slack (or Mattermost, Teams workflow) incoming webhook accept the body
    as is; `alert` carries every field for receivers that want them. Connection errors,
    timeouts and 5xx answers are retried `retries` times with short exponential backoff,
    4xx answers are not (the request itself is wrong; repeating it cannot help). Giving up
    is logged, never raised: an alert that cannot be delivered must not break monitoring.
    """

    def __init__(self, url: str, *, timeout_s: float = 5, retries: int = 3,
                 backoff_s: float = 0.5) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Not the URL in the message: it is probably a secret with a typo.
            raise ValueError("alert webhook URL must be an http(s) URL with a host")
        self._url = url
        self.host = parts.netloc.rsplit("@", 1)[-1]
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    @property
    def max_duration_s(self) -> float:
        """How long a delivery can take at worst, every attempt and pause included; the
        `AlertSystem` gives this handler that long."""
        pauses = sum(self._pause(attempt) for attempt in range(self.retries))
        return (self.retries + 1) * self.timeout_s + pauses + 1

    def __repr__(self) -> str:
        return f"WebhookHandler(host={self.host!r})"

    def _pause(self, attempt: int) -> float:
        return min(self.backoff_s * 2.0 ** attempt, 5.0)

    @staticmethod
    def body(alert: Alert) -> dict[str, Any]:
        return {"text": slack_text(alert), "alert": alert.model_dump(mode="json")}

    async def __call__(self, alert: Alert) -> bool:
        """Deliver `alert`; True once the receiver answered 2xx/3xx, False if given up."""
        body = self.body(alert)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        problem = ""
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for attempt in range(self.retries + 1):
                if attempt:
                    await asyncio.sleep(self._pause(attempt - 1))
                try:
                    async with session.post(self._url, json=body) as response:
                        await response.read()
                        if response.status < 400:
                            return True
                        problem = f"HTTP {response.status}"
                        if response.status < 500:
                            break
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # The exception's text may quote the URL: only its type is kept.
                    problem = type(exc).__name__
        log.warning("alert webhook at %s gave up on %s after %d attempt(s): %s",
                    self.host, alert_context(alert), attempt + 1, problem)
        return False


def handlers_from_settings(settings: ModelSwitchingConfig) -> list[AlertHandler]:
    """The handlers a deployment's settings ask for: the log, then one webhook per URL."""
    handlers: list[AlertHandler] = [log_alert]
    handlers += [WebhookHandler(url, timeout_s=settings.alert_webhook_timeout_s,
                                retries=settings.alert_webhook_retries)
                 for url in settings.alert_webhook_urls]
    return handlers
