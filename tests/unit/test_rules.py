"""Routing rules and the TransitionManager's decisions: features, conditions, validation,
order, and how rules meet the route of a running rollout."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from turnout.domain import Backend, Route
from turnout.rules import RoutingRules, request_features
from turnout.transitions import TransitionManager

MODEL = "m_default"


def route(weights: dict[str, float], generation: int = 1) -> Route:
    return Route(model_id=MODEL, generation=generation, backends=[
        Backend(version=v, weight=w, url=f"http://127.0.0.1:9{i:03d}",
                served_model_name=f"served-{v}") for i, (v, w) in enumerate(weights.items())])


def rules(*items: dict[str, Any]) -> RoutingRules:
    return RoutingRules.model_validate({"rules": list(items)})


def manager(weights: dict[str, float], *items: dict[str, Any]) -> TransitionManager:
    tm = TransitionManager()
    tm.set_route(route(weights))
    tm.set_rules(MODEL, rules(*items))
    return tm


def chosen(tm: TransitionManager, body: dict[str, Any], **kwargs: Any) -> tuple[str, str | None]:
    choice = tm.choose(MODEL, body=body, rand=0.5, **kwargs)
    assert choice is not None
    return choice.backend.version, choice.rule


# ---------------------------------------------------------------- features


def test_features_of_a_completion() -> None:
    f = request_features({"model": "m", "prompt": "x" * 41, "max_tokens": 7,
                          "metadata": {"tier": "gold", "n": 3}}, {"X-Team": "search"})
    assert (f.prompt_chars, f.prompt_tokens, f.max_tokens) == (41, 11, 7)
    assert (f.has_image, f.has_audio) == (False, False)
    assert f.headers["x-team"] == "search" and f.metadata == {"tier": "gold", "n": "3"}


def test_features_of_token_id_prompts_are_counted_exactly() -> None:
    assert request_features({"prompt": [1, 2, 3, 4, 5]}).prompt_tokens == 5
    assert request_features({"prompt": [[1, 2], [3]]}).prompt_tokens == 3


def test_features_of_a_multimodal_chat() -> None:
    f = request_features({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
            {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}]}],
        "max_completion_tokens": 64})
    assert f.prompt_chars == len("be brief") + len("what is this?")
    assert (f.has_image, f.has_audio, f.max_tokens) == (True, True, 64)


@pytest.mark.parametrize("body", [
    {}, {"prompt": None}, {"messages": "nope"}, {"messages": [3, {"content": 5}]},
    {"max_tokens": True}, {"metadata": ["a"]}, {"prompt": [{"x": 1}]},
])
def test_odd_bodies_give_empty_features(body: dict[str, Any]) -> None:
    f = request_features(body)
    assert (f.prompt_chars, f.prompt_tokens, f.max_tokens, f.metadata) == (0, 0, None, {})


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(("rule", "loc", "message"), [
    ({"match": {"prompt_chars": {"min": 10, "max": 5}}, "version": "v1"},
     ("rules", 0, "match", "prompt_chars"), "impossible range"),
    ({"match": {"prompt_chars": {}}, "version": "v1"},
     ("rules", 0, "match", "prompt_chars"), "min, max or both"),
    ({"match": {"header": {"name": "X-A", "regex": "(unclosed"}}, "version": "v1"},
     ("rules", 0, "match", "header"), "bad regex"),
    ({"match": {"metadata": {"key": "k", "equals": "a", "regex": "b"}}, "version": "v1"},
     ("rules", 0, "match", "metadata"), "exactly one"),
    ({"match": {}, "version": "v1"}, ("rules", 0, "match"), "at least one condition"),
    ({"match": {"has_image": True}, "version": "bad version"},
     ("rules", 0, "version"), "pattern"),
    ({"match": {"has_image": True, "colour": "red"}, "version": "v1"},
     ("rules", 0, "match", "colour"), "Extra inputs"),
    ({"match": {"max_tokens": {"min": -1}}, "version": "v1"},
     ("rules", 0, "match", "max_tokens", "min"), "greater than or equal"),
])
def test_bad_rules_name_the_field(rule: dict[str, Any], loc: tuple[Any, ...],
                                  message: str) -> None:
    with pytest.raises(ValidationError) as err:
        rules(rule)
    [error] = err.value.errors()
    assert error["loc"] == loc and message in error["msg"], error


def test_too_many_rules_are_refused() -> None:
    with pytest.raises(ValidationError):
        rules(*[{"match": {"has_image": True}, "version": "v1"}] * 101)


# ---------------------------------------------------------------- decisions


def test_each_condition_sends_matching_requests_to_its_version() -> None:
    tm = manager({"small": 100, "large": 0.0001, "vision": 0.0001, "fast": 0.0001},
                 {"name": "long", "match": {"prompt_tokens": {"min": 100}}, "version": "large"},
                 {"name": "images", "match": {"has_image": True}, "version": "vision"},
                 {"name": "short-answers", "match": {"max_tokens": {"max": 16}},
                  "version": "fast"},
                 {"name": "team", "match": {"header": {"name": "X-Team", "regex": "^ml-"}},
                  "version": "large"},
                 {"name": "gold", "match": {"metadata": {"key": "tier", "equals": "gold"}},
                  "version": "large"})
    assert chosen(tm, {"prompt": "y" * 400}) == ("large", "long")
    assert chosen(tm, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}) == ("vision", "images")
    assert chosen(tm, {"prompt": "hi", "max_tokens": 8}) == ("fast", "short-answers")
    assert chosen(tm, {"prompt": "hi"}, headers={"x-team": "ml-search"}) == ("large", "team")
    assert chosen(tm, {"prompt": "hi", "metadata": {"tier": "gold"}}) == ("large", "gold")
    assert chosen(tm, {"prompt": "hi", "metadata": {"tier": "silver"}}) == ("small", None)


def test_rules_apply_in_order_and_all_conditions_must_hold() -> None:
    tm = manager({"a": 50, "b": 50},
                 {"name": "both", "match": {"prompt_chars": {"max": 10}, "has_image": False},
                  "version": "b"},
                 {"name": "short", "match": {"prompt_chars": {"max": 10}}, "version": "a"})
    assert chosen(tm, {"prompt": "short"}) == ("b", "both")
    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert chosen(tm, image) == ("a", "short")


def test_a_rule_for_a_version_outside_the_route_is_skipped() -> None:
    """A rollback takes the target out of the route: its rules stop matching at once."""
    tm = manager({"v1": 100}, {"name": "to-v2", "match": {"has_image": False}, "version": "v2"})
    assert chosen(tm, {"prompt": "hi"}) == ("v1", None)
    tm.set_route(route({"v1": 90, "v2": 10}, generation=2))
    assert chosen(tm, {"prompt": "hi"}) == ("v2", "to-v2")
    tm.set_route(route({"v1": 100}, generation=3))
    assert chosen(tm, {"prompt": "hi"}) == ("v1", None)


def test_unnamed_rules_are_reported_by_position() -> None:
    tm = manager({"a": 50, "b": 50}, {"match": {"prompt_chars": {"min": 1}}, "version": "b"})
    assert chosen(tm, {"prompt": "x"}) == ("b", "#0")


def test_handle_request_routing_follows_the_guide() -> None:
    tm = TransitionManager()
    tm.set_route(route({"v1": 100}))
    tm.set_rules(MODEL, None)
    # One version serving and no rule: no transition, the caller routes normally.
    assert tm.handle_request_routing(MODEL, "req-1") is None
    assert tm.handle_request_routing("unknown_model", "req-1") is None
    tm.set_route(route({"v1": 70, "v2": 30}, generation=2))
    answers = {tm.handle_request_routing(MODEL, f"req-{i}") for i in range(200)}
    assert answers == {"v1", "v2"}
    # Sticky by request id.
    assert len({tm.handle_request_routing(MODEL, "req-42") for _ in range(20)}) == 1
    share = sum(tm.handle_request_routing(MODEL, f"r{i}") == "v2" for i in range(10_000))
    assert abs(share / 10_000 - 0.30) < 0.015


def test_handle_request_routing_applies_rules_to_the_request_body() -> None:
    tm = manager({"v1": 90, "v2": 10},
                 {"match": {"prompt_tokens": {"min": 1000}}, "version": "v2"})
    long, short = {"prompt": "x" * 8000}, {"prompt": "x"}
    assert {tm.handle_request_routing(MODEL, f"r{i}", long) for i in range(50)} == {"v2"}
    assert {tm.handle_request_routing(MODEL, f"r{i}", short) for i in range(200)} == \
        {"v1", "v2"}
