"""The engine fleet's rules: what role an engine plays, where a load goes, what is evicted.

Pure code. The store records hosts (capacity, heartbeat), engines (host, state, memory)
and the holders of each version's engines (a switch, a shadow, a standby window, a
preload, the live route); activities read them, call these functions and act on the
answer. Keeping the decisions here means they can be tested exhaustively (property tests)
and read in one place:

* **roles** follow from holders and the route: an engine serves, is a rollout's candidate,
  mirrors as a shadow, waits as a standby after a switch, or was preloaded; an engine
  nothing holds is idle.
* **placement** spreads a version's replicas over hosts, one engine per host, reusing the
  hosts that already hold the version; it never plans past a host's memory, port range or
  cache size; to make room it evicts only cached engines (standby, preloaded, idle), the
  lowest priority first, then the least recently used. A preload may only evict engines of
  a lower priority than its own; a switch or a shadow may evict any cached engine.
* **sleep**: on hosts that support vLLM's sleep mode (CUDA), cached engines sleep.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from turnout.domain import EngineInfo
from turnout.limits import HOLDER_ID_MAX

GIB = 1024**3


class HolderKind(StrEnum):
    """Why a version's engines must stay loaded. An engine stops only when its last holder
    has let go of it."""

    SERVING = "serving"  # the model's live version
    SWITCH = "switch"  # a running switch's target (or stable version)
    SHADOW = "shadow"  # a shadow the gateways mirror to
    STANDBY = "standby"  # the previous live version, kept for an instant rollback
    PRELOAD = "preload"  # loaded ahead of a switch by an operator


class EngineRole(StrEnum):
    SERVING = "serving"
    CANDIDATE = "candidate"
    SHADOW = "shadow"
    PRELOADED = "preloaded"
    STANDBY = "standby"
    IDLE = "idle"


class Holder(BaseModel):
    """One reason to keep a version's engines loaded, as the store records it.

    `holder_id` names who holds: the switch's operation id, the shadow's workflow id, the
    operation that left a version standing by, the preload's id; the model id for the
    live version. `priority` ranks cached engines for eviction; `expires_at` ends a
    standby window.
    """

    model_id: str
    version: str
    kind: HolderKind
    # A preload's workflow id (`preload-<model>-<version>`) reaches 394 characters with
    # the longest names a registration allows; the store's column holds HOLDER_ID_MAX.
    holder_id: str = Field(max_length=HOLDER_ID_MAX)
    priority: int = 0
    expires_at: datetime | None = None
    since: datetime | None = None


class GpuDevice(BaseModel):
    index: int
    name: str = ""
    memory_bytes: int = 0


class HostCapacity(BaseModel):
    """What an engine host offers, recorded by its worker when it starts."""

    memory_bytes: int = 0  # memory engines may fill: GPU memory on CUDA hosts
    engine_extra_bytes: int = 0  # per engine beside its weights (KV cache, runtime)
    gpus: list[GpuDevice] = Field(default_factory=list)
    max_cached_models: int = 5
    port_start: int = 0
    port_end: int = 0
    cpu_count: int = 1
    sleep_mode: bool = False  # vLLM's sleep mode works here (CUDA)

    @property
    def ports(self) -> int:
        return max(0, self.port_end - self.port_start + 1)


class EngineHost(BaseModel):
    """An engine host: one engine worker claims it (`instance_id`) and heartbeats."""

    host_id: str
    task_queue: str
    instance_id: str = ""
    capacity: HostCapacity = Field(default_factory=HostCapacity)
    started_at: datetime | None = None
    last_seen: datetime | None = None

    def view(self, *, live: bool) -> HostView:
        return HostView(self.host_id, self.task_queue, self.capacity.memory_bytes,
                        self.capacity.max_cached_models, self.capacity.ports, live,
                        self.capacity.engine_extra_bytes)


# A role per holder kind, most important first: an engine's role is its most important one.
_ROLE_OF: dict[HolderKind, EngineRole] = {
    HolderKind.SERVING: EngineRole.SERVING,
    HolderKind.SWITCH: EngineRole.CANDIDATE,
    HolderKind.SHADOW: EngineRole.SHADOW,
    HolderKind.PRELOAD: EngineRole.PRELOADED,
    HolderKind.STANDBY: EngineRole.STANDBY,
}
_RANK = {role: rank for rank, role in enumerate(EngineRole)}
# Roles whose engines form a host's cache: loaded, serving nothing, evictable.
CACHED_ROLES = frozenset({EngineRole.STANDBY, EngineRole.PRELOADED, EngineRole.IDLE})


def engine_role(holders: Iterable[HolderKind], *, serving: bool = False,
                shadow: bool = False) -> EngineRole:
    """The role of a version's engines.

    `serving` (the route gives the version a share or it is the live version) and `shadow`
    (the route mirrors to it) come from the route itself, so that an engine a route still
    sends requests to is never taken for a cached one, whatever its holders say (engines
    loaded before holders were recorded have none).
    """
    roles = [_ROLE_OF[HolderKind(kind)] for kind in holders]
    if serving:
        roles.append(EngineRole.SERVING)
    if shadow:
        roles.append(EngineRole.SHADOW)
    return min(roles, key=_RANK.__getitem__, default=EngineRole.IDLE)


def should_sleep(role: EngineRole, *, sleep_mode: bool) -> bool:
    """Whether an engine should sleep: a cached engine on a host with vLLM's sleep mode
    (level 1 keeps the weights in CPU memory, so waking takes seconds, not a reload).
    On CPU hosts vLLM refuses sleep mode, so engines there stay awake."""
    return sleep_mode and role in CACHED_ROLES


def engine_memory_estimate(weights_bytes: int, *, kv_cache_bytes: int,
                           overhead_bytes: int) -> int:
    """Memory an engine of a model needs: its weights, the KV cache it is configured with,
    and the engine's own runtime (Python, torch, the API server), measured once per kind
    of host and configured."""
    return max(0, weights_bytes) + max(0, kv_cache_bytes) + max(0, overhead_bytes)


@dataclass(frozen=True)
class HostView:
    """An engine host as placement sees it: its capacity and whether it is alive."""

    host_id: str
    task_queue: str
    memory_bytes: int  # memory turnout may fill with engines on this host
    max_cached_models: int  # most cached (standby, preloaded, idle) engines
    ports: int  # engines the host's port range can hold
    live: bool = True
    # What every engine on this host needs beside its weights: the KV cache it is given
    # and the engine's runtime (see `engine_memory_estimate`).
    engine_extra_bytes: int = 0

    def need(self, request: LoadRequest) -> int:
        return max(0, request.weights_bytes) + self.engine_extra_bytes


@dataclass(frozen=True)
class EngineView:
    """A loaded (or loading) engine as placement sees it."""

    model_id: str
    version: str
    host_id: str
    memory_bytes: int
    role: EngineRole = EngineRole.IDLE
    priority: int = 0
    last_used: float = 0.0  # epoch seconds: when it last served, or was loaded
    ready: bool = True  # False while starting: a load in progress is never evicted

    @property
    def cached(self) -> bool:
        return self.role in CACHED_ROLES


@dataclass(frozen=True)
class LoadRequest:
    """Engines wanted for one version.

    `priority` None is a switch's or a shadow's load: it may evict any cached engine. A
    preload gives its priority and may only evict cached engines of a lower priority; its
    engines are cached ones themselves, so they count against `max_cached_models`.
    """

    model_id: str
    version: str
    weights_bytes: int  # 0 when not known yet: the host checks again when it loads
    replicas: int = 1
    priority: int | None = None

    @property
    def cached(self) -> bool:
        return self.priority is not None


@dataclass(frozen=True)
class HostPlacement:
    """One replica's place: reuse the engine the host already has, or start one there
    after stopping `evict`."""

    host_id: str
    task_queue: str
    reuse: bool = False
    evict: tuple[EngineView, ...] = ()


@dataclass(frozen=True)
class Placement:
    replicas: tuple[HostPlacement, ...]

    @property
    def evictions(self) -> list[EngineView]:
        return [engine for replica in self.replicas for engine in replica.evict]


@dataclass
class PlacementError(Exception):
    """No host can take the load; `blocking` are the engines that would have to go."""

    reason: str
    blocking: list[EngineView] = field(default_factory=list)

    def __str__(self) -> str:
        return self.reason


def may_evict(engine: EngineView, request: LoadRequest) -> bool:
    """A cached, ready engine of another version — of a lower priority, for a preload."""
    if not engine.cached or not engine.ready:
        return False
    if (engine.model_id, engine.version) == (request.model_id, request.version):
        return False
    return request.priority is None or engine.priority < request.priority


def eviction_order(engines: Iterable[EngineView]) -> list[EngineView]:
    """Lowest priority first, then least recently used, then a stable tie-break."""
    return sorted(engines, key=lambda e: (e.priority, e.last_used, e.model_id, e.version))


@dataclass(frozen=True)
class _Fit:
    host: HostView
    evict: tuple[EngineView, ...]
    fits: bool
    free_after: int  # memory left after the load (negative: short by that much)


def _fit(host: HostView, on_host: Sequence[EngineView], request: LoadRequest) -> _Fit:
    need = host.need(request)
    free = host.memory_bytes - sum(e.memory_bytes for e in on_host)
    ports = host.ports - len(on_host)
    cached = sum(e.cached for e in on_host)

    def room() -> bool:
        return (free >= need and ports >= 1
                and (not request.cached or cached < host.max_cached_models))

    evict: list[EngineView] = []
    candidates = eviction_order(e for e in on_host if may_evict(e, request))
    while not room() and candidates:
        engine = candidates.pop(0)
        evict.append(engine)
        free += engine.memory_bytes
        ports += 1
        cached -= 1
    return _Fit(host, tuple(evict), room(), free - need)


def place(request: LoadRequest, hosts: Iterable[HostView],
          engines: Iterable[EngineView]) -> Placement:
    """Where the version's `replicas` engines go; raises `PlacementError` when they
    cannot all be placed without exceeding a host or evicting what may not be evicted.

    Hosts that already hold the version (any role) keep it: their engine is reused, which
    is what makes a switch to a standby or preloaded version instant. The other replicas
    go to the hosts that fit them with the fewest evictions, then the most memory left,
    one engine of the version per host.
    """
    if request.replicas < 1:
        raise PlacementError("replicas must be at least 1")
    live = {h.host_id: h for h in hosts if h.live}
    by_host: dict[str, list[EngineView]] = {}
    for engine in engines:
        if engine.host_id in live:
            by_host.setdefault(engine.host_id, []).append(engine)
    key = (request.model_id, request.version)
    holding = sorted(h for h, on_host in by_host.items()
                     if any((e.model_id, e.version) == key for e in on_host))
    chosen = [HostPlacement(h, live[h].task_queue, reuse=True)
              for h in holding[:request.replicas]]
    wanted = request.replicas - len(chosen)
    free_hosts = [h for h in sorted(live) if h not in holding]
    if wanted > len(free_hosts):
        raise PlacementError(
            f"{request.replicas} replicas of {request.version} need {request.replicas} live "
            f"engine hosts (one engine per host); {len(live)} "
            f"{'is' if len(live) == 1 else 'are'} live")
    for _ in range(wanted):
        fits = [_fit(live[h], by_host.get(h, []), request) for h in free_hosts]
        good = [f for f in fits if f.fits]
        if not good:
            raise _no_room(request, fits, by_host)
        best = min(good, key=lambda f: (len(f.evict), -f.free_after, f.host.host_id))
        chosen.append(HostPlacement(best.host.host_id, best.host.task_queue,
                                    evict=best.evict))
        free_hosts.remove(best.host.host_id)
    return Placement(tuple(chosen))


def _no_room(request: LoadRequest, fits: list[_Fit],
             by_host: dict[str, list[EngineView]]) -> PlacementError:
    if not fits:
        return PlacementError(f"no live engine host can load {request.version}")
    best = max(fits, key=lambda f: (f.free_after, f.host.host_id))
    need = best.host.need(request)
    largest = best.free_after + need
    blocking = [e for e in eviction_order(by_host.get(best.host.host_id, []))
                if not may_evict(e, request)]
    reason = (f"{request.model_id} {request.version} needs about "
              f"{need / GIB:.1f} GiB; the largest free is "
              f"{max(0, largest) / GIB:.1f} GiB on host {best.host.host_id}")
    if request.cached and best.free_after >= 0:
        reason = (f"host {best.host.host_id} already caches "
                  f"{best.host.max_cached_models} engine(s) (max_cached_models) that a "
                  f"preload of priority {request.priority} may not evict")
    if blocking:
        reason += "; it would have to evict " + ", ".join(
            f"{e.model_id} {e.version} ({e.role.value}, priority {e.priority})"
            for e in blocking)
    return PlacementError(reason, blocking)


def cache_overflow(host: HostView, engines: Iterable[EngineView]) -> list[EngineView]:
    """Cached engines to stop so that the host holds at most `max_cached_models` of them,
    and no more memory than it has (e.g. after a switch left its old version standing by)."""
    on_host = [e for e in engines if e.host_id == host.host_id]
    cached = eviction_order(e for e in on_host if e.cached and e.ready)
    excess_count = len(cached) - host.max_cached_models
    excess_memory = sum(e.memory_bytes for e in on_host) - host.memory_bytes
    stop: list[EngineView] = []
    for engine in cached:
        if excess_count <= 0 and excess_memory <= 0:
            break
        stop.append(engine)
        excess_count -= 1
        excess_memory -= engine.memory_bytes
    return stop


# ---------------------------------------------------------------------- the fleet as stored


class EngineReport(BaseModel):
    """One engine in `GET /engines`."""

    model_id: str
    version: str
    host: str
    port: int | None = None
    role: EngineRole
    state: str
    memory_bytes: int = 0
    since: datetime | None = None
    last_used_at: datetime | None = None
    priority: int = 0
    held_by: list[str] = Field(default_factory=list)  # "switch:<op>", "standby:<op>", ...
    sleeping: bool = False
    external: bool = False


class HostReport(BaseModel):
    """One engine host in `GET /engines`: its capacity, what is used, what is free."""

    host_id: str
    task_queue: str
    live: bool
    last_seen: datetime | None = None
    capacity: HostCapacity
    used_bytes: int = 0
    free_bytes: int = 0
    engines: int = 0
    cached: int = 0


class FleetReport(BaseModel):
    hosts: list[HostReport] = Field(default_factory=list)
    engines: list[EngineReport] = Field(default_factory=list)


@dataclass
class FleetState:
    """Everything placement and `GET /engines` need, as read from the store at one moment.

    `serving` maps each model to the versions its route gives a share (and its live
    version), `shadows` to the version its route mirrors to; `measured` holds the latest
    resident memory each host measured of its engines, by (model, version, host).
    """

    hosts: list[EngineHost]
    engines: list[EngineInfo]
    holders: list[Holder]
    serving: dict[str, set[str]]
    shadows: dict[str, str]
    weights: dict[tuple[str, str], int]  # (model, version) -> weights size, where known
    measured: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def live_host_ids(self, now: datetime, live_after_s: float) -> set[str]:
        return {h.host_id for h in self.hosts
                if h.last_seen is not None
                and (now - h.last_seen).total_seconds() <= live_after_s}

    def holders_of(self, model_id: str, version: str) -> list[Holder]:
        return [h for h in self.holders if (h.model_id, h.version) == (model_id, version)]

    def role(self, model_id: str, version: str) -> EngineRole:
        return engine_role((h.kind for h in self.holders_of(model_id, version)),
                           serving=version in self.serving.get(model_id, set()),
                           shadow=self.shadows.get(model_id) == version)

    def held(self, model_id: str, version: str) -> bool:
        """Whether anything keeps the version loaded (a holder, or the route)."""
        return self.role(model_id, version) is not EngineRole.IDLE

    def engine_memory(self, engine: EngineInfo) -> int:
        """What an engine takes: the larger of its host's estimate and what was measured."""
        host = next((h for h in self.hosts if h.host_id == engine.host), None)
        estimate = engine.memory_bytes if engine.memory_bytes is not None else (
            self.weights.get((engine.model_id, engine.version), 0)
            + (host.capacity.engine_extra_bytes if host else 0))
        return max(estimate, self.measured.get(
            (engine.model_id, engine.version, engine.host), 0))

    def views(self) -> list[EngineView]:
        """The engines placement reasons about (external endpoints take no host memory)."""
        views = []
        for e in self.engines:
            if e.external:
                continue
            holders = self.holders_of(e.model_id, e.version)
            used = e.last_used_at or e.started_at
            views.append(EngineView(
                e.model_id, e.version, e.host, self.engine_memory(e),
                self.role(e.model_id, e.version), max((h.priority for h in holders), default=0),
                used.timestamp() if used else 0.0, ready=e.state.value == "ready"))
        return views

    def host_views(self, now: datetime, live_after_s: float) -> list[HostView]:
        live = self.live_host_ids(now, live_after_s)
        return [h.view(live=h.host_id in live) for h in self.hosts]

    def report(self, now: datetime, live_after_s: float) -> FleetReport:
        live = self.live_host_ids(now, live_after_s)
        views = {(v.model_id, v.version, v.host_id): v for v in self.views()}
        engines = []
        for e in sorted(self.engines, key=lambda e: (e.model_id, e.version, e.host)):
            view = views.get((e.model_id, e.version, e.host))
            engines.append(EngineReport(
                model_id=e.model_id, version=e.version, host=e.host, port=e.port,
                role=self.role(e.model_id, e.version), state=e.state.value,
                memory_bytes=view.memory_bytes if view else 0, since=e.started_at,
                last_used_at=e.last_used_at, priority=view.priority if view else 0,
                held_by=[f"{h.kind.value}:{h.holder_id}"
                         for h in self.holders_of(e.model_id, e.version)],
                sleeping=e.sleeping, external=e.external))
        hosts = []
        for h in self.hosts:
            on_host = [v for v in views.values() if v.host_id == h.host_id]
            used = sum(v.memory_bytes for v in on_host)
            hosts.append(HostReport(
                host_id=h.host_id, task_queue=h.task_queue, live=h.host_id in live,
                last_seen=h.last_seen, capacity=h.capacity, used_bytes=used,
                free_bytes=max(0, h.capacity.memory_bytes - used), engines=len(on_host),
                cached=sum(v.cached for v in on_host)))
        return FleetReport(hosts=hosts, engines=engines)
