"""Fleet activities: hold versions, place their engines, let them go — on the control worker.

They only read and write the store and call the pure rules of `turnout.fleet`; starting
and stopping engines stays with each host's engine worker, which the workflow calls on
the host's task queue with the slots these return. Every call is idempotent: holding
twice refreshes the holder, releasing twice finds nothing to release.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from turnout import contracts as c
from turnout.config import ModelSwitchingConfig, engine_task_queue
from turnout.domain import EngineInfo, EngineState, VersionInfo
from turnout.fleet import (
    FleetState,
    Holder,
    HolderKind,
    LoadRequest,
    PlacementError,
    cache_overflow,
    place,
)
from turnout.store import NotFound, Store
from turnout.store.fleet import read_fleet
from turnout.store.schema import utcnow

# Errors: PLACEMENT_FAILED, a load no host can take (non-retryable: the fleet decides);
# NO_LIVE_HOST, no engine host heartbeats (retried: workers may be starting).
PLACEMENT_FAILED, NO_LIVE_HOST = c.PLACEMENT_FAILED, c.NO_LIVE_HOST
EXTERNAL_HOST = "external"
# How long a loaded engine may take to answer `/health` and still count as warm.
HEALTH_PROBE_S = 2.0


class FleetActivities:
    def __init__(self, settings: ModelSwitchingConfig, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._http = httpx.AsyncClient(timeout=HEALTH_PROBE_S)

    async def close(self) -> None:
        await self._http.aclose()

    @activity.defn(name=c.PLACE_VERSION)
    async def place_version(self, input: c.PlaceVersionInput) -> c.PlaceVersionResult:
        """Hold the version for `input.holder`, then choose the hosts of its engines."""
        version = await self._version(input.model_id, input.version)
        if input.holder is not None:
            await self.store.hold(input.holder)
        if version.config.endpoint:
            await self._record_external(version)
            return c.PlaceVersionResult(warm=True, external=True)
        state = await read_fleet(self.store)
        request = LoadRequest(
            input.model_id, input.version,
            weights_bytes=state.weights.get((input.model_id, input.version), 0),
            replicas=input.replicas or version.config.replicas,
            priority=input.holder.priority
            if input.holder and input.holder.kind is HolderKind.PRELOAD else None)
        hosts = state.host_views(utcnow(), self._live_after())
        if not any(h.live for h in hosts):
            # Engine workers starting (or restarting): worth waiting for, within the
            # activity's retries, rather than failing the switch.
            raise ApplicationError(
                f"no engine host is live to load {input.version} "
                f"({len(hosts)} known, none heartbeating within "
                f"{self._live_after():g} s)", type=NO_LIVE_HOST)
        try:
            placement = place(request, hosts, state.views())
        except PlacementError as exc:
            raise ApplicationError(str(exc), type=PLACEMENT_FAILED, non_retryable=True) \
                from None
        queues = {h.host_id: h.task_queue for h in state.hosts}
        # A sleeping engine is warm too, but its host wakes it first (a load, then).
        ready = await self._answering(
            [e for e in state.engines
             if (e.model_id, e.version) == (input.model_id, input.version)
             and e.state is EngineState.READY and not e.external and not e.sleeping])
        activity.logger.info("placing %s %s on %s%s", input.model_id, input.version,
                             ", ".join(r.host_id + (" (loaded)" if r.reuse else "")
                                       for r in placement.replicas),
                             f"; evicting {len(placement.evictions)}"
                             if placement.evictions else "")
        return c.PlaceVersionResult(
            replicas=[c.EngineSlot(model_id=input.model_id, version=input.version,
                                   host_id=r.host_id, task_queue=r.task_queue)
                      for r in placement.replicas],
            evict=[c.EngineSlot(model_id=e.model_id, version=e.version, host_id=e.host_id,
                                task_queue=queues[e.host_id]) for e in placement.evictions],
            warm=all(r.reuse and r.host_id in ready for r in placement.replicas))

    @activity.defn(name=c.RELEASE_VERSION)
    async def release_version(self, input: c.ReleaseVersionInput) -> c.ReleaseVersionResult:
        """Drop one holder; the engines nothing holds any more are to be stopped."""
        await self.store.release(input.model_id, input.version, input.kind, input.holder_id)
        return c.ReleaseVersionResult(stop=await self._unheld(input.model_id, input.version))

    @activity.defn(name=c.RETIRE_VERSION)
    async def retire_version(self, input: c.RetireVersionInput) -> c.RetireVersionResult:
        """The version a switch replaced: stands by for `standby_minutes` (so a rollback
        is a route change), evicting what its hosts cannot cache any more; or, without a
        standby window, is let go."""
        await self.store.release(input.model_id, input.version, HolderKind.SERVING)
        await self.store.mark_engines_used(input.model_id, input.version)
        version = await self._version(input.model_id, input.version)
        minutes = self.settings.standby_minutes
        if minutes <= 0 or version.config.endpoint:
            return c.RetireVersionResult(stop=await self._unheld(input.model_id,
                                                                 input.version))
        until = utcnow() + timedelta(minutes=minutes)
        await self.store.hold(Holder(model_id=input.model_id, version=input.version,
                                     kind=HolderKind.STANDBY, holder_id=input.operation_id,
                                     expires_at=until))
        state = await read_fleet(self.store)
        hosts = {e.host for e in state.engines
                 if (e.model_id, e.version) == (input.model_id, input.version)}
        views = state.views()
        evict = [c.EngineSlot(model_id=e.model_id, version=e.version, host_id=e.host_id,
                              task_queue=h.task_queue)
                 for h in state.host_views(utcnow(), self._live_after()) if h.host_id in hosts
                 for e in cache_overflow(h, views)]
        activity.logger.info("%s %s stands by until %s%s", input.model_id, input.version,
                             f"{until:%H:%M:%S}",
                             f"; evicting {len(evict)}" if evict else "")
        return c.RetireVersionResult(standby_until=until, evict=evict)

    # ------------------------------------------------------------------ helpers

    async def _answering(self, engines: list[EngineInfo]) -> set[str]:
        """Hosts whose ready engine answers `/health` now: a switch to them needs no load.
        (One that does not answer is loaded again by its host, which restarts it.)"""
        async def answers(engine: EngineInfo) -> bool:
            try:
                return (await self._http.get(f"{engine.url}/health")).status_code == 200
            except httpx.HTTPError:
                return False

        healthy = await asyncio.gather(*(answers(e) for e in engines))
        return {e.host for e, ok in zip(engines, healthy, strict=True) if ok}

    def _live_after(self) -> float:
        return self.settings.engine_host_live_after_s

    async def _version(self, model_id: str, version: str) -> VersionInfo:
        try:
            return await self.store.get_version(model_id, version)
        except NotFound as exc:
            raise ApplicationError(str(exc), type=c.VERSION_NOT_FOUND,
                                   non_retryable=True) from None

    async def _record_external(self, version: VersionInfo) -> None:
        """An external endpoint needs no host: its record is what routes and probes read."""
        existing = await self.store.get_engine(version.model_id, version.version,
                                               EXTERNAL_HOST)
        config = version.config
        await self.store.save_engine(EngineInfo(
            model_id=version.model_id, version=version.version, host=EXTERNAL_HOST,
            url=(config.endpoint or "").rstrip("/"),
            served_model_name=config.served_model_name or config.model,
            state=EngineState.READY, external=True,
            started_at=existing.started_at if existing else None))

    async def _unheld(self, model_id: str, version: str) -> list[c.EngineSlot]:
        """The version's engines, if nothing holds the version any more (externals are
        forgotten here: there is nothing to stop)."""
        state: FleetState = await read_fleet(self.store)
        if state.held(model_id, version):
            return []
        queues = {h.host_id: h.task_queue for h in state.hosts}
        slots = []
        for engine in state.engines:
            if (engine.model_id, engine.version) != (model_id, version):
                continue
            if engine.external:
                await self.store.delete_engine(model_id, version, engine.host)
                continue
            slots.append(c.EngineSlot(model_id=model_id, version=version,
                                      host_id=engine.host,
                                      task_queue=queues.get(engine.host)
                                      or engine_task_queue(engine.host)))
        return slots
