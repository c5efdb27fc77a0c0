"""Health activities: does a version answer at all, and is it healthy under real traffic.

`judge_health` reads the request outcomes every live gateway recorded in the step's
window, merges them per version (histograms that add up exactly across gateways) and
applies the pure rules of `turnout.telemetry.verdicts`.
"""

from __future__ import annotations

import time

import httpx
from temporalio import activity

from activities.gateway_admin import GatewayAdmin
from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.domain import EngineState
from turnout.endpoints import MissingCredential, bearer_header
from turnout.redaction import answer_summary, redact
from turnout.store import NotFound, Store
from turnout.telemetry.figures import WindowSamples
from turnout.telemetry.verdicts import Verdict, judge


class HealthActivities:
    """`HealthActivities(store)` still works: settings default to `ModelSwitchingConfig()`
    and the gateway admin client is made from them on first use (and closed by `close`)."""

    def __init__(self, store: Store, timeout_s: float = 30.0, *,
                 settings: ModelSwitchingConfig | None = None,
                 admin: GatewayAdmin | None = None) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.settings = settings or ModelSwitchingConfig()
        self._admin = admin
        self._owns_admin = admin is None
        # One client for every probe: making one per call builds a TLS context each time,
        # which was the control worker's largest single cost with hundreds of canaries.
        self._engines: httpx.AsyncClient | None = None

    @property
    def admin(self) -> GatewayAdmin:
        if self._admin is None:
            self._admin = GatewayAdmin(self.settings.gateway_admin_token)
        return self._admin

    @property
    def engines(self) -> httpx.AsyncClient:
        if self._engines is None:
            self._engines = httpx.AsyncClient(timeout=self.timeout_s)
        return self._engines

    async def close(self) -> None:
        """Close the engine client, and the admin client if this object made it."""
        if self._engines is not None:
            await self._engines.aclose()
            self._engines = None
        if self._owns_admin and self._admin is not None:
            await self._admin.close()
            self._admin = None

    @activity.defn(name=c.CHECK_HEALTH)
    async def check_health(self, input: c.CheckHealthInput) -> c.HealthVerdict:
        """A short completion straight to the version's engine: does it answer at all?"""
        engines = [e for e in await self.store.list_engines(model_id=input.model_id,
                                                            version=input.version)
                   if e.state is EngineState.READY]
        if not engines:
            return c.HealthVerdict(healthy=False, reason="no ready engine")
        engine = engines[0]
        body = {"model": engine.served_model_name, "prompt": "Hello", "max_tokens": 4}
        headers: dict[str, str] = {}
        if engine.external:  # an endpoint's credential, from this worker's environment
            try:
                version = await self.store.get_version(input.model_id, input.version)
                headers = bearer_header(version.config.api_key_env)
            except NotFound:
                return c.HealthVerdict(healthy=False, reason="version is not registered")
            except MissingCredential as exc:
                return c.HealthVerdict(healthy=False,
                                       reason=f"no credential for {engine.url}: {exc} on the "
                                              f"control worker")
        sent = [value.removeprefix("Bearer ") for value in headers.values()]
        started = time.monotonic()
        try:
            response = await self.engines.post(f"{engine.url}/v1/completions", json=body,
                                               headers=headers)
        except httpx.HTTPError as exc:
            return c.HealthVerdict(healthy=False, reason=f"{engine.url} unreachable: "
                                                         f"{redact(repr(exc), sent)[:300]}")
        latency_ms = (time.monotonic() - started) * 1000
        if response.status_code != 200 or '"choices"' not in response.text:
            # The answer of a server someone else runs: a short, redacted summary only.
            reason = answer_summary(response.status_code, response.headers.get("content-type"),
                                    response.text, secrets=sent)
            return c.HealthVerdict(healthy=False, latency_ms=latency_ms, reason=reason)
        return c.HealthVerdict(healthy=True, reason="answered", latency_ms=latency_ms)

    @activity.defn(name=c.JUDGE_HEALTH)
    async def judge_health(self, input: c.JudgeHealthInput) -> Verdict:
        """Verdict on the target over [window_start, window_end], merged over all gateways.

        An unreachable gateway is skipped with a warning: its share of the traffic is
        missing, which can only make the verdict more likely inconclusive, never healthier.
        """
        until = input.window_end if input.window_end > 0 else time.time()
        since = input.window_start
        warmup: tuple[str, int] | None = None
        if input.warmup:  # a fresh engine's first seconds and requests say nothing
            since = min(until, since + input.thresholds.warmup_seconds)
            if input.thresholds.warmup_requests:
                warmup = (input.target_version, input.thresholds.warmup_requests)
        target = WindowSamples(input.target_version)
        stable = WindowSamples(input.stable_version) if input.stable_version else None
        gateways = await self.store.live_gateways(self.settings.gateway_live_after_s)
        stats, skipped = await self.admin.model_stats(gateways, input.model_id, since, until,
                                                      warmup=warmup)
        answered = [g.gateway_id for g in gateways if g.gateway_id not in skipped]
        for gateway_id, versions in zip(answered, stats, strict=True):
            for sample in (target, stable):
                entry = versions.get(sample.version) if sample is not None else None
                if sample is not None and entry is not None and entry.window is not None:
                    sample.add_window(entry.window, gateway_id)
        verdict = judge(target, stable, input.thresholds, compare=input.compare)
        verdict.window_start, verdict.window_end = input.window_start, until
        verdict.analysis["gateways"] = {"answered": answered, "skipped": skipped}
        if input.warmup:
            verdict.analysis["warmup"] = {
                "requests": input.thresholds.warmup_requests,
                "seconds": input.thresholds.warmup_seconds,
                "excluded": target.warmup_excluded,
                "judged_since": target.judged_since or since}
            verdict.reason += (f" (warm-up left out: the first {target.warmup_excluded} "
                               f"requests of {input.target_version}"
                               + (f" and {input.thresholds.warmup_seconds:g} s"
                                  if input.thresholds.warmup_seconds else "") + ")")
        if skipped:
            verdict.reason += f" ({len(skipped)} of {len(gateways)} gateways unreachable)"
        if not gateways:
            verdict.reason += " (no live gateway)"
        activity.logger.info("health of %s %s over %.0fs: %s: %s", input.model_id,
                             input.target_version, until - since, verdict.outcome,
                             verdict.reason)
        return verdict
