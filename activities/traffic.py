"""Traffic activities: write a model's route and wait until every live gateway serves it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.gateway_admin import GatewayAdmin
from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.domain import Backend, EngineState, GatewayInfo
from turnout.store import NotFound, Store

_POLL_S = 0.25


class TrafficActivities:
    def __init__(self, settings: ModelSwitchingConfig, store: Store,
                 admin: GatewayAdmin) -> None:
        self.settings = settings
        self.store = store
        self.admin = admin

    @activity.defn(name=c.SET_TRAFFIC)
    async def set_traffic(self, input: c.SetTrafficInput) -> c.SetTrafficResult:
        """Write the route (idempotent by change key), then wait for every gateway to apply it."""
        backends = await self._backends(input)
        # A shadow being mirrored to stays, unless this change serves its version.
        current = await self.store.get_route(input.model_id)
        shadow = current.shadow() if current else None
        if shadow is not None and shadow.version not in {b.version for b in backends}:
            backends.append(shadow)
        return await self._publish(input.model_id, backends, input.change_key)

    @activity.defn(name=c.SET_MIRROR)
    async def set_mirror(self, input: c.SetMirrorInput) -> c.SetTrafficResult:
        """Copy a share of the model's requests to a shadow version (0: stop), keeping the
        served split as it is; then wait for every gateway to apply it."""
        current = await self.store.get_route(input.model_id)
        if current is None or not current.weights():
            raise ApplicationError(f"{input.model_id} serves no traffic to mirror",
                                   type="InvalidRoute", non_retryable=True)
        backends = [b for b in current.backends if not b.is_shadow]
        if input.percent > 0 and input.version not in current.weights():
            backend = await self._endpoint(input.model_id, input.version)
            backends.append(backend.model_copy(update={"weight": 0,
                                                       "mirror_percent": input.percent}))
        return await self._publish(input.model_id, backends, input.change_key)

    async def _publish(self, model_id: str, backends: list[Backend],
                       change_key: str) -> c.SetTrafficResult:
        """Write the route (idempotent by change key), then wait for every gateway."""
        route = await self.store.write_route(model_id, backends, change_key)
        shadow = route.shadow()
        activity.logger.info("route of %s at generation %d: %s%s", model_id,
                             route.generation, route.weights(),
                             f", {shadow.mirror_percent:g}% mirrored to {shadow.version}"
                             if shadow else "")
        gateways = await self._wait_for_gateways(
            lambda state: state.get("generations", {}).get(model_id, 0) >= route.generation,
            what=f"generation {route.generation} of {model_id}", push=model_id)
        return c.SetTrafficResult(generation=route.generation, gateways=gateways)

    @activity.defn(name=c.DRAIN_VERSION)
    async def drain_version(self, input: c.DrainVersionInput) -> c.DrainVersionResult:
        """Wait until no gateway has a request in flight to the version, up to a deadline."""
        started = time.monotonic()
        deadline = started + min(input.timeout_s, self.settings.drain_timeout_s)
        left = 0
        while True:
            left = 0
            for gateway in await self._live_gateways():
                try:
                    state = await self.admin.state(gateway)
                except Exception as exc:  # an unreachable gateway has nothing we can wait for
                    activity.logger.warning("gateway %s unreachable while draining: %s",
                                            gateway.gateway_id, exc)
                    continue
                left += int(state.get("inflight", {}).get(input.model_id, {})
                            .get(input.version, 0))
            waited = time.monotonic() - started
            activity.heartbeat({"inflight": left})
            if left == 0:
                return c.DrainVersionResult(drained=True, waited_s=waited)
            if time.monotonic() >= deadline:
                activity.logger.warning("drain of %s/%s hit its deadline: %d in flight",
                                        input.model_id, input.version, left)
                return c.DrainVersionResult(drained=False, inflight_left=left, waited_s=waited)
            await asyncio.sleep(_POLL_S)

    async def _backends(self, input: c.SetTrafficInput) -> list[Backend]:
        total = sum(input.weights.values())
        if input.weights and abs(total - 100) > 0.01:
            raise ApplicationError(f"weights of {input.model_id} add up to {total:g}, not 100",
                                   type="InvalidRoute", non_retryable=True)
        backends = []
        for version, weight in sorted(input.weights.items()):
            if weight <= 0:
                continue
            backend = await self._endpoint(input.model_id, version)
            backends.append(backend.model_copy(update={"weight": weight}))
        return backends

    async def _endpoint(self, model_id: str, version: str) -> Backend:
        """Where a version is served: its ready engine's URL and served model name, and for
        an external endpoint the name of its credential variable (read by the gateways from
        their own environment; the value never enters the route)."""
        engine = next((e for e in await self.store.list_engines(
            model_id=model_id, version=version) if e.state is EngineState.READY), None)
        if engine is None:
            raise ApplicationError(f"{model_id} {version} has no ready engine",
                                   type="InvalidRoute", non_retryable=True)
        api_key_env = None
        if engine.external:
            with contextlib.suppress(NotFound):  # a version removed under its engine
                api_key_env = (await self.store.get_version(model_id, version)
                               ).config.api_key_env
        return Backend(version=version, weight=0, url=engine.url,
                       served_model_name=engine.served_model_name, api_key_env=api_key_env)

    async def _live_gateways(self) -> list[GatewayInfo]:
        return await self.store.live_gateways(self.settings.gateway_live_after_s)

    async def _wait_for_gateways(self, done: Callable[[dict[str, Any]], bool], *, what: str,
                                 push: str | None) -> list[str]:
        """Wait until `done(state)` holds at every live gateway; first push a refresh of the
        model named by `push`, if any."""
        deadline = time.monotonic() + self.settings.route_sync_timeout_s
        pending = {g.gateway_id: g for g in await self._live_gateways()}
        if not pending:
            activity.logger.warning("no live gateway to confirm %s", what)
        confirmed: list[str] = []
        first = True
        while pending:
            for gateway in list(pending.values()):
                try:
                    state = await (self.admin.refresh(gateway, push) if push and first
                                   else self.admin.state(gateway))
                except Exception as exc:
                    activity.logger.info("gateway %s not answering yet: %s",
                                         gateway.gateway_id, exc)
                    continue
                if done(state):
                    confirmed.append(pending.pop(gateway.gateway_id).gateway_id)
            first = False
            activity.heartbeat({"waiting_for": sorted(pending)})
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise ApplicationError(
                    f"gateways {sorted(pending)} did not apply {what} in "
                    f"{self.settings.route_sync_timeout_s:g}s", type="GatewaySyncTimeout")
            await asyncio.sleep(_POLL_S)
            # A gateway that stopped heartbeating is no longer live: stop waiting for it.
            live = {g.gateway_id for g in await self._live_gateways()}
            pending = {k: v for k, v in pending.items() if k in live}
        return confirmed
