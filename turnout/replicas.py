"""A version's replicas: which of its engines take requests, and which one a request goes to.

Pure code (no I/O), shared by the traffic activity, which writes a route naming every
ready engine of each version, and the gateway, which spreads each version's share over
those replicas:

* **which replicas take requests**: those whose engine is ready, at the address the route
  names, on a host that still heartbeats (`replica_out`). A version is never left with
  none because of it: when every replica of a version is out, all of them are kept (the
  gateway's failover then does what it can), since a route with nothing would refuse
  every request while a silent host may well still answer.
* **which replica a request goes to** (`ReplicaSet.pick`): the one with the fewest
  requests in flight from this gateway; ties go round-robin, so that sequential requests
  (nothing ever in flight when the next one comes) still spread evenly. The version is
  chosen first (weights, stickiness, rules), the replica after, so stickiness is per
  version and a replica leaving moves no user to another version.

`ReplicaBalancer` holds one gateway's replica sets. The reconcile loop feeds it the
engines' states and hosts' heartbeats (`set_engines`) and rebuilds the sets (`sync`);
the request path only looks a set up (`replicas`) and picks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from turnout.domain import Backend, EngineInfo, EngineState, Replica, Route

EngineKey = tuple[str, str, str]  # (model id, version, host)


def host_is_live(last_seen: datetime | None, now: datetime, live_after_s: float) -> bool:
    """Whether a host's last heartbeat is recent enough. A host with no heartbeat record
    (an external endpoint, or a host no engine worker claims) has nothing to judge it by,
    and counts as live."""
    return last_seen is None or (now - last_seen).total_seconds() <= live_after_s


def route_engines(engines: Iterable[EngineInfo], last_seen: Mapping[str, datetime], now: datetime,
                  live_after_s: float) -> tuple[list[EngineInfo], list[EngineInfo]]:
    """(the engines a route names, those on silent hosts) among a version's ready
    `engines`, ordered by host so that a rewritten route lists them in the same order.

    Engines on hosts whose heartbeat (`last_seen`, by host id) is older than
    `live_after_s` are left out, unless that would leave none: then all are named (and
    all are silent).
    """
    ready = sorted((e for e in engines if e.state is EngineState.READY),
                   key=lambda e: (e.host, e.url))
    silent = [e for e in ready if not host_is_live(last_seen.get(e.host), now, live_after_s)]
    live = [e for e in ready if e not in silent]
    return live or ready, silent


@dataclass(frozen=True)
class EngineReplica:
    """One engine as the gateways judge it: where it answers, its state, and when its host
    last heartbeat (None: the host has no heartbeat record, see `host_is_live`)."""

    model_id: str
    version: str
    host: str
    url: str
    state: EngineState
    host_last_seen: datetime | None = None

    @property
    def key(self) -> EngineKey:
        return (self.model_id, self.version, self.host)


def replica_out(replica: Replica, engine: EngineReplica | None, now: datetime,
                live_after_s: float) -> str | None:
    """Why `replica` should take no request (None: it may). `engine` is the store's record
    of the version's engine on the replica's host (None: there is none any more)."""
    if not replica.host:
        return None  # a route written without hosts: nothing to judge it by
    if engine is None:
        return f"no engine on host {replica.host} any more"
    if engine.url != replica.url:
        return f"the engine on host {replica.host} now answers at another address"
    if engine.state is not EngineState.READY:
        return f"its engine is {engine.state.value}"
    if not host_is_live(engine.host_last_seen, now, live_after_s):
        assert engine.host_last_seen is not None
        silent = (now - engine.host_last_seen).total_seconds()
        return f"host {replica.host} has not heartbeat for {silent:.0f} s"
    return None


class ReplicaSlot:
    """One replica as one gateway tracks it: requests in flight to it from this gateway,
    and whether requests are sent to it (`routed`; one that left keeps its count until
    its requests end, so a drain can wait for them)."""

    __slots__ = ("url", "host", "base", "inflight", "routed")

    def __init__(self, url: str, host: str) -> None:
        self.url = url
        self.host = host
        self.base = url.rstrip("/")  # worked out once, not per request
        self.inflight = 0
        self.routed = True

    def __repr__(self) -> str:
        return f"ReplicaSlot({self.url!r}, host={self.host!r}, inflight={self.inflight})"


class ReplicaSet:
    """The replicas of one version in one route: those that take requests (`active`,
    never empty) and every one the route names (`every`), built from `backend`."""

    __slots__ = ("backend", "active", "every", "kept_all", "_turn")

    def __init__(self, backend: Backend, active: list[ReplicaSlot], every: list[ReplicaSlot],
                 *, kept_all: bool = False, turn: int = 0) -> None:
        self.backend = backend
        self.active = active
        self.every = every
        self.kept_all = kept_all  # every replica was out: all are kept
        self._turn = turn

    def pick(self, exclude: ReplicaSlot | None = None) -> ReplicaSlot | None:
        """The active replica with the fewest requests in flight, other than `exclude`
        (None: no other). Ties go to the first one from a starting point that moves one
        replica on at each first pick of a request: round-robin among equals, with no
        random draw. A retry's pick (`exclude` set) leaves the starting point alone, or
        a failing replica would come first again for every request."""
        active = self.active
        count = len(active)
        if count == 1:  # the common case costs one comparison
            only = active[0]
            return None if only is exclude else only
        if exclude is None:
            self._turn = turn = (self._turn + 1) % count
        else:
            turn = self._turn
        best: ReplicaSlot | None = None
        for offset in range(count):
            slot = active[(turn + offset) % count]
            if slot is not exclude and (best is None or slot.inflight < best.inflight):
                best = slot
        return best


class ReplicaBalancer:
    """One gateway's replica sets, one per (model id, version) its routes name.

    Mutated by the reconcile loop only (`set_engines`, `sync`); the request path reads a
    set with one dict lookup (`replicas`). A set is rebuilt on the spot when the route's
    backend it came from was replaced (a route applied since the last `sync`), so a new
    route never sends a request to the replicas of the one it replaced.
    """

    def __init__(self, live_after_s: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.live_after_s = live_after_s
        self._clock = clock
        self._sets: dict[tuple[str, str], ReplicaSet] = {}
        # Every replica with a set or requests in flight, by (model id, version, url), so
        # that its count survives the rebuilds of its set.
        self._slots: dict[tuple[str, str, str], ReplicaSlot] = {}
        # The engines' records as last read from the store; None until a first read, and
        # until then no replica is judged.
        self._engines: dict[EngineKey, EngineReplica] | None = None
        # The URL of every usable engine (ready, on a live host), as judged at the last
        # `sync`: a replica takes requests when its engine is here at its URL.
        self._usable: dict[EngineKey, str] | None = None

    # ---------------------------------------------------------------- request path

    def replicas(self, model_id: str, backend: Backend) -> ReplicaSet:
        """The replica set of `backend` (a backend of `model_id`'s route)."""
        found = self._sets.get((model_id, backend.version))
        if found is None or found.backend is not backend:
            found = self._sets[(model_id, backend.version)] = self._build(
                model_id, backend, found)
        return found

    # ---------------------------------------------------------------- reconcile loop

    def set_engines(self, engines: Iterable[EngineReplica], *,
                    model_id: str | None = None) -> None:
        """Take the store's engine records: all of them, or (with `model_id`) one model's.
        They are judged at the next `sync`."""
        fresh = {e.key: e for e in engines}
        if model_id is None or self._engines is None:
            self._engines = fresh
        else:
            kept = {k: e for k, e in self._engines.items() if k[0] != model_id}
            self._engines = {**kept, **fresh}

    def sync(self, routes: Iterable[Route]) -> list[tuple[int, str]]:
        """Judge the engine records held (states, heartbeats) now, and rebuild the replica
        sets of `routes` (the routes held) whose active replicas changed; forget replicas
        no route names and nothing is in flight to. Returns what changed as (logging
        level, words), for the caller to log."""
        now = self._clock()
        self._usable = None if self._engines is None else self._judge(now)
        sets: dict[tuple[str, str], ReplicaSet] = {}
        changes: list[tuple[int, str]] = []
        for route in routes:
            for backend in route.backends:
                if backend.weight <= 0 and not backend.is_shadow:
                    continue
                key = (route.model_id, backend.version)
                held = self._sets.get(key)
                built = sets[key] = self._build(route.model_id, backend, held)
                if built is not held:
                    changes.extend(self._changes(route.model_id, backend, held, built, now))
        self._sets = sets
        routed = {id(slot) for built in sets.values() for slot in built.active}
        named = {id(slot) for built in sets.values() for slot in built.every}
        for slot_key, slot in list(self._slots.items()):
            slot.routed = id(slot) in routed
            if id(slot) not in named and slot.inflight <= 0:
                del self._slots[slot_key]
        return changes

    def _judge(self, now: datetime) -> dict[EngineKey, str]:
        """The URL of each engine that may take requests (`replica_out`'s rules, with each
        host's heartbeat judged once)."""
        hosts: dict[str, bool] = {}
        usable: dict[EngineKey, str] = {}
        for key, engine in (self._engines or {}).items():
            if engine.state is not EngineState.READY:
                continue
            live = hosts.get(engine.host)
            if live is None:
                live = hosts[engine.host] = host_is_live(engine.host_last_seen, now,
                                                         self.live_after_s)
            if live:
                usable[key] = engine.url
        return usable

    def _build(self, model_id: str, backend: Backend, held: ReplicaSet | None) -> ReplicaSet:
        """`backend`'s replica set; `held` itself when nothing about it changed."""
        same_backend = held is not None and held.backend is backend
        if held is not None and same_backend:
            every = held.every
        else:
            every = [self._slot(model_id, backend.version, r) for r in backend.endpoints()]
        usable = self._usable
        if usable is None or len(every) == 1:
            # Nothing to judge by, or nothing to choose from (the one replica is kept
            # whatever its state: the never-empty rule).
            active, kept_all = every, False
        else:
            version = backend.version
            active = [slot for slot in every
                      if not slot.host or usable.get((model_id, version, slot.host)) == slot.url]
            kept_all = not active
            active = active or every
        if held is not None and same_backend and held.kept_all == kept_all and \
                len(held.active) == len(active) and \
                all(a is b for a, b in zip(held.active, active, strict=True)):
            return held
        for slot in every:
            slot.routed = slot in active
        return ReplicaSet(backend, active, every, kept_all=kept_all,
                          turn=held._turn if held is not None else 0)

    def _out(self, model_id: str, version: str, slot: ReplicaSlot, now: datetime) -> str | None:
        engine = (self._engines or {}).get((model_id, version, slot.host))
        return replica_out(Replica(url=slot.url, host=slot.host), engine, now,
                           self.live_after_s)

    def _slot(self, model_id: str, version: str, replica: Replica) -> ReplicaSlot:
        key = (model_id, version, replica.url)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = ReplicaSlot(replica.url, replica.host)
        elif slot.host != replica.host:
            slot.host = replica.host
        return slot

    def _changes(self, model_id: str, backend: Backend, held: ReplicaSet | None,
                 built: ReplicaSet, now: datetime) -> list[tuple[int, str]]:
        """What a rebuild changed about which of the version's replicas take requests."""
        name = f"{model_id} {backend.version}"
        changes: list[tuple[int, str]] = []
        if built.kept_all and (held is None or not held.kept_all):
            reasons = "; ".join(f"{s.url}: {self._out(model_id, backend.version, s, now)}"
                                for s in built.every)
            changes.append((logging.WARNING,
                            f"every replica of {name} is out ({reasons}); keeping them all "
                            f"in its route, failover does the rest"))
        if held is None or built.kept_all:
            return changes
        before = {id(s) for s in held.active}
        after = {id(s) for s in built.active}
        was_named = {id(s) for s in held.every}
        for slot in built.every:
            if id(slot) in before and id(slot) not in after:
                reason = self._out(model_id, backend.version, slot, now)
                # A silent host is news; an engine stopping or gone was planned.
                engine = (self._engines or {}).get((model_id, backend.version, slot.host))
                silent = engine is not None and not host_is_live(
                    engine.host_last_seen, now, self.live_after_s)
                changes.append((logging.WARNING if silent else logging.INFO,
                                f"replica {slot.url} (host {slot.host}) of {name} left out: "
                                f"{reason}"))
            elif id(slot) not in before and id(slot) in after and id(slot) in was_named:
                changes.append((logging.INFO,
                                f"replica {slot.url} (host {slot.host}) of {name} back in"))
        return changes

    # ---------------------------------------------------------------- views

    def inflight(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Requests in flight per replica, by model and version, for `/admin/state`:
        replicas taking requests and those left out with requests still in flight."""
        result: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for (model_id, version, url), slot in sorted(self._slots.items()):
            result.setdefault(model_id, {}).setdefault(version, []).append(
                {"url": url, "host": slot.host, "inflight": slot.inflight,
                 "routed": slot.routed})
        return result
