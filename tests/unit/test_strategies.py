"""Strategy options and planning: pure code, no servers."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnout.domain import SwitchingStrategyType
from turnout.strategies import (
    MAX_PLAN_STEPS,
    MIN_STEP_PERCENT,
    ABTestOptions,
    StrategyConfigError,
    plan_switch,
    validate_strategy_config,
)


def test_immediate_is_one_step_to_100() -> None:
    plan = plan_switch("immediate", {})
    assert [s.target_percent for s in plan] == [100]
    assert plan[0].hold_seconds == 0


def test_gradual_rises_in_equal_steps_over_the_duration() -> None:
    plan = plan_switch(SwitchingStrategyType.GRADUAL, {"duration_minutes": 15, "steps": 5})
    assert [s.target_percent for s in plan] == [20, 40, 60, 80, 100]
    assert sum(s.hold_seconds for s in plan) == pytest.approx(15 * 60 * 4 / 5)


def test_canary_starts_small_and_steps_up_to_100() -> None:
    plan = plan_switch("canary", {"initial_percentage": 5, "step_percentage": 15,
                                  "evaluation_period_minutes": 30})
    assert [s.target_percent for s in plan] == [5, 20, 35, 50, 65, 80, 95, 100]
    assert all(s.hold_seconds == 1800 for s in plan[:-1])


def test_ab_test_holds_the_split_for_the_test_duration() -> None:
    plan = plan_switch("ab_test", {"traffic_percentage": 20, "test_duration_hours": 48})
    assert plan[0].target_percent == 20 and plan[0].hold_seconds == 48 * 3600
    assert plan[-1].target_percent == 100


def test_fractions_of_durations_are_accepted() -> None:
    plan = plan_switch("canary", {"evaluation_period_minutes": 0.1})
    assert plan[0].hold_seconds == pytest.approx(6)


@pytest.mark.parametrize(("strategy", "config", "field"), [
    ("gradual", {"steps": 0}, "steps"),
    ("gradual", {"duration_minutes": -1}, "duration_minutes"),
    ("canary", {"initial_percentage": 150}, "initial_percentage"),
    ("ab_test", {"traffic_percentage": 100}, "traffic_percentage"),
    ("ab_test", {"test_duration_hours": "soon"}, "test_duration_hours"),
    ("immediate", {"steps": 3}, "steps"),
])
def test_bad_options_name_the_field(strategy: str, config: dict, field: str) -> None:
    with pytest.raises(StrategyConfigError) as info:
        validate_strategy_config(strategy, config)
    assert info.value.errors[0]["loc"] == ("strategy_config", field)


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(StrategyConfigError) as info:
        validate_strategy_config("yolo", {})
    assert info.value.errors[0]["loc"] == ("strategy",)


def _old_canary(start: float, step: float, cap: int) -> list[float]:
    """The canary's shares as releases before the plan bounds computed them (stopped at
    `cap` steps): the oracle for the bounds and for recorded workflows."""
    percents = [start]
    while percents[-1] < 100 and len(percents) <= cap:
        percents.append(min(100.0, percents[-1] + step))
    return percents


def _check_plan(plan: list) -> None:
    """What every plan promises: at most MAX_PLAN_STEPS steps, rising strictly, every
    share within (0, 100], ending at 100% with nothing left to judge."""
    percents = [s.target_percent for s in plan]
    assert 1 <= len(plan) <= MAX_PLAN_STEPS
    assert all(0 < p <= 100 for p in percents)
    assert all(b > a for a, b in zip(percents, percents[1:], strict=False))
    assert percents[-1] == 100 and not plan[-1].judge


@given(start=st.floats(MIN_STEP_PERCENT, 100), step=st.floats(MIN_STEP_PERCENT, 100))
def test_canary_within_the_bounds_plans_at_most_100_rising_steps_to_100(
        start: float, step: float) -> None:
    """Within the field bounds a canary is refused exactly when it would take more than
    100 steps or step to a share that rounds to 100%; otherwise it plans what earlier
    releases planned, within the bounds."""
    config = {"initial_percentage": start, "step_percentage": step}
    old = _old_canary(start, step, MAX_PLAN_STEPS + 1)
    too_long = len(old) > MAX_PLAN_STEPS
    rounds_to_100 = len(old) > 1 and round(old[-2], 2) >= 100
    if too_long or rounds_to_100:
        with pytest.raises(StrategyConfigError) as info:
            plan_switch("canary", config)
        assert info.value.errors[0]["loc"] == ("strategy_config", "step_percentage")
        return
    plan = plan_switch("canary", config)
    _check_plan(plan)
    assert [s.target_percent for s in plan] == [round(p, 2) for p in old]


@given(steps=st.integers(1, MAX_PLAN_STEPS), minutes=st.floats(0.01, 7 * 24 * 60))
def test_gradual_within_the_bounds_plans_its_steps_to_100(steps: int, minutes: float) -> None:
    plan = plan_switch("gradual", {"duration_minutes": minutes, "steps": steps})
    _check_plan(plan)
    assert len(plan) == steps


@given(share=st.floats(MIN_STEP_PERCENT, 100 - MIN_STEP_PERCENT))
def test_ab_test_within_the_bounds_splits_then_promotes(share: float) -> None:
    plan = plan_switch("ab_test", {"traffic_percentage": share})
    _check_plan(plan)
    assert len(plan) == 2 and 0 < plan[0].target_percent < 100 and plan[0].decide


_OUT_OF_RANGE = st.one_of(
    st.floats(max_value=MIN_STEP_PERCENT, exclude_max=True),
    st.floats(min_value=100, exclude_min=True), st.just(float("nan")),
    st.sampled_from([1e-17, 1e-300, 0.001, 0.0999, 0, -5]))


@settings(max_examples=200)
@given(data=st.data())
def test_options_outside_the_bounds_are_refused_at_once_naming_the_field(data) -> None:
    strategy, field = data.draw(st.sampled_from([
        ("canary", "initial_percentage"), ("canary", "step_percentage"),
        ("ab_test", "traffic_percentage")]))
    value = data.draw(_OUT_OF_RANGE)
    if field == "traffic_percentage" and value >= 100 - MIN_STEP_PERCENT:
        value = data.draw(st.floats(100 - MIN_STEP_PERCENT, 1e6, exclude_min=True))
    started = time.perf_counter()
    with pytest.raises(StrategyConfigError) as info:
        plan_switch(strategy, {field: value})
    assert time.perf_counter() - started < 0.05
    assert ("strategy_config", field) in [e["loc"] for e in info.value.errors]


@pytest.mark.parametrize("steps", [0, MAX_PLAN_STEPS + 1, 10**9])
def test_gradual_steps_beyond_the_bound_are_refused(steps: int) -> None:
    with pytest.raises(StrategyConfigError) as info:
        plan_switch("gradual", {"steps": steps})
    assert info.value.errors[0]["loc"] == ("strategy_config", "steps")


def test_the_issue_examples_are_refused_fast_with_the_least_step() -> None:
    """`1e-17` made planning loop for ever, `0.001` planned ~95,000 steps."""
    for step in (1e-17, 0.001, 0.5):
        started = time.perf_counter()
        with pytest.raises(StrategyConfigError) as info:
            validate_strategy_config("canary", {"step_percentage": step})
        assert time.perf_counter() - started < 0.05
        assert info.value.errors[0]["loc"] == ("strategy_config", "step_percentage")
    assert "at least 0.96" in str(info.value)  # from 5%: 95 points in 99 steps


@given(start=st.floats(0.01, 100), step=st.floats(0.01, 100))
def test_recorded_options_plan_as_the_release_that_accepted_them(
        start: float, step: float) -> None:
    """A running workflow re-plans on replay: options an earlier release accepted (here a
    step as small as 0.01, up to 10,000 steps) plan the very same shares, even where
    today's bounds refuse them."""
    config = {"initial_percentage": start, "step_percentage": step}
    plan = plan_switch("canary", config, recorded=True)
    assert [s.target_percent for s in plan] == \
        [round(p, 2) for p in _old_canary(start, step, 10**6)]
    assert plan[-1].target_percent == 100


def test_recorded_options_still_end_when_no_release_could_have_run_them() -> None:
    """A step that cannot move a float never reached a workflow (the API hung first);
    read as recorded it is refused instead of looping."""
    started = time.perf_counter()
    with pytest.raises(StrategyConfigError):
        plan_switch("canary", {"step_percentage": 1e-17}, recorded=True)
    assert time.perf_counter() - started < 0.05
    with pytest.raises(StrategyConfigError):  # never accepted: refused as recorded too
        validate_strategy_config("canary", {"step_percentage": 0}, recorded=True)


def test_recorded_ab_options_keep_their_decision() -> None:
    options = validate_strategy_config("ab_test", {"traffic_percentage": 99.95,
                                                   "decision": "auto"}, recorded=True)
    assert isinstance(options, ABTestOptions) and options.decision == "auto"


def test_every_recorded_history_replans_identically() -> None:
    """The strategy configs of the committed replay histories plan the same steps whether
    read as new or as recorded options (they are all within today's bounds)."""
    histories = Path(__file__).parents[1] / "replay" / "histories"
    seen = 0
    for path in sorted(histories.glob("switch-*.json")):
        events = json.loads(path.read_text())["events"]
        started = events[0]["workflowExecutionStartedEventAttributes"]
        payload = json.loads(base64.b64decode(started["input"]["payloads"][0]["data"]))
        strategy, config = payload["strategy"], payload["strategy_config"]
        assert plan_switch(strategy, config) == plan_switch(strategy, config, recorded=True)
        seen += 1
    assert seen >= 10


def test_the_ab_decision_rules() -> None:
    """README's table: manual waits unless an absolute limit is crossed; auto promotes a
    target that is not worse, rolls back a worse one, waits on an inconclusive one."""
    from turnout.strategies import ab_decision, plan_switch, rolls_back
    from turnout.telemetry.verdicts import Verdict

    worse = Verdict(outcome="unhealthy", reason="p95 latency 90 ms vs stable 20 ms",
                    analysis={"error_rate": {"over_limit": False},
                              "latency": {"over_limit": False}})
    over = worse.model_copy(update={"analysis": {"error_rate": {"over_limit": True}}})
    healthy = Verdict(outcome="healthy", reason="fine")
    quiet = Verdict(outcome="inconclusive", reason="only 3 requests")
    for decision in ("manual", "auto"):
        config = {"decision": decision, "test_duration_hours": 1}
        ab_step = plan_switch("ab_test", config)[0]
        assert rolls_back(ab_step, "ab_test", config, over)
        assert rolls_back(ab_step, "ab_test", config, worse) == (decision == "auto")
        assert ab_decision("ab_test", config, healthy).promote == (decision == "auto")
        assert not ab_decision("ab_test", config, quiet).promote
    manual = {"decision": "manual"}
    assert "ended with the target worse (p95 latency" in ab_decision(
        "ab_test", manual, worse).reason
    canary_step = plan_switch("canary", {})[0]
    assert rolls_back(canary_step, "canary", {}, worse)  # not an A/B test: always
