"""Strategy options and planning: pure code, no servers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnout.domain import SwitchingStrategyType
from turnout.strategies import StrategyConfigError, plan_switch, validate_strategy_config


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


@given(start=st.floats(0.5, 100), step=st.floats(0.5, 100))
def test_canary_weights_never_exceed_100_never_decrease_and_end_at_100(
        start: float, step: float) -> None:
    percents = [s.target_percent for s in plan_switch(
        "canary", {"initial_percentage": start, "step_percentage": step})]
    assert all(0 < p <= 100 for p in percents)
    assert percents == sorted(percents)
    assert percents[-1] == 100


@given(minutes=st.floats(0.01, 1000), steps=st.integers(1, 100))
def test_gradual_weights_never_exceed_100_never_decrease_and_end_at_100(
        minutes: float, steps: int) -> None:
    percents = [s.target_percent for s in plan_switch(
        "gradual", {"duration_minutes": minutes, "steps": steps})]
    assert len(percents) == steps
    assert percents == sorted(percents) and percents[-1] == 100
