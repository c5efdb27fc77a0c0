"""Routing rules and the TransitionManager's decisions: features, conditions, validation,
order, and how rules meet the route of a running rollout."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from turnout.domain import Backend, Route
from turnout.rules import (
    MAX_MATCHED_VALUE_CHARS,
    MAX_REGEX_PROGRAM,
    MAX_RULES_PROGRAM,
    STORED,
    ModelRules,
    RegexRefused,
    RoutingRules,
    compile_regex,
    request_features,
)
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
     ("rules", 0, "match", "header", "regex"), "not valid RE2 syntax: missing )"),
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


# ---------------------------------------------------------------- the regex compile step


# With `chosen`'s draw of 0.5, the 90/10 split of these tests serves v1: v2 means a rule.


def header_rule(regex: str, version: str = "v1", name: str = "X-A") -> dict[str, Any]:
    return {"match": {"header": {"name": name, "regex": regex}}, "version": version}


def cpu_seconds(call: Any) -> float:
    """CPU time of one call on this thread: unlike wall time, it does not grow when the
    shared machine schedules something else meanwhile."""
    started = time.thread_time()
    call()
    return time.thread_time() - started


# Two regexes at the per-regex limit, nearly the per-model budget together, and a value
# that keeps RE2's DFA from settling (random a/b): the slowest search the caps allow.
HEAVY = ["(?:[ab]*a[ab]{990}x|[ab]*b[ab]{990}y)", "(?:[ab]*b[ab]{990}x|[ab]*a[ab]{990}z)"]
HOSTILE = "abbabaabbbababbaaabab" * (MAX_MATCHED_VALUE_CHARS // 21)


@pytest.mark.parametrize(("regex", "message"), [
    (r"(a)\1", "uses a backreference"),
    (r"(?P<word>a+)-(?P=word)", "uses a backreference"),
    (r"^(?=.*admin)", "uses lookahead"),
    (r"foo(?!bar)", "uses lookahead"),
    (r"(?<=x)y", "uses lookbehind"),
    (r"(?<!x)y", "uses lookbehind"),
    (r"[a-", "not valid RE2 syntax: missing ]"),
    (r"\Z", "not valid RE2 syntax: invalid escape sequence"),
    (r"a{1001}", "invalid repetition size"),
    ("[ab]*a[ab]{999}x|[ab]*b[ab]{999}y", f"over the limit of {MAX_REGEX_PROGRAM} per regex"),
    (r"\pL{1,1000}", "too complex"),
])
def test_regexes_needing_backtracking_or_too_costly_are_refused_naming_the_field(
        regex: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        rules(header_rule(regex))
    [error] = err.value.errors()
    assert error["loc"] == ("rules", 0, "match", "header", "regex"), error
    assert message in error["msg"], error["msg"]
    with pytest.raises(ValidationError) as err:
        rules({"match": {"metadata": {"key": "k", "regex": regex}}, "version": "v1"})
    assert err.value.errors()[0]["loc"] == ("rules", 0, "match", "metadata", "regex")


def test_the_catastrophic_python_regex_runs_in_linear_time() -> None:
    """`(a+)+$` against a's ending in '!' takes Python's `re` exponential time (30
    characters: minutes); RE2 answers at once, at any length the cap lets through."""
    tm = manager({"v1": 90, "v2": 10}, header_rule(r"(a+)+$", "v2", "X-Evil"))
    value = "a" * (MAX_MATCHED_VALUE_CHARS - 1) + "!"
    assert cpu_seconds(lambda: chosen(tm, {"prompt": "x"}, headers={"x-evil": value})) < 0.01
    assert chosen(tm, {"prompt": "x"}, headers={"x-evil": value}) == ("v1", None)
    assert chosen(tm, {"prompt": "x"}, headers={"x-evil": "aaaa"}) == ("v2", "#0")


def test_re2_syntax_that_python_also_knows_is_accepted() -> None:
    tm = manager({"v1": 90, "v2": 10},
                 header_rule(r"(?i)^(beta|canary)$", "v2", "X-Ring"),
                 header_rule(r"^(?P<team>ml|search)-\d+\z", "v2", "X-Team"),
                 header_rule(r"\pL+", "v2", "X-Name"))
    assert chosen(tm, {"prompt": "x"}, headers={"x-ring": "BETA"}) == ("v2", "#0")
    assert chosen(tm, {"prompt": "x"}, headers={"x-team": "ml-42"}) == ("v2", "#1")
    assert chosen(tm, {"prompt": "x"}, headers={"x-name": "Zoë"}) == ("v2", "#2")
    assert chosen(tm, {"prompt": "x"}, headers={"x-team": "ml-42\n"}) == ("v1", None)


def test_the_per_model_regex_budget_names_the_rules() -> None:
    assert rules(*(header_rule(regex) for regex in HEAVY))  # within the budget
    with pytest.raises(ValidationError) as err:
        rules(*(header_rule(regex) for regex in [*HEAVY, r"[ab]*a[ab]{200}x"]))
    [error] = err.value.errors()
    assert error["loc"] == ("rules",)
    assert f"over the limit of {MAX_RULES_PROGRAM} per model" in error["msg"]
    assert "rules 0 to 2" in error["msg"]


def test_the_slowest_search_the_caps_allow_stays_in_milliseconds() -> None:
    """The worst case the caps admit: a model at its regex budget, a hostile value of the
    longest length matched, every rule tried (none matches). Measured here at 5-15 ms of
    CPU; the bound leaves room for a slower machine."""
    tm = manager({"v1": 90, "v2": 10}, *(header_rule(regex, "v2") for regex in HEAVY))
    assert chosen(tm, {"prompt": "x"}, headers={"x-a": HOSTILE}) == ("v1", None)
    assert cpu_seconds(lambda: chosen(tm, {"prompt": "x"}, headers={"x-a": HOSTILE})) < 0.1


def test_values_longer_than_the_cap_match_no_rule() -> None:
    """Not cut: a cut value would let `x$` match a value that does not end in x."""
    tm = manager({"v1": 90, "v2": 10}, header_rule(r"x$", "v2"),
                 {"match": {"metadata": {"key": "tier", "regex": "^gold"}}, "version": "v2"})
    at_cap = "y" * (MAX_MATCHED_VALUE_CHARS - 1) + "x"
    assert chosen(tm, {"prompt": "x"}, headers={"x-a": at_cap}) == ("v2", "#0")
    assert chosen(tm, {"prompt": "x"}, headers={"x-a": "y" + at_cap}) == ("v1", None)
    gold = "gold" + "!" * (MAX_MATCHED_VALUE_CHARS - 4)
    assert chosen(tm, {"prompt": "x", "metadata": {"tier": gold}}) == ("v2", "#1")
    assert chosen(tm, {"prompt": "x", "metadata": {"tier": gold + "!"}}) == ("v1", None)


def test_a_value_with_lone_surrogates_is_matched_not_a_crash() -> None:
    tm = manager({"v1": 90, "v2": 10},
                 {"match": {"metadata": {"key": "k", "regex": "a$"}}, "version": "v2"})
    assert chosen(tm, {"prompt": "x", "metadata": {"k": "\udc80a"}}) == ("v2", "#0")
    assert chosen(tm, {"prompt": "x", "metadata": {"k": "\ud800"}}) == ("v1", None)


def test_stored_rules_that_re2_refuses_load_and_never_match(
        caplog: pytest.LogCaptureFixture) -> None:
    """Rules saved before RE2 (Python syntax) are read back, not refused: one of them must
    not stop a gateway from loading every model's rules. The refused regex never matches,
    the others work, and the log says so."""
    stored = ModelRules.model_validate(
        {"model_id": MODEL, "rules": [header_rule(r"^(?!internal)", "v2"),
                                      header_rule(r"^ok$", "v2")]}, context=STORED)
    assert [r.match.header.regex for r in stored.rules if r.match.header] == \
        [r"^(?!internal)", r"^ok$"]
    tm = TransitionManager()
    tm.set_route(route({"v1": 90, "v2": 10}))
    tm.set_rules(MODEL, stored)
    assert chosen(tm, {"prompt": "x"}, headers={"x-a": "external"}) == ("v1", None)
    assert chosen(tm, {"prompt": "x"}, headers={"x-a": "ok"}) == ("v2", "#1")
    assert "(?!internal)" in caplog.text and "never matches" in caplog.text


def test_stored_rules_over_the_budget_keep_the_regexes_that_fit() -> None:
    stored = ModelRules.model_validate(
        {"model_id": MODEL, "rules": [*(header_rule(regex, "v2") for regex in HEAVY),
                                      header_rule(r"[ab]*a[ab]{200}x", "v2"),
                                      header_rule(r"^ok$", "v2")]}, context=STORED)
    tm = TransitionManager()
    tm.set_route(route({"v1": 90, "v2": 10}))
    tm.set_rules(MODEL, stored)
    assert chosen(tm, {"prompt": "x"}, headers={"x-a": "a" + "b" * 200 + "x"}) == ("v1", None)
    assert chosen(tm, {"prompt": "x"}, headers={"x-a": "ok"}) == ("v2", "#3")


# Patterns from regex metacharacters (most are broken, some are valid, a few need
# backtracking) and from any text at all, lone surrogates included.
REGEX_ALPHABET = list("ab()[]{}*+?|^$.\\-,:=!<>P0123456789dwszpLu")
PATTERNS = st.one_of(st.text(st.sampled_from(REGEX_ALPHABET), max_size=40),
                     st.text(st.characters(exclude_categories=()), max_size=40))


@settings(max_examples=400, deadline=None)
@given(PATTERNS)
def test_any_pattern_compiles_or_is_refused_with_a_message(pattern: str) -> None:
    try:
        compiled = compile_regex(pattern)
    except RegexRefused as refused:
        assert str(refused).startswith("the regex ")
    else:
        assert compiled.programsize <= MAX_REGEX_PROGRAM
    try:
        rules(header_rule(pattern))
    except ValidationError as err:  # never anything else: the API answers 422
        assert err.errors()[0]["loc"][:5] == ("rules", 0, "match", "header", "regex")


@settings(max_examples=150, deadline=None)
@given(PATTERNS, st.text(st.characters(exclude_categories=()),
                         max_size=MAX_MATCHED_VALUE_CHARS))
def test_matching_any_value_of_bounded_length_is_fast(pattern: str, value: str) -> None:
    try:
        compiled = rules(header_rule(pattern, "v2"))
    except ValidationError:
        return
    tm = TransitionManager()
    tm.set_route(route({"v1": 90, "v2": 10}))
    tm.set_rules(MODEL, compiled)
    assert cpu_seconds(lambda: tm.choose(MODEL, body={"prompt": "x"}, headers={"x-a": value},
                                         rand=0.5)) < 0.05
