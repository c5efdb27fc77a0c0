"""Monitoring activities: which hosts serve a model, and one look at the model's health.

`assess_health` merges what every live gateway saw of each version over the last interval
with the engines' resource figures, judges each version against the thresholds
(`turnout.telemetry.health`), fires, refreshes or resolves the stored alerts (the lifecycle
of `turnout.telemetry.alerts`), tells the alert
handlers of every change, and keeps the look for `GET /health/models`. Running it twice for
the same interval changes nothing more than running it once: alerts are keyed by (model,
version, type) and the snapshot is replaced.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from temporalio import activity

from activities.gateway_admin import GatewayAdmin
from turnout import contracts as c
from turnout.alerting import AlertSystem, handlers_from_settings
from turnout.config import ModelSwitchingConfig
from turnout.domain import Alert, AlertState, EngineState
from turnout.gateway_protocol import VersionStats
from turnout.store import NotFound, Store
from turnout.telemetry.alerts import plan_alerts
from turnout.telemetry.figures import Figures, WindowSamples
from turnout.telemetry.health import (
    EngineResources,
    ModelHealth,
    MonitorThresholds,
    VersionHealth,
    applied_thresholds,
    evaluate,
    summarize,
)

# How much later than its interval a host's measurement may land (CPU sampling, a busy
# store) before it counts as stale.
_MEASURE_SLACK_S = 10.0


class _Seen:
    """One version's traffic over the window, summed over gateways."""

    def __init__(self, version: str) -> None:
        self.window = WindowSamples(version)
        self.inflight = 0

    def add(self, entry: VersionStats) -> None:
        if entry.window is not None:
            self.window.add_window(entry.window)
        self.inflight += entry.inflight


def _figures(seen: _Seen, engines: list[EngineResources]) -> Figures:
    def present(name: str) -> list[float]:
        return [float(v) for e in engines if (v := getattr(e, name)) is not None]

    def worst(name: str) -> float | None:
        return max(present(name), default=None)

    def total(name: str) -> float | None:
        values = present(name)
        return sum(values) if values else None

    return seen.window.figures().model_copy(update=dict(
        version="", inflight=seen.inflight, queued=total("queued_requests"),
        memory_mb=total("memory_mb"),
        # Levels are per engine: the most loaded engine of the version is the one at risk.
        memory_percent=worst("memory_percent"), cpu_percent=worst("cpu_percent"),
        kv_cache_usage=worst("kv_cache_usage")))


class HealthLookActivities:
    def __init__(self, settings: ModelSwitchingConfig, store: Store, admin: GatewayAdmin,
                 alerts: AlertSystem | None = None) -> None:
        self.settings = settings
        self.store = store
        self.admin = admin
        self.alerts = alerts or AlertSystem(handlers_from_settings(settings))

    @activity.defn(name=c.LIST_ENGINE_HOSTS)
    async def list_engine_hosts(self, input: c.ModelHostsInput) -> list[str]:
        """Hosts with a ready engine of the model (external endpoints have no host to ask)."""
        engines = await self.store.list_engines(model_id=input.model_id)
        return sorted({e.host for e in engines if e.state is EngineState.READY and not e.external})

    @activity.defn(name=c.ASSESS_HEALTH)
    async def assess_health(self, input: c.AssessHealthInput) -> c.AssessHealthResult:
        interval = self.settings.monitoring_interval_s
        if not self.settings.enable_health_monitoring:
            return c.AssessHealthResult(summary="monitoring is switched off",
                                        interval_s=interval, keep_monitoring=False)
        model_id = input.model_id
        try:
            live_version = await self.store.live_version(model_id)
        except NotFound:
            return c.AssessHealthResult(summary=f"{model_id} is not registered",
                                        interval_s=interval, keep_monitoring=False)
        thresholds = applied_thresholds(
            self.settings, *await self.store.threshold_overrides(model_id))
        until = time.time()
        window_s = input.window_s or interval
        seen = await self._gateway_figures(model_id, until - window_s, until)
        resources = await self._resources(input, until)
        versions = []
        for version, role in (await self.store.monitored_versions(model_id,
                                                                  live_version)).items():
            engines = resources.get(version, [])
            health = evaluate(_figures(seen.get(version, _Seen(version)), engines), thresholds)
            versions.append(health.model_copy(update={"version": version, "role": role,
                                                      "engines": engines}))
        await self._update_alerts(model_id, versions, thresholds, window_s)
        failed_at = input.last_failure_at
        await self.store.save_health(ModelHealth(
            model_id=model_id, live_version=live_version,
            checked_at=datetime.fromtimestamp(until, UTC), interval_s=window_s,
            next_look_at=datetime.fromtimestamp(until + interval, UTC),
            versions=versions, thresholds=thresholds, failed_looks=input.failed_looks,
            last_failure=input.last_failure,
            last_failure_at=datetime.fromtimestamp(failed_at, UTC) if failed_at else None))
        summary = summarize(model_id, versions)
        activity.logger.info("health: %s", summary)
        return c.AssessHealthResult(summary=summary, interval_s=interval,
                                    states={v.version: v.state.value for v in versions})

    @activity.defn(name=c.RECORD_FAILED_LOOK)
    async def record_failed_look(self, input: c.FailedLookInput) -> None:
        """Keep a failed look for `GET /health/models` (when the store takes it)."""
        activity.logger.warning("look %d at %s failed: %s", input.failed_looks,
                                input.model_id, input.reason)
        await self.store.record_failed_look(input.model_id, input.reason,
                                            datetime.fromtimestamp(input.at, UTC),
                                            input.failed_looks)

    async def _resources(self, input: c.AssessHealthInput, now: float
                         ) -> dict[str, list[EngineResources]]:
        """Each version's engine figures: the hosts' latest (a host measures once per
        interval; one that stopped for two intervals is left out), or those the monitor
        collected itself."""
        if input.measured_by_hosts:
            stale = 2 * self.settings.monitoring_interval_s + _MEASURE_SLACK_S
            return await self.store.engine_resources(
                input.model_id, datetime.fromtimestamp(now - stale, UTC))
        resources: dict[str, list[EngineResources]] = {}
        for host_result in input.resources:
            for version, engines in host_result.engines.items():
                resources.setdefault(version, []).extend(
                    EngineResources.model_validate(e) for e in engines)
        return resources

    async def _gateway_figures(self, model_id: str, since: float,
                               until: float) -> dict[str, _Seen]:
        gateways = await self.store.live_gateways(self.settings.gateway_live_after_s)
        stats, _ = await self.admin.model_stats(gateways, model_id, since, until)
        seen: dict[str, _Seen] = {}
        for versions in stats:
            for version, entry in versions.items():
                seen.setdefault(version, _Seen(version)).add(entry)
        return seen

    async def _update_alerts(self, model_id: str, versions: list[VersionHealth],
                             thresholds: MonitorThresholds, window_s: float) -> None:
        firing = await self.store.list_alerts(model_id=model_id, state=AlertState.FIRING)
        before = {(a.version, a.type): a for a in firing}
        plan = plan_alerts(model_id, versions, firing, thresholds, window_s=window_s)
        changed: list[Alert] = []
        # The look's time is its first schedule: the same on a retry, so a retried look
        # refreshes its alerts without counting their breaches twice.
        look = activity.info().scheduled_time
        for alert in plan.fire:
            stored = await self.store.raise_alert(alert.model_copy(update={"last_seen": look}))
            previous = before.get((alert.version, alert.type))
            if previous is None or previous.severity is not stored.severity:
                changed.append(stored)
        for resolution in plan.resolve:
            resolved = await self.store.resolve_alert(model_id, resolution.version,
                                                      resolution.type)
            if resolved is not None:
                changed.append(resolved)
        for alert in changed:
            activity.logger.info("alert %s %s: %s", alert.id, alert.state.value, alert.title)
        # Side by side: a slow webhook (retries take up to ~25 s with the default settings)
        # delays the others by nothing, and the look stays well within its timeout.
        await asyncio.gather(*(self.alerts.notify(alert) for alert in changed))
