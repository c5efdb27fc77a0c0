"""Traffic activities: write a model's route and wait until every live gateway serves it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.gateway_admin import GatewayAdmin
from turnout import contracts as c
from turnout.config import ModelSwitchingConfig
from turnout.domain import Backend, EngineState, GatewayInfo, Replica, Route
from turnout.gateway_protocol import AdminState
from turnout.replicas import route_engines
from turnout.store import NotFound, Store
from turnout.store.repo import RouteChange

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
        served = {b.version for b in backends}

        def shift(current: Route | None) -> list[Backend]:
            # A shadow being mirrored to stays, unless this change serves its version.
            shadow = current.shadow() if current else None
            if shadow is not None and shadow.version not in served:
                return [*backends, shadow]
            return list(backends)

        return await self._publish(input.model_id, shift, input.change_key)

    @activity.defn(name=c.SET_MIRROR)
    async def set_mirror(self, input: c.SetMirrorInput) -> c.SetTrafficResult:
        """Copy a share of the model's requests to a shadow version (0: stop), keeping the
        served split as it is; then wait for every gateway to apply it."""
        shadow: Backend | ApplicationError | None = None
        if input.percent > 0:  # where the shadow is served, found before the write
            try:
                shadow = (await self._backend(input.model_id, input.version, 0)) \
                    .model_copy(update={"mirror_percent": input.percent})
            except ApplicationError as err:  # refused below, if the shadow is needed
                shadow = err

        def mirror(current: Route | None) -> list[Backend]:
            if current is None or not current.weights():
                raise ApplicationError(f"{input.model_id} serves no traffic to mirror",
                                       type=c.INVALID_ROUTE, non_retryable=True)
            backends = [b for b in current.backends if not b.is_shadow]
            if input.percent > 0 and input.version not in current.weights():
                if isinstance(shadow, ApplicationError):
                    raise shadow
                assert shadow is not None
                backends.append(shadow)
            return backends

        return await self._publish(input.model_id, mirror, input.change_key)

    @activity.defn(name=c.REFRESH_ROUTE)
    async def refresh_route(self, input: c.RefreshRouteInput) -> c.SetTrafficResult:
        """The same split, written again from the engines as they are now: a replaced
        engine listens at a new address, and every gateway must route to it."""
        current = await self.store.get_route(input.model_id)
        if current is None or not current.backends:
            return c.SetTrafficResult(generation=current.generation if current else 0)
        fresh: dict[str, Backend] = {}
        for backend in current.backends:
            with contextlib.suppress(ApplicationError):  # no ready engine of it right now
                fresh[backend.version] = await self._backend(input.model_id, backend.version,
                                                             backend.weight)

        def refresh(now: Route | None) -> list[Backend]:
            # Shares as they are at the write; addresses as just read (or kept as they were).
            return [fresh[b.version].model_copy(update={"weight": b.weight,
                                                        "mirror_percent": b.mirror_percent})
                    if b.version in fresh else b for b in (now.backends if now else [])]

        return await self._publish(input.model_id, refresh, input.change_key)

    async def _publish(self, model_id: str, change: RouteChange,
                       change_key: str) -> c.SetTrafficResult:
        """Write the route (atomically, idempotent by change key), then wait for every
        gateway to serve it."""
        route = await self.store.update_route(model_id, change, change_key)
        shadow = route.shadow()
        activity.logger.info("route of %s at generation %d: %s%s", model_id,
                             route.generation, route.weights(),
                             f", {shadow.mirror_percent:g}% mirrored to {shadow.version}"
                             if shadow else "")
        gateways = await self._wait_for_gateways(
            lambda state: state.generation(model_id) >= route.generation,
            what=f"generation {route.generation} of {model_id}", push=model_id)
        return c.SetTrafficResult(generation=route.generation, gateways=gateways)

    @activity.defn(name=c.DRAIN_VERSION)
    async def drain_version(self, input: c.DrainVersionInput) -> c.DrainVersionResult:
        """Wait until no gateway has a request in flight to the version (or to one of its
        replicas, see `DrainVersionInput.replica`), up to a deadline."""
        started = time.monotonic()
        deadline = started + min(input.timeout_s, self.settings.drain_timeout_s)
        what = f"{input.model_id}/{input.version}" + (
            f" replica {input.replica}" if input.replica else "")
        first = True
        while True:
            left, routed_at = 0, []
            for gateway in await self._live_gateways():
                try:
                    # One replica: first make each gateway re-read the model's engines, so
                    # one that stopped being ready is out of its routes at once.
                    state = await (self.admin.refresh(gateway, input.model_id)
                                   if input.replica and first else self.admin.state(gateway))
                except Exception as exc:  # an unreachable gateway has nothing we can wait for
                    activity.logger.warning("gateway %s unreachable while draining: %s",
                                            gateway.gateway_id, exc)
                    continue
                if not input.replica or state.replicas is None:
                    # A gateway from before replicas counts the whole version: wait for it.
                    left += state.inflight_of(input.model_id, input.version)
                    continue
                matching = [r for r in state.replicas_of(input.model_id, input.version)
                            if input.replica in (r.url, r.host)]
                left += sum(r.inflight for r in matching)
                if any(r.routed for r in matching):
                    routed_at.append(gateway.gateway_id)
            first = False
            waited = time.monotonic() - started
            activity.heartbeat({"inflight": left, "routed_at": routed_at})
            if left == 0 and not routed_at:
                return c.DrainVersionResult(drained=True, waited_s=waited)
            if time.monotonic() >= deadline:
                activity.logger.warning("drain of %s hit its deadline: %d in flight%s", what,
                                        left, f", still routed at {routed_at}"
                                        if routed_at else "")
                return c.DrainVersionResult(drained=False, inflight_left=left, waited_s=waited,
                                            routed_at=routed_at)
            await asyncio.sleep(_POLL_S)

    async def _backends(self, input: c.SetTrafficInput) -> list[Backend]:
        total = sum(input.weights.values())
        if input.weights and abs(total - 100) > 0.01:
            raise ApplicationError(f"weights of {input.model_id} add up to {total:g}, not 100",
                                   type=c.INVALID_ROUTE, non_retryable=True)
        backends = []
        for version, weight in sorted(input.weights.items()):
            if weight <= 0:
                continue
            backends.append(await self._backend(input.model_id, version, weight))
        return backends

    async def _backend(self, model_id: str, version: str, weight: float) -> Backend:
        """A version's share and where it is served: every ready engine of the version
        (external endpoints included), but those on hosts that stopped heartbeating,
        unless that would leave none (then all, and the gateways' failover copes); for an
        external endpoint the name of its credential variable (read by the gateways from
        their own environment; the value never enters the route)."""
        engines = await self.store.list_engines(model_id=model_id, version=version)
        if not any(e.state is EngineState.READY for e in engines):
            raise ApplicationError(f"{model_id} {version} has no ready engine",
                                   type=c.NO_READY_ENGINE, non_retryable=True)
        last_seen = {h.host_id: h.last_seen for h in await self.store.list_hosts()
                     if h.last_seen is not None}
        named, silent = route_engines(engines, last_seen, datetime.now(UTC),
                                      self.settings.engine_host_live_after_s)
        if silent and named == silent:
            activity.logger.warning("%s %s: every host with a ready engine of it is silent "
                                    "(%s); routing to them all", model_id, version,
                                    [e.host for e in named])
        elif silent:
            activity.logger.warning("%s %s: left the engines on silent hosts %s out of its "
                                    "route", model_id, version, [e.host for e in silent])
        api_key_env = None
        if any(e.external for e in named):  # its credential is named, never carried
            with contextlib.suppress(NotFound):  # a version removed under its engine
                api_key_env = (await self.store.get_version(model_id, version)
                               ).config.api_key_env
        return Backend(version=version, weight=weight, url=named[0].url,
                       served_model_name=named[0].served_model_name, api_key_env=api_key_env,
                       replicas=[Replica(url=e.url, host=e.host) for e in named])

    async def _live_gateways(self) -> list[GatewayInfo]:
        return await self.store.live_gateways(self.settings.gateway_live_after_s)

    async def _wait_for_gateways(self, done: Callable[[AdminState], bool], *, what: str,
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
                    f"{self.settings.route_sync_timeout_s:g}s", type=c.GATEWAY_SYNC_TIMEOUT)
            await asyncio.sleep(_POLL_S)
            # A gateway that stopped heartbeating is no longer live: stop waiting for it.
            live = {g.gateway_id for g in await self._live_gateways()}
            pending = {k: v for k, v in pending.items() if k in live}
        return confirmed
