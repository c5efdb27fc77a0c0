"""Replica choice and which replicas take requests (turnout/replicas.py): least requests in
flight, round-robin ties, dead hosts and failed engines out, never a version with none."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from turnout.domain import Backend, EngineInfo, EngineState, Replica, Route
from turnout.replicas import (
    EngineReplica,
    ReplicaBalancer,
    ReplicaSet,
    ReplicaSlot,
    replica_out,
    route_engines,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
LIVE_AFTER_S = 20.0
MODEL = "m_default"


def slots(*inflight: int) -> list[ReplicaSlot]:
    made = []
    for i, count in enumerate(inflight):
        slot = ReplicaSlot(f"http://h{i}:8000", f"h{i}")
        slot.inflight = count
        made.append(slot)
    return made


def replica_set(active: list[ReplicaSlot]) -> ReplicaSet:
    backend = Backend(version="v1", weight=100, url=active[0].url, served_model_name="s")
    return ReplicaSet(backend, active, active)


def backend(hosts: list[str], version: str = "v1", weight: float = 100) -> Backend:
    replicas = [Replica(url=f"http://{h}:8000", host=h) for h in hosts]
    return Backend(version=version, weight=weight, url=replicas[0].url,
                   served_model_name=f"served-{version}", replicas=replicas)


def engine(host: str, *, state: EngineState = EngineState.READY, silent_s: float | None = 1,
           version: str = "v1", url: str | None = None) -> EngineReplica:
    return EngineReplica(MODEL, version, host, url or f"http://{host}:8000", state,
                         None if silent_s is None else NOW - timedelta(seconds=silent_s))


def balancer() -> ReplicaBalancer:
    return ReplicaBalancer(LIVE_AFTER_S, clock=lambda: NOW)


def active_hosts(b: ReplicaBalancer, route: Route, version: str = "v1") -> list[str]:
    chosen = next(x for x in route.backends if x.version == version)
    return sorted(s.host for s in b.replicas(MODEL, chosen).active)


# ---------------------------------------------------------------------- picking


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=6),
       st.integers(min_value=0, max_value=20), st.booleans())
def test_the_pick_has_the_fewest_requests_in_flight(inflight: list[int], turns: int,
                                                    exclude_first: bool) -> None:
    active = slots(*inflight)
    chosen = replica_set(active)
    for _ in range(turns):  # wherever the round-robin start stands
        chosen.pick()
    exclude = active[0] if exclude_first else None
    picked = chosen.pick(exclude)
    others = [s for s in active if s is not exclude]
    if not others:
        assert picked is None
    else:
        assert picked is not None and picked is not exclude
        assert picked.inflight == min(s.inflight for s in others)


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=3))
def test_ties_go_round_robin(count: int, inflight: int) -> None:
    """Sequential requests (nothing in flight when the next comes) spread evenly."""
    chosen = replica_set(slots(*[inflight] * count))
    picks = Counter(chosen.pick().url for _ in range(count * 5))  # type: ignore[union-attr]
    assert sorted(picks.values()) == [5] * count


def test_requests_in_flight_steer_the_next_ones() -> None:
    """A slow replica keeps its requests longer, so new requests go to the fast one."""
    fast, slow = slots(0, 0)
    chosen = replica_set([fast, slow])
    sent = Counter()
    for _ in range(100):
        slot = chosen.pick()
        assert slot is not None
        sent[slot.host] += 1
        slot.inflight += 1
        fast.inflight = 0  # the fast replica answers before the next request comes
    assert sent["h0"] >= 98 and sent["h1"] <= 2


def test_a_single_replica_is_always_the_pick_unless_excluded() -> None:
    (only,) = slots(7)
    chosen = replica_set([only])
    assert chosen.pick() is only and chosen.pick() is only
    assert chosen.pick(exclude=only) is None


# ---------------------------------------------------------------------- what is out


def test_why_a_replica_is_out() -> None:
    r = Replica(url="http://a:8000", host="a")
    assert replica_out(r, engine("a"), NOW, LIVE_AFTER_S) is None
    assert replica_out(r, engine("a", silent_s=None), NOW, LIVE_AFTER_S) is None  # external
    assert replica_out(r, None, NOW, LIVE_AFTER_S) == "no engine on host a any more"
    assert "has not heartbeat for 25 s" in replica_out(r, engine("a", silent_s=25), NOW,
                                                       LIVE_AFTER_S)
    assert replica_out(r, engine("a", silent_s=20), NOW, LIVE_AFTER_S) is None  # inclusive
    for state in (EngineState.FAILED, EngineState.STOPPING, EngineState.STARTING,
                  EngineState.STOPPED):
        assert replica_out(r, engine("a", state=state), NOW, LIVE_AFTER_S) == \
            f"its engine is {state.value}"
    assert "another address" in replica_out(r, engine("a", url="http://a:8001"), NOW,
                                            LIVE_AFTER_S)
    # A route written without hosts: nothing to judge it by.
    assert replica_out(Replica(url="http://a:8000"), None, NOW, LIVE_AFTER_S) is None


def test_a_route_names_ready_engines_on_live_hosts_and_never_none() -> None:
    def info(host: str, state: EngineState = EngineState.READY) -> EngineInfo:
        return EngineInfo(model_id=MODEL, version="v1", host=host, url=f"http://{host}:1",
                          served_model_name="s", state=state)

    seen = {"b": NOW - timedelta(seconds=2), "a": NOW - timedelta(seconds=3),
            "c": NOW - timedelta(seconds=60)}
    engines = [info("c"), info("b"), info("a"), info("d", EngineState.STARTING),
               info("external")]
    named, silent = route_engines(engines, seen, NOW, LIVE_AFTER_S)
    assert [e.host for e in named] == ["a", "b", "external"]  # by host; no heartbeat: live
    assert [e.host for e in silent] == ["c"]
    named, silent = route_engines([info("c")], seen, NOW, LIVE_AFTER_S)
    assert [e.host for e in named] == ["c"] and [e.host for e in silent] == ["c"]
    assert route_engines([info("d", EngineState.FAILED)], seen, NOW, LIVE_AFTER_S) == ([], [])


# ---------------------------------------------------------------------- the balancer


def test_replicas_on_silent_hosts_or_with_failed_engines_are_out() -> None:
    route = Route(model_id=MODEL, generation=1, backends=[backend(["a", "b", "c", "d"])])
    b = balancer()
    b.sync([route])
    assert active_hosts(b, route) == ["a", "b", "c", "d"]  # nothing known yet: all in
    b.set_engines([engine("a"), engine("b", silent_s=30), engine("c", state=EngineState.FAILED),
                   engine("d", state=EngineState.STOPPING)])
    changes = b.sync([route])
    assert active_hosts(b, route) == ["a"]
    assert len(changes) == 3 and any("has not heartbeat for 30 s" in c for _, c in changes)
    state = {r["host"]: r["routed"] for r in b.inflight()[MODEL]["v1"]}
    assert state == {"a": True, "b": False, "c": False, "d": False}
    # The host heartbeats again: back in.
    b.set_engines([engine("a"), engine("b")])
    assert active_hosts(b, route) == ["a"]  # judged in the reconcile loop, not per request
    changes = b.sync([route])
    assert active_hosts(b, route) == ["a", "b"]
    assert [c for _, c in changes] == [f"replica http://b:8000 (host b) of {MODEL} v1 back in"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(EngineState)),
                          st.sampled_from([None, 1.0, 19.0, 21.0, 600.0]),
                          st.booleans()), min_size=1, max_size=5))
def test_a_version_keeps_its_usable_replicas_and_is_never_left_without_one(
        replicas: list[tuple[EngineState, float | None, bool]]) -> None:
    hosts = [f"h{i}" for i in range(len(replicas))]
    route = Route(model_id=MODEL, generation=1, backends=[backend(hosts)])
    b = balancer()
    b.set_engines([engine(h, state=state, silent_s=silent)
                   for h, (state, silent, recorded) in zip(hosts, replicas, strict=True)
                   if recorded])
    b.sync([route])
    usable = [h for h, (state, silent, recorded) in zip(hosts, replicas, strict=True)
              if recorded and state is EngineState.READY
              and (silent is None or silent <= LIVE_AFTER_S)]
    expected = (usable or hosts) if len(hosts) > 1 else hosts  # one replica: nothing to pick
    assert active_hosts(b, route) == expected
    assert b.replicas(MODEL, route.backends[0]).pick() is not None


def test_counts_survive_a_new_route_and_a_replica_that_left_is_kept_until_idle() -> None:
    first = Route(model_id=MODEL, generation=1, backends=[backend(["a", "b"])])
    b = balancer()
    b.sync([first])
    slot = b.replicas(MODEL, first.backends[0]).pick(exclude=None)
    assert slot is not None
    slot.inflight += 1
    leaving = slot.host
    staying = "b" if leaving == "a" else "a"
    # A new generation without the replica in flight: the request path rebuilds at once.
    second = Route(model_id=MODEL, generation=2, backends=[backend([staying])])
    assert [s.host for s in b.replicas(MODEL, second.backends[0]).active] == [staying]
    b.sync([second])
    listed = {r["host"]: r for r in b.inflight()[MODEL]["v1"]}
    assert listed[leaving] == {"url": slot.url, "host": leaving, "inflight": 1,
                               "routed": False}
    slot.inflight -= 1
    b.sync([second])
    assert [r["host"] for r in b.inflight()[MODEL]["v1"]] == [staying]
    # The count of a replica that stays is kept across rebuilds.
    kept = b.replicas(MODEL, second.backends[0]).active[0]
    kept.inflight = 3
    third = Route(model_id=MODEL, generation=3, backends=[backend([staying, leaving])])
    b.sync([third])
    assert {r["host"]: r["inflight"] for r in b.inflight()[MODEL]["v1"]} == {
        staying: 3, leaving: 0}


def test_engines_of_one_model_are_replaced_alone() -> None:
    other = "other_default"
    b = balancer()
    b.set_engines([engine("a"), EngineReplica(other, "v1", "a", "http://a:9", EngineState.READY)])
    b.set_engines([engine("b")], model_id=MODEL)
    route = Route(model_id=MODEL, generation=1, backends=[backend(["a", "b"])])
    b.sync([route])
    assert active_hosts(b, route) == ["b"]  # MODEL's engine on a is gone
    other_route = Route(model_id=other, generation=1, backends=[
        Backend(version="v1", weight=100, url="http://a:9", served_model_name="s",
                replicas=[Replica(url="http://a:9", host="a"),
                          Replica(url="http://z:9", host="z")])])
    b.sync([other_route])
    assert [s.host for s in b.replicas(other, other_route.backends[0]).active] == ["a"]


def test_a_route_stored_before_replicas_has_its_one_url() -> None:
    stored = {"version": "v1", "weight": 100, "url": "http://old:8000/",
              "served_model_name": "s"}
    old = Backend.model_validate(stored)
    assert old.replicas == [] and old.endpoints() == [Replica(url="http://old:8000/")]
    route = Route(model_id=MODEL, generation=1, backends=[old])
    b = balancer()
    b.set_engines([])  # no engine recorded for a host-less replica: still in
    b.sync([route])
    slot = b.replicas(MODEL, old).pick()
    assert slot is not None and slot.base == "http://old:8000"


def test_shadows_have_replica_sets_and_zero_weight_backends_none() -> None:
    shadow = backend(["a", "b"], version="v3", weight=0).model_copy(
        update={"mirror_percent": 10})
    route = Route(model_id=MODEL, generation=1, backends=[
        backend(["a"]), backend(["c"], version="v2", weight=0), shadow])
    b = balancer()
    b.sync([route])
    assert set(b.inflight()[MODEL]) == {"v1", "v3"}
