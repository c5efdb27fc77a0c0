"""Routing math: split accuracy, stickiness, minimal movement on weight change, zero weights."""

from __future__ import annotations

import random

from turnout.domain import Backend, Route
from turnout.routing import RouteTable, live_backends, pick_backend, stable_point


def _route(weights: dict[str, float], model_id: str = "m_default", generation: int = 1) -> Route:
    return Route(model_id=model_id, generation=generation, backends=[
        Backend(version=v, weight=w, url=f"http://127.0.0.1:81{i:02d}",
                served_model_name=f"served-{v}")
        for i, (v, w) in enumerate(weights.items())])


def test_split_accuracy_without_key() -> None:
    route = _route({"v1": 80, "v2": 20})
    rng = random.Random(7)
    n = 50_000
    counts = {"v1": 0, "v2": 0}
    for _ in range(n):
        backend = pick_backend(route, None, rng.random())
        assert backend is not None
        counts[backend.version] += 1
    assert abs(counts["v2"] / n - 0.20) < 0.01


def test_split_accuracy_with_keys() -> None:
    route = _route({"v1": 70, "v2": 30})
    n = 20_000
    picked = [pick_backend(route, f"user-{i}", 0.0) for i in range(n)]
    share = sum(1 for b in picked if b is not None and b.version == "v2") / n
    assert abs(share - 0.30) < 0.015


def test_three_way_split() -> None:
    route = _route({"a": 50, "b": 30, "c": 20})
    rng = random.Random(1)
    n = 60_000
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(n):
        counts[pick_backend(route, None, rng.random()).version] += 1  # type: ignore[union-attr]
    assert abs(counts["a"] / n - 0.5) < 0.01
    assert abs(counts["b"] / n - 0.3) < 0.01
    assert abs(counts["c"] / n - 0.2) < 0.01


def test_user_is_sticky() -> None:
    route = _route({"v1": 50, "v2": 50})
    for i in range(200):
        first = pick_backend(route, f"u{i}", 0.0)
        for rand in (0.1, 0.5, 0.99):
            assert pick_backend(route, f"u{i}", rand) == first


def test_only_the_changed_share_moves() -> None:
    before = _route({"v1": 90, "v2": 10})
    after = _route({"v1": 75, "v2": 25})
    n = 20_000
    moved = 0
    for i in range(n):
        a = pick_backend(before, f"user-{i}", 0.0)
        b = pick_backend(after, f"user-{i}", 0.0)
        assert a is not None and b is not None
        if a.version != b.version:
            moved += 1
            assert (a.version, b.version) == ("v1", "v2")  # nobody moves back
    assert abs(moved / n - 0.15) < 0.01


def test_order_of_backends_does_not_matter() -> None:
    one = _route({"v1": 60, "v2": 40})
    two = Route(model_id=one.model_id, generation=1, backends=list(reversed(one.backends)))
    for i in range(500):
        assert pick_backend(one, f"k{i}", 0.0) == pick_backend(two, f"k{i}", 0.0)
    for rand in (0.0, 0.3, 0.59, 0.61, 0.999):
        assert pick_backend(one, None, rand) == pick_backend(two, None, rand)


def test_zero_weights_never_picked() -> None:
    route = _route({"v1": 100, "v2": 0})
    for rand in (0.0, 0.5, 0.999999):
        assert pick_backend(route, None, rand).version == "v1"  # type: ignore[union-attr]
    for i in range(1000):
        assert pick_backend(route, f"u{i}", 0.0).version == "v1"  # type: ignore[union-attr]
    assert [b.version for b in live_backends(route)] == ["v1"]


def test_no_backends_or_all_zero() -> None:
    assert pick_backend(_route({}), None, 0.5) is None
    assert pick_backend(_route({"v1": 0, "v2": 0}), "u", 0.5) is None


def test_stable_point_range_and_determinism() -> None:
    points = [stable_point("m", f"u{i}") for i in range(5000)]
    assert all(0 <= p < 100 for p in points)
    assert stable_point("m", "u1") == stable_point("m", "u1")
    assert stable_point("m", "u1") != stable_point("other", "u1")


def test_route_table_never_applies_older_generation() -> None:
    table = RouteTable()
    assert table.apply(_route({"v1": 100}, generation=3))
    assert not table.apply(_route({"v2": 100}, generation=2))
    assert not table.apply(_route({"v2": 100}, generation=3))
    assert table.route("m_default").weights() == {"v1": 100}  # type: ignore[union-attr]
    assert table.apply(_route({"v2": 100}, generation=4))
    assert table.generations() == {"m_default": 4}


def test_route_table_resolve_and_served_names() -> None:
    table = RouteTable()
    table.apply(_route({"v1": 100}, model_id="a_default"))
    table.apply(_route({}, model_id="b_default"))
    table.set_aliases({"org/a": "a_default", "org/b": "b_default"})
    table.set_known_models(["a_default", "b_default", "c_default"])
    assert table.resolve("a_default") == "a_default"
    assert table.resolve("org/a") == "a_default"
    assert table.resolve("c_default") == "c_default"
    assert table.resolve("nope") is None
    assert table.served_names() == ["a_default", "org/a"]


def _shadowed(generation: int, mirror_percent: float) -> Route:
    """v1 serves everything; v2 is a shadow copied `mirror_percent` of the requests."""
    return Route(model_id="m_default", generation=generation, backends=[
        Backend(version="v1", weight=100, url="http://127.0.0.1:8101",
                served_model_name="served-v1"),
        Backend(version="v2", weight=0, mirror_percent=mirror_percent,
                url="http://127.0.0.1:8102", served_model_name="served-v2")])


def test_route_table_keeps_the_shadow_apart_from_live_backends() -> None:
    table = RouteTable()
    assert table.apply(_route({"v1": 100}, generation=1))
    assert "m_default" not in table.shadows  # no shadow: nothing kept, one dict miss
    assert table.apply(_shadowed(2, 30))
    shadow = table.shadows["m_default"]
    assert (shadow.version, shadow.mirror_percent) == ("v2", 30)
    assert [b.version for b in table.live["m_default"]] == ["v1"]  # never served
    assert table.served_names() == ["m_default"]
    assert not table.apply(_shadowed(2, 80))  # a stale route leaves the shadow as it was
    assert table.shadows["m_default"].mirror_percent == 30
    assert table.apply(_route({"v1": 100}, generation=3))  # mirroring stopped
    assert table.shadows == {}


def test_route_table_weight_zero_without_mirror_is_no_shadow() -> None:
    table = RouteTable()
    table.apply(_route({"v1": 100, "v2": 0}))
    assert table.shadows == {}
