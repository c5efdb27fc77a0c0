"""The guide's `HealthMonitor`: in-process request records plus a client of the stack's monitor.

Two sources of alerts meet here, with one lifecycle:

- Local records. A process that serves requests itself (the guide's `SwitchingEngine`
  calls `record_request` from a synchronous engine) keeps bounded windows per model key;
  each interval they are judged with the same pure code as the stack's monitor
  (`turnout.telemetry.health.evaluate`), and alerts fire, update and resolve by the same
  lifecycle as the stored ones (`turnout.telemetry.alerts`): one alert per (model key,
  type) while firing, a repeat updates it (count, last seen, severity), recovery resolves
  it and notifies once.
- The stack. The gateways' traffic is judged by the stack's own monitor, which stores
  alerts and calls the webhooks of the settings. This class polls `GET /alerts` and
  forwards each new or changed stored alert to its `AlertSystem` once, so in-process
  handlers (the guide's `custom_alert_handler`) see them too.

An unreachable stack never stops local monitoring; it is logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pydantic import ValidationError

from turnout.alerting import AlertSystem, log_alert
from turnout.config import ModelSwitchingConfig
from turnout.domain import Alert, AlertSeverity, AlertState
from turnout.sdk import TurnoutAPIError, _Client
from turnout.telemetry.alerts import AlertKey, apply_plan, plan_alerts
from turnout.telemetry.catalogue import Source
from turnout.telemetry.figures import Figures, WindowSamples
from turnout.telemetry.health import ModelHealth, MonitorThresholds, VersionHealth, evaluate
from turnout.telemetry.sketch import Histogram

log = logging.getLogger(__name__)

# Samples kept per model key (and per custom metric): bounds memory whatever the traffic.
DEFAULT_WINDOW_SIZE = 10_000
CUSTOM_WINDOW_SIZE = 1_000
# Calls to the stack from the monitor: short, so an unreachable API costs little.
STACK_TIMEOUT_S = 10.0
# The resolved-alerts query reaches this far before the previous poll (clock skew).
SINCE_MARGIN = timedelta(seconds=10)

# (monotonic time, latency ms, error, time to first token ms or None)
_Sample = tuple[float, float, bool, float | None]


class HealthMonitor:
    """Records requests, judges them each interval, and relays the stack's alerts.

    `HealthMonitor()` reads the settings (`VLLM_MODEL_SWITCHING_*`) for the interval, the
    thresholds and the API's address; `HealthMonitor(alert_system)` as in the guide. Without
    an alert system, alerts go to the `turnout.alerts` log only: the stack already sends
    its alerts to the configured webhooks, and sending them again from here would post
    every one twice. Pass `AlertSystem(handlers_from_settings(settings))` to send local
    alerts to the webhooks as well.
    """

    def __init__(self, alert_system: AlertSystem | None = None, *,
                 thresholds: MonitorThresholds | None = None, interval_s: float | None = None,
                 api_url: str | None = None, api_key: str | None = None,
                 settings: ModelSwitchingConfig | None = None,
                 window_size: int = DEFAULT_WINDOW_SIZE) -> None:
        self._client = _Client(api_url, api_key,
                               settings.model_dump() if settings is not None else {})
        self.settings = self._client.settings
        self.alert_system = alert_system or AlertSystem([log_alert])
        self.thresholds = thresholds or MonitorThresholds.from_settings(self.settings)
        self.interval_s = float(interval_s or self.settings.monitoring_interval_s)
        self._model_thresholds: dict[str, MonitorThresholds] = {}
        self._window_size = window_size
        self._lock = threading.Lock()
        self._requests: dict[str, deque[_Sample]] = {}
        self._custom: dict[str, dict[str, deque[tuple[float, float]]]] = {}
        # Local alerts firing, per model key by (version, type): the version is None, a
        # model key names the model and its version at once.
        self._firing: dict[str, dict[AlertKey, Alert]] = {}
        # Stored alerts forwarded: id -> (state, count, severity) last seen.
        self._seen: dict[int, tuple[AlertState, int, AlertSeverity]] = {}
        self._last_poll: datetime | None = None
        self._stack_problem: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def api_url(self) -> str:
        return self._client.api_url

    # ------------------------------------------------------------------ recording

    def record_request(self, model_key: str, latency_ms: float, error: bool = False, *,
                       ttft_ms: float | None = None) -> None:
        """Record one request of `model_key` (the guide's `f"{model_id}_{version}"`).

        Safe from any thread and O(1): a sync engine calls it on its request path.
        """
        sample = (time.monotonic(), float(latency_ms), bool(error),
                  None if ttft_ms is None else float(ttft_ms))
        with self._lock:
            window = self._requests.get(model_key)
            if window is None:
                window = self._requests[model_key] = deque(maxlen=self._window_size)
            window.append(sample)

    def record_metric(self, model_key: str, name: str, value: float) -> None:
        """Record a custom metric; judged against `thresholds.custom[name]` if set."""
        with self._lock:
            metrics = self._custom.setdefault(model_key, {})
            window = metrics.get(name)
            if window is None:
                window = metrics[name] = deque(maxlen=CUSTOM_WINDOW_SIZE)
            window.append((time.monotonic(), float(value)))

    # ------------------------------------------------------------------ thresholds

    def thresholds_for(self, model_key: str) -> MonitorThresholds:
        return self._model_thresholds.get(model_key, self.thresholds)

    def update_thresholds(self, changes: dict[str, Any],
                          model_id: str | None = None) -> MonitorThresholds:
        """Change some levels, here and in the stack (the guide's Best Practice 4).

        Validated first (an unknown key or a bad value raises `ValueError` naming it, and
        nothing changes), then sent to `PUT /health/thresholds` so the stack's monitor
        judges the gateways' traffic by the same levels; a refusal there (4xx) is raised
        and nothing changes. An unreachable stack only costs a warning: the levels still
        apply to this process's records. `model_id` limits the change to one model (a
        stack model id, or a local model key). Returns the levels now applied here.
        """
        current = self.thresholds_for(model_id) if model_id is not None else self.thresholds
        applied = _validated(current, changes)
        try:
            self._client.request("PUT", "/health/thresholds", timeout=STACK_TIMEOUT_S,
                                 json={"model_id": model_id, **changes})
        except httpx.TransportError as exc:
            log.warning("thresholds applied in this process only: the turnout API at %s is "
                        "unreachable (%s)", self.api_url, type(exc).__name__)
        except TurnoutAPIError as exc:
            if exc.status_code < 500:
                raise
            log.warning("thresholds applied in this process only: the turnout API at %s "
                        "failed (HTTP %d)", self.api_url, exc.status_code)
        if model_id is None:
            previous, self.thresholds = self.thresholds, applied
            # Per-model levels keep their own overrides on top of the new global ones.
            self._model_thresholds = {k: _rebased(applied, _diff(previous, v), v)
                                      for k, v in self._model_thresholds.items()}
        else:
            self._model_thresholds[model_id] = applied
        return applied

    # ------------------------------------------------------------------ judging

    def figures(self, model_key: str, *, now: float | None = None) -> Figures:
        """`model_key`'s figures over the last interval."""
        since = (time.monotonic() if now is None else now) - self.interval_s
        with self._lock:
            samples = [s for s in self._requests.get(model_key, ()) if s[0] >= since]
            custom = {name: [v for t, v in window if t >= since]
                      for name, window in self._custom.get(model_key, {}).items()}
        window = WindowSamples(model_key)
        errors = sum(1 for s in samples if s[2])
        window.add(len(samples), errors, {
            Source.LATENCY: Histogram.of(s[1] for s in samples),
            Source.TTFT: Histogram.of(s[3] for s in samples if s[3] is not None)})
        # A custom metric is a gauge sampled now and then: its interval mean is judged.
        return window.figures().model_copy(update={
            "version": "", "custom": {name: sum(values) / len(values)
                                      for name, values in custom.items() if values}})

    def evaluate(self, *, now: float | None = None) -> dict[str, VersionHealth]:
        """Every recorded model key judged over the last interval (`no_data` when it saw
        too few requests)."""
        with self._lock:
            keys = sorted({*self._requests, *self._custom})
        result = {}
        for key in keys:
            health = evaluate(self.figures(key, now=now), self.thresholds_for(key))
            result[key] = health.model_copy(update={"version": key})
        return result

    def local_alerts(self) -> list[Alert]:
        """Local alerts firing now."""
        return [a.model_copy() for alerts in self._firing.values() for a in alerts.values()]

    def check_local(self, *, now: float | None = None) -> list[Alert]:
        """Judge the records and move the local alerts on; returns the alerts that changed
        (fired, updated or resolved), i.e. those to notify. Called each interval by the
        monitoring task; public so tests and sync callers can step it."""
        changed: list[Alert] = []
        at = datetime.now(UTC)
        for key, health in self.evaluate(now=now).items():
            firing = self._firing.setdefault(key, {})
            plan = plan_alerts(key, [health.model_copy(update={"version": ""})],
                               list(firing.values()), self.thresholds_for(key),
                               window_s=self.interval_s)
            changed += apply_plan(firing, plan, at)
        return changed

    # ------------------------------------------------------------------ the stack's alerts

    async def poll_stack(self) -> list[Alert]:
        """The stored alerts that are new or changed (count, severity, resolved) since the
        last poll; each change is returned once. Raises on an unreachable stack."""
        started = datetime.now(UTC)
        since = self._last_poll - SINCE_MARGIN if self._last_poll else started
        firing = await self.aget_alerts(state=AlertState.FIRING, limit=5000)
        resolved = await self.aget_alerts(state=AlertState.RESOLVED, since=since, limit=5000)
        self._last_poll = started
        changed = []
        current: dict[int, tuple[AlertState, int, AlertSeverity]] = {}
        for alert in [*firing, *resolved]:
            if alert.id is None:
                continue
            signature = (alert.state, alert.count, alert.severity)
            current[alert.id] = signature
            if self._seen.get(alert.id) != signature:
                changed.append(alert)
        # Only what the stack still lists is remembered: memory stays bounded.
        self._seen = current
        return changed

    # ------------------------------------------------------------------ background task

    async def start_monitoring(self) -> None:
        """Start checking every `interval_s` (idempotent). With health monitoring disabled
        in the settings (`VLLM_MODEL_SWITCHING_ENABLE_MONITORING=false`) nothing starts."""
        if not self.settings.enable_health_monitoring:
            log.info("health monitoring is disabled in the settings; not started")
            return
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.create_task(self._run(), name="turnout-health-monitor")

    async def stop_monitoring(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def monitoring(self) -> bool:
        return self._task is not None and not self._task.done()

    async def check_once(self) -> list[Alert]:
        """One round: local records, then the stack; notifies and returns what changed."""
        changed = self.check_local()
        try:
            changed += await self.poll_stack()
        except (httpx.TransportError, TurnoutAPIError) as exc:
            self._stack_failed(exc)
        else:
            self._stack_ok()
        if changed:
            await asyncio.gather(*(self.alert_system.notify(a) for a in changed))
        return changed

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - one bad round must not end monitoring
                log.exception("health monitoring round failed; next one in %gs",
                              self.interval_s)
            await asyncio.sleep(self.interval_s)

    def _stack_failed(self, exc: Exception) -> None:
        problem = f"HTTP {exc.status_code}" if isinstance(exc, TurnoutAPIError) \
            else type(exc).__name__
        if self._stack_problem is None:
            log.warning("the turnout API at %s is unreachable (%s): its alerts are not "
                        "relayed until it answers; local records are still judged",
                        self.api_url, problem)
        self._stack_problem = problem

    def _stack_ok(self) -> None:
        if self._stack_problem is not None:
            log.info("the turnout API at %s answers again; relaying its alerts", self.api_url)
        self._stack_problem = None

    # ------------------------------------------------------------------ stack queries

    def get_model_health(self, model_id: str | None = None) -> ModelHealth | list[ModelHealth]:
        """The stack's view (`GET /health/models`): one model's health, or every model's."""
        if model_id is not None:
            return ModelHealth.model_validate(
                self._client.request("GET", f"/health/models/{model_id}"))
        report = self._client.request("GET", "/health/models")
        return [ModelHealth.model_validate(m) for m in report["models"]]

    async def aget_model_health(self, model_id: str | None = None
                                ) -> ModelHealth | list[ModelHealth]:
        if model_id is not None:
            return ModelHealth.model_validate(
                await self._client.arequest("GET", f"/health/models/{model_id}"))
        report = await self._client.arequest("GET", "/health/models")
        return [ModelHealth.model_validate(m) for m in report["models"]]

    def get_alerts(self, model_id: str | None = None, *,
                   severity: AlertSeverity | str | None = None,
                   state: AlertState | str | None = AlertState.FIRING,
                   since: datetime | None = None, limit: int | None = None) -> list[Alert]:
        """The stack's stored alerts (`GET /alerts`): firing ones by default."""
        params = _alert_params(model_id, severity, state, since, limit)
        return [Alert.model_validate(a) for a in self._client.request(
            "GET", "/alerts", params=params, timeout=STACK_TIMEOUT_S)]

    async def aget_alerts(self, model_id: str | None = None, *,
                          severity: AlertSeverity | str | None = None,
                          state: AlertState | str | None = AlertState.FIRING,
                          since: datetime | None = None,
                          limit: int | None = None) -> list[Alert]:
        params = _alert_params(model_id, severity, state, since, limit)
        return [Alert.model_validate(a) for a in await self._client.arequest(
            "GET", "/alerts", params=params, timeout=STACK_TIMEOUT_S)]

    def get_thresholds(self, model_id: str | None = None) -> MonitorThresholds:
        """The levels the stack applies (`GET /health/thresholds`), for one model or all."""
        params = {"model_id": model_id} if model_id else {}
        return MonitorThresholds.model_validate(self._client.request(
            "GET", "/health/thresholds", params=params, timeout=STACK_TIMEOUT_S))

    def acknowledge_alert(self, alert_id: int, requested_by: str | None = None) -> Alert:
        return Alert.model_validate(self._client.request(
            "POST", f"/alerts/{alert_id}/acknowledge", json={"requested_by": requested_by}))


def _validated(current: MonitorThresholds, changes: dict[str, Any]) -> MonitorThresholds:
    """`current.updated(changes)`, with a `ValueError` that names the offending keys."""
    unknown = sorted(set(changes) - set(MonitorThresholds.model_fields))
    if unknown:
        raise ValueError(f"unknown threshold key(s): {', '.join(unknown)} (known: "
                         f"{', '.join(MonitorThresholds.model_fields)})")
    try:
        return current.updated(changes)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"]
                    else e["msg"] for e in exc.errors()]
        raise ValueError("invalid thresholds: " + "; ".join(problems)) from None


def _diff(base: MonitorThresholds, other: MonitorThresholds) -> dict[str, Any]:
    ours, theirs = base.model_dump(), other.model_dump()
    return {k: v for k, v in theirs.items() if ours.get(k) != v}


def _rebased(base: MonitorThresholds, overrides: dict[str, Any],
             fallback: MonitorThresholds) -> MonitorThresholds:
    """`overrides` on top of `base`, or `fallback` if they no longer hold together."""
    try:
        return base.updated(overrides)
    except ValueError:
        return fallback


def _alert_params(model_id: str | None, severity: AlertSeverity | str | None,
                  state: AlertState | str | None, since: datetime | None,
                  limit: int | None) -> dict[str, str | int]:
    params: dict[str, str | int] = {}
    if model_id is not None:
        params["model_id"] = model_id
    if severity is not None:
        params["severity"] = AlertSeverity(severity).value
    if state is not None:
        params["state"] = AlertState(state).value
    if since is not None:
        # The API wants an offset; a naive time is taken as UTC, as the store keeps times.
        params["since"] = (since if since.tzinfo else since.replace(tzinfo=UTC)).isoformat()
    if limit is not None:
        params["limit"] = limit
    return params

