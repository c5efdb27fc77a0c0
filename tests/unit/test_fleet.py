"""Placement and eviction of engines (turnout.fleet): examples, then properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnout.fleet import (
    GIB,
    EngineRole,
    EngineView,
    HolderKind,
    HostView,
    LoadRequest,
    PlacementError,
    cache_overflow,
    engine_memory_estimate,
    engine_role,
    may_evict,
    place,
    should_sleep,
)


def host(name: str, gib: float = 8, *, cached: int = 5, ports: int = 10,
         live: bool = True) -> HostView:
    return HostView(name, f"turnout-engines-{name}", int(gib * GIB), cached, ports, live)


def engine(version: str, on: str, gib: float = 2, *, role: EngineRole = EngineRole.STANDBY,
           priority: int = 0, last_used: float = 0, model: str = "m",
           ready: bool = True) -> EngineView:
    return EngineView(model, version, on, int(gib * GIB), role, priority, last_used, ready)


def want(version: str = "v9", gib: float = 2, *, replicas: int = 1,
         priority: int | None = None, model: str = "m") -> LoadRequest:
    return LoadRequest(model, version, int(gib * GIB), replicas, priority)


def test_a_hosts_engines_need_their_weights_and_what_the_host_adds() -> None:
    roomy = HostView("a", "q", 10 * GIB, 5, 10, engine_extra_bytes=3 * GIB)
    assert roomy.need(want(gib=2)) == 5 * GIB
    with pytest.raises(PlacementError, match="needs about 9.0 GiB; the largest free is "
                                             "8.0 GiB on host a"):
        place(want(gib=6), [roomy], [engine("v1", "a", 2, role=EngineRole.SERVING)])


# ---------------------------------------------------------------------- roles


def test_an_engine_takes_its_most_important_role() -> None:
    assert engine_role([]) is EngineRole.IDLE
    assert engine_role([HolderKind.STANDBY]) is EngineRole.STANDBY
    assert engine_role([HolderKind.STANDBY, HolderKind.PRELOAD]) is EngineRole.PRELOADED
    assert engine_role([HolderKind.PRELOAD, HolderKind.SHADOW]) is EngineRole.SHADOW
    assert engine_role([HolderKind.SHADOW, HolderKind.SWITCH]) is EngineRole.CANDIDATE
    assert engine_role([HolderKind.SWITCH, HolderKind.SERVING]) is EngineRole.SERVING


def test_the_route_overrules_missing_holders() -> None:
    # An engine loaded before holders were recorded has none; the route still serves it.
    assert engine_role([], serving=True) is EngineRole.SERVING
    assert engine_role([HolderKind.STANDBY], shadow=True) is EngineRole.SHADOW


def test_only_cached_engines_sleep_and_only_where_sleep_mode_exists() -> None:
    for role in EngineRole:
        assert not should_sleep(role, sleep_mode=False)
    assert {r for r in EngineRole if should_sleep(r, sleep_mode=True)} == \
        {EngineRole.STANDBY, EngineRole.PRELOADED, EngineRole.IDLE}


def test_memory_estimate_is_weights_plus_kv_cache_plus_runtime() -> None:
    assert engine_memory_estimate(3 * GIB, kv_cache_bytes=GIB, overhead_bytes=2 * GIB) == \
        6 * GIB


# ---------------------------------------------------------------------- placement examples


def test_one_replica_goes_to_the_host_with_most_room() -> None:
    placement = place(want(), [host("a", 4), host("b", 16)], [engine("v1", "b", 4)])
    [replica] = placement.replicas
    assert (replica.host_id, replica.task_queue, replica.reuse, replica.evict) == \
        ("b", "turnout-engines-b", False, ())


def test_replicas_spread_one_per_host() -> None:
    placement = place(want(replicas=2), [host("a"), host("b"), host("c", 4)], [])
    assert sorted(r.host_id for r in placement.replicas) == ["a", "b"]


def test_a_host_that_holds_the_version_is_reused() -> None:
    standby = engine("v9", "b", role=EngineRole.STANDBY)
    placement = place(want(replicas=2), [host("a", 64), host("b", 4)], [standby])
    assert [(r.host_id, r.reuse) for r in placement.replicas] == [("b", True), ("a", False)]


def test_more_replicas_than_live_hosts_is_refused() -> None:
    with pytest.raises(PlacementError, match="2 replicas .* need 2 live engine hosts"):
        place(want(replicas=2), [host("a"), host("b", live=False)], [])


def test_dead_hosts_are_left_out() -> None:
    [replica] = place(want(), [host("a", 64, live=False), host("b", 4)], []).replicas
    assert replica.host_id == "b"


def test_room_is_made_by_evicting_lowest_priority_then_least_recently_used() -> None:
    on_a = [engine("old", "a", 3, priority=0, last_used=100),
            engine("older", "a", 3, priority=0, last_used=50),
            engine("kept", "a", 1, priority=5, last_used=1)]
    [replica] = place(want(gib=3), [host("a", 8)], on_a).replicas
    assert [e.version for e in replica.evict] == ["older"]
    [replica] = place(want(gib=6), [host("a", 8)], on_a).replicas
    assert [e.version for e in replica.evict] == ["older", "old"]


def test_serving_candidate_shadow_and_starting_engines_are_never_evicted() -> None:
    busy = [engine("live", "a", 3, role=EngineRole.SERVING),
            engine("canary", "a", 2, role=EngineRole.CANDIDATE),
            engine("mirror", "a", 2, role=EngineRole.SHADOW),
            engine("loading", "a", 1, role=EngineRole.PRELOADED, ready=False)]
    with pytest.raises(PlacementError) as caught:
        place(want(gib=2), [host("a", 8)], busy)
    assert "needs about 2.0 GiB; the largest free is 0.0 GiB on host a" in str(caught.value)
    assert sorted(e.version for e in caught.value.blocking) == \
        ["canary", "live", "loading", "mirror"]


def test_a_preload_evicts_only_lower_priorities() -> None:
    # max_cached_models=1: preload priority 1, then priority 10 evicts it; not the reverse.
    a = host("a", 64, cached=1)
    low = engine("p1", "a", role=EngineRole.PRELOADED, priority=1)
    [replica] = place(want("p10", priority=10), [a], [low]).replicas
    assert [e.version for e in replica.evict] == ["p1"]
    high = engine("p10", "a", role=EngineRole.PRELOADED, priority=10)
    with pytest.raises(PlacementError) as caught:
        place(want("p1", priority=1), [a], [high])
    assert "max_cached_models" in str(caught.value)
    assert [e.version for e in caught.value.blocking] == ["p10"]


def test_a_switch_may_evict_any_cached_engine_and_ignores_the_cache_count() -> None:
    a = host("a", 4, cached=1)
    cached = engine("p10", "a", 3, role=EngineRole.PRELOADED, priority=10)
    [replica] = place(want(gib=3), [a], [cached]).replicas
    assert [e.version for e in replica.evict] == ["p10"]
    assert place(want(gib=1), [a], [cached]).evictions == []


def test_a_full_port_range_counts_as_no_room() -> None:
    with pytest.raises(PlacementError):
        place(want(gib=0.1), [host("a", 64, ports=1)],
              [engine("live", "a", 0.1, role=EngineRole.SERVING)])


def test_cache_overflow_stops_the_least_valuable_cached_engines() -> None:
    a = host("a", 8, cached=1)
    engines = [engine("live", "a", 2, role=EngineRole.SERVING),
               engine("s1", "a", 1, last_used=10), engine("s2", "a", 1, last_used=20),
               engine("p", "a", 1, role=EngineRole.PRELOADED, priority=3)]
    assert [e.version for e in cache_overflow(a, engines)] == ["s1", "s2"]
    tight = host("a", 4.5, cached=5)
    assert [e.version for e in cache_overflow(tight, engines)] == ["s1"]


# ---------------------------------------------------------------------- properties

hosts_st = st.lists(st.builds(
    HostView, host_id=st.sampled_from(list("abcdef")), task_queue=st.just("q"),
    memory_bytes=st.integers(0, 16).map(lambda g: g * GIB),
    max_cached_models=st.integers(0, 3), ports=st.integers(0, 4), live=st.booleans(),
    engine_extra_bytes=st.integers(0, 2).map(lambda g: g * GIB)),
    max_size=5, unique_by=lambda h: h.host_id)
engines_st = st.lists(st.builds(
    EngineView, model_id=st.sampled_from(["m", "n"]), version=st.sampled_from(list("vwxyz")),
    host_id=st.sampled_from(list("abcdef")),
    memory_bytes=st.integers(0, 8).map(lambda g: g * GIB),
    role=st.sampled_from(list(EngineRole)), priority=st.integers(0, 3),
    last_used=st.floats(0, 1000), ready=st.booleans()),
    max_size=10, unique_by=lambda e: (e.model_id, e.version, e.host_id))
request_st = st.builds(
    LoadRequest, model_id=st.just("m"), version=st.sampled_from(list("vwxyz")),
    weights_bytes=st.integers(0, 10).map(lambda g: g * GIB), replicas=st.integers(1, 3),
    priority=st.none() | st.integers(0, 4))


@settings(max_examples=400, deadline=None)
@given(request=request_st, hosts=hosts_st, engines=engines_st)
def test_placement_never_overfills_never_evicts_the_held_and_spreads(
        request: LoadRequest, hosts: list[HostView], engines: list[EngineView]) -> None:
    try:
        placement = place(request, hosts, engines)
    except PlacementError as exc:
        assert str(exc)
        return
    by_id = {h.host_id: h for h in hosts}
    used = [r.host_id for r in placement.replicas]
    assert len(used) == request.replicas == len(set(used))  # one engine per host
    for replica in placement.replicas:
        h = by_id[replica.host_id]
        assert h.live
        on_host = [e for e in engines if e.host_id == h.host_id]
        holds = any((e.model_id, e.version) == (request.model_id, request.version)
                    for e in on_host)
        assert replica.reuse == holds
        for evicted in replica.evict:
            assert evicted in on_host and may_evict(evicted, request)
            assert evicted.cached and evicted.ready
            if request.priority is not None:
                assert evicted.priority < request.priority
        if replica.reuse:
            assert replica.evict == ()
            continue
        kept = [e for e in on_host if e not in replica.evict]
        assert sum(e.memory_bytes for e in kept) + h.need(request) <= h.memory_bytes
        assert len(kept) + 1 <= h.ports
        if request.priority is not None:
            assert sum(e.cached for e in kept) + 1 <= h.max_cached_models


@settings(max_examples=200, deadline=None)
@given(hosts=hosts_st, engines=engines_st)
def test_cache_overflow_only_stops_ready_cached_engines_in_eviction_order(
        hosts: list[HostView], engines: list[EngineView]) -> None:
    for h in hosts:
        stop = cache_overflow(h, engines)
        assert all(e.cached and e.ready and e.host_id == h.host_id for e in stop)
        left = [e for e in engines if e.host_id == h.host_id and e not in stop]
        cached_left = [e for e in left if e.cached and e.ready]
        if stop:  # it stopped no more than needed: without its last pick it was too full
            before = [*cached_left, stop[-1]]
            assert len(before) > h.max_cached_models or \
                sum(e.memory_bytes for e in [*left, stop[-1]]) > h.memory_bytes
        elif cached_left:
            assert len(cached_left) <= h.max_cached_models


def test_sleep_mode_needs_the_flag_and_vllms_development_mode() -> None:
    from activities.engines import sleep_mode_launch

    assert sleep_mode_launch(False) == ([], {})
    assert sleep_mode_launch(True) == (["--enable-sleep-mode"], {"VLLM_SERVER_DEV_MODE": "1"})
