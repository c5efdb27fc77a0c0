"""Strategy options and planning: strategy + options → the traffic steps of a switch.

Pure code, and the strategies' whole say: the API and SDK call `validate_strategy_config`
and `first_version_problem` to refuse a switch before anything starts and
`planned_looks` to size its verdicts; the workflow calls `plan_switch` to know its steps,
`judged_thresholds` for what a step's verdict applies, and `ab_decision` for what
follows an A/B test. The workflow interprets plan steps; it decides nothing a strategy
should.

Every plan is bounded: at most `MAX_PLAN_STEPS` steps, and no share or step smaller than
`MIN_STEP_PERCENT` percentage point. The option models check both (a violation is a
`StrategyConfigError` naming the field), and `plan_switch` never loops more than the
bound allows, so no option can make planning spin or plan more steps than a workflow
history holds.

Two readings of the same options:

- *new* options (the default): the bounds above, as the API checks them before starting
  a switch;
- *recorded* options (`recorded=True`): the options a running workflow was started with.
  `SwitchWorkflow` re-plans on every replay, also after a worker restart; a workflow
  started by an earlier release carries options that release accepted, which may be
  outside today's bounds (a canary step of 0.5 point with 200 steps, say). Refusing them
  there would fail the workflow task on every replay, so a recorded reading falls back to
  the bounds every earlier release enforced (`_RECORDED_OPTIONS`) and plans exactly as
  those releases did, capped at `RECORDED_MAX_STEPS` so that even then it ends.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from turnout.domain import SwitchingStrategyType
from turnout.telemetry.verdicts import HEALTHY, UNHEALTHY, HealthThresholds, Verdict

# How many times a step judged inconclusive (too few requests) is re-judged before the
# rollout waits for an operator: too little traffic is never taken for health.
MAX_INCONCLUSIVE_EXTENSIONS = 3
# The most steps a plan may have (the last one, at 100%, included). Each step costs a
# traffic shift, a timer and a judgment in the workflow's history.
MAX_PLAN_STEPS = 100
# The smallest share a step may give the target, or add to it (percentage points): below
# it a weight change moves no measurable traffic (weights are kept to 0.01 point).
MIN_STEP_PERCENT = 0.1
# Recorded options (see the module docstring) are planned up to this many steps; more
# could never have fit in a workflow history, so such a workflow cannot exist.
RECORDED_MAX_STEPS = 100_000


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImmediateOptions(_Options):
    """All traffic to the target at once."""


class GradualOptions(_Options):
    duration_minutes: float = Field(30, gt=0, le=7 * 24 * 60)
    steps: int = Field(10, ge=1, le=MAX_PLAN_STEPS)


class ABTestOptions(_Options):
    # Both sides keep at least MIN_STEP_PERCENT of the traffic: the test compares them.
    traffic_percentage: float = Field(20, ge=MIN_STEP_PERCENT, le=100 - MIN_STEP_PERCENT)
    test_duration_hours: float = Field(24, gt=0, le=30 * 24)
    # What follows the test: wait for an operator's promote or rollback ("manual"), or
    # promote when the target is not worse on any guarded metric ("auto").
    decision: Literal["manual", "auto"] = "manual"
    confidence: float = Field(0.95, gt=0.5, lt=1)


class CanaryOptions(_Options):
    """Start at `initial_percentage`, add `step_percentage` after each healthy evaluation.

    Together they must reach 100% in at most `MAX_PLAN_STEPS` steps: the smallest step is
    about (100 - initial) / 99, so a canary from 5% may step by 0.96 point at the least.
    """

    initial_percentage: float = Field(5, ge=MIN_STEP_PERCENT, le=100)
    step_percentage: float = Field(15, ge=MIN_STEP_PERCENT, le=100)
    evaluation_period_minutes: float = Field(30, gt=0, le=24 * 60)

    @model_validator(mode="after")
    def _reaches_100_within_the_step_bound(self) -> CanaryOptions:
        percents = _canary_percents(self.initial_percentage, self.step_percentage,
                                    MAX_PLAN_STEPS)
        if percents is None:
            needed = _canary_step_count(self.initial_percentage, self.step_percentage)
            least = (100 - self.initial_percentage) / (MAX_PLAN_STEPS - 1)
            raise _field_error(
                "step_percentage", self.step_percentage, "too_many_steps",
                "from {initial}% a step of {step} point takes {needed} steps to reach "
                "100%; at most {max_steps} are allowed: step_percentage must be at least "
                "{least} (or initial_percentage higher)",
                {"initial": f"{self.initial_percentage:g}", "step": f"{self.step_percentage:g}",
                 "needed": needed, "max_steps": MAX_PLAN_STEPS,
                 "least": f"{math.ceil(least * 100) / 100:g}"})
        # Shares are kept to 0.01 point: a step just short of 100 would show (and be
        # routed) as 100% while still judged as a canary step.
        if len(percents) > 1 and _pct(percents[-2]) >= 100:
            raise _field_error(
                "step_percentage", self.step_percentage, "step_rounds_to_100",
                "the last step before 100% would be at {last}%, which rounds to 100% "
                "(weights are kept to 0.01 point): choose a step that lands on 100 or "
                "stays clear of it", {"last": f"{percents[-2]:.4f}"})
        return self


def _field_error(field: str, value: Any, kind: str, message: str,
                 context: dict[str, Any]) -> ValidationError:
    """A validation error located at `field`, for checks that span several fields (a
    model validator's own errors carry no field)."""
    return ValidationError.from_exception_data("options", [InitErrorDetails(
        type=PydanticCustomError(kind, message, context), loc=(field,), input=value)])


def _canary_step_count(start: float, step: float) -> int:
    """How many steps a canary plans (the last one at 100% included), without planning."""
    if start >= 100:
        return 1
    return 1 + max(1, math.ceil((100 - start) / step))


def _canary_percents(start: float, step: float, max_steps: int) -> list[float] | None:
    """The canary's shares, as every release has computed them (a running sum, so that a
    recorded workflow re-plans the very same floats); None beyond `max_steps` steps.

    The sum is only run once the count is known to be within the bound (a step too small
    to change a float would otherwise never reach 100).
    """
    if _canary_step_count(start, step) > max_steps + 1:
        return None
    percents = [start]
    while percents[-1] < 100:
        if len(percents) >= max_steps:
            return None
        percents.append(min(100.0, percents[-1] + step))
    return percents


OPTIONS: dict[SwitchingStrategyType, type[_Options]] = {
    SwitchingStrategyType.IMMEDIATE: ImmediateOptions,
    SwitchingStrategyType.GRADUAL: GradualOptions,
    SwitchingStrategyType.AB_TEST: ABTestOptions,
    SwitchingStrategyType.CANARY: CanaryOptions,
}


class StrategyConfigError(ValueError):
    """Strategy options out of range; `errors` name each field at fault."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


# The option bounds of the releases before the plan bounds: what a recorded workflow's
# options were checked against when it started (never tighten these).
class _RecordedGradualOptions(_Options):
    duration_minutes: float = Field(30, gt=0, le=7 * 24 * 60)
    steps: int = Field(10, ge=1, le=100)


class _RecordedABTestOptions(_Options):
    traffic_percentage: float = Field(20, gt=0, lt=100)
    test_duration_hours: float = Field(24, gt=0, le=30 * 24)
    decision: Literal["manual", "auto"] = "manual"
    confidence: float = Field(0.95, gt=0.5, lt=1)


class _RecordedCanaryOptions(_Options):
    initial_percentage: float = Field(5, gt=0, le=100)
    step_percentage: float = Field(15, gt=0, le=100)
    evaluation_period_minutes: float = Field(30, gt=0, le=24 * 60)


_RECORDED_OPTIONS: dict[SwitchingStrategyType, type[_Options]] = {
    SwitchingStrategyType.IMMEDIATE: ImmediateOptions,
    SwitchingStrategyType.GRADUAL: _RecordedGradualOptions,
    SwitchingStrategyType.AB_TEST: _RecordedABTestOptions,
    SwitchingStrategyType.CANARY: _RecordedCanaryOptions,
}


def validate_strategy_config(strategy: SwitchingStrategyType | str,
                             config: dict[str, Any] | None, *,
                             recorded: bool = False) -> _Options:
    """Parse options for a strategy; errors carry `loc` = ("strategy_config", field).

    `recorded=True` reads the options of a running workflow (see the module docstring):
    options within today's bounds parse as always; others are accepted if every earlier
    release would have accepted them, and come back as today's option class, unchecked.
    """
    try:
        kind = SwitchingStrategyType(strategy)
    except ValueError:
        allowed = ", ".join(s.value for s in SwitchingStrategyType)
        raise StrategyConfigError([{"loc": ("strategy",), "type": "enum",
                                    "msg": f"must be one of: {allowed}"}]) from None
    try:
        return OPTIONS[kind].model_validate(config or {})
    except ValidationError as exc:
        if recorded:
            with contextlib.suppress(ValidationError):
                old = _RECORDED_OPTIONS[kind].model_validate(config or {})
                return OPTIONS[kind].model_construct(**old.model_dump())
        raise StrategyConfigError([
            {"loc": ("strategy_config", *err["loc"]), "type": err["type"], "msg": err["msg"]}
            for err in exc.errors()
        ]) from None


class PlanStep(BaseModel):
    """Set the target's share to `target_percent`, hold it `hold_seconds`, then judge the
    target's health over the hold (when `judge`) before the next step."""

    target_percent: float = Field(ge=0, le=100)
    hold_seconds: float = Field(0, ge=0)
    judge: bool = False
    # A/B tests end in a two-sample comparison and a decision instead of a plain verdict.
    decide: bool = False
    summary: str = ""


def plan_switch(strategy: SwitchingStrategyType | str,
                config: dict[str, Any] | None, *, recorded: bool = False) -> list[PlanStep]:
    """The steps of a switch; the last one always puts the target at 100%.

    New options (the default) plan at most `MAX_PLAN_STEPS` steps; `recorded=True` plans a
    running workflow's options as the release that started it did (module docstring).
    """
    options = validate_strategy_config(strategy, config, recorded=recorded)
    max_steps = RECORDED_MAX_STEPS if recorded else MAX_PLAN_STEPS
    match options:
        case GradualOptions(duration_minutes=minutes, steps=steps):
            hold = minutes * 60 / steps
            return [PlanStep(target_percent=_pct(100 * i / steps),
                             hold_seconds=hold if i < steps else 0, judge=i < steps,
                             summary=f"gradual step {i}/{steps}")
                    for i in range(1, steps + 1)]
        case CanaryOptions(initial_percentage=start, step_percentage=step,
                           evaluation_period_minutes=minutes):
            percents = _canary_percents(start, step, max_steps)
            if percents is None:
                raise StrategyConfigError([{
                    "loc": ("strategy_config", "step_percentage"), "type": "too_many_steps",
                    "msg": f"a canary from {start:g}% by {step:g} point takes more than "
                           f"{max_steps} steps"}])
            return [PlanStep(target_percent=_pct(p),
                             hold_seconds=minutes * 60 if p < 100 else 0, judge=p < 100,
                             summary=f"canary at {_pct(p):g}%") for p in percents]
        case ABTestOptions(traffic_percentage=share, test_duration_hours=hours):
            return [PlanStep(target_percent=_pct(share), hold_seconds=hours * 3600,
                             judge=True, decide=True, summary=f"A/B test at {_pct(share):g}%"),
                    PlanStep(target_percent=100, summary="promote A/B winner")]
        case _:
            return [PlanStep(target_percent=100, summary="switch all traffic")]


def _pct(value: float) -> float:
    return round(float(value), 2)


def first_version_problem(strategy: SwitchingStrategyType | str,
                          live_version: str | None) -> str | None:
    """Why a strategy cannot switch a model that has nothing live (None if it can): a
    gradual, canary or A/B switch shifts traffic from the live version, so a model's
    first version goes live with an immediate switch."""
    if live_version is None and SwitchingStrategyType(strategy) is not \
            SwitchingStrategyType.IMMEDIATE:
        return ("has no live version to shift traffic from: make its first version live "
                "with an immediate switch")
    return None


def planned_looks(strategy: SwitchingStrategyType | str,
                  config: dict[str, Any] | None) -> int:
    """The most judged looks the switch's plan takes, for `HealthThresholds.looks`.

    Every judged step is one look; a plain (non-A/B) judged step may also be re-judged
    while inconclusive, up to `MAX_INCONCLUSIVE_EXTENSIONS` times, so those count too.
    Counting them is conservative (an inconclusive look cannot fail), at a small cost in
    power. An A/B decision is judged once. At least 1: an immediate switch still judges
    nothing.
    """
    steps = plan_switch(strategy, config)
    judged = [step for step in steps if step.judge and step.hold_seconds > 0]
    extensions = MAX_INCONCLUSIVE_EXTENSIONS if any(not step.decide for step in judged) else 0
    return max(1, len(judged) + extensions)


def judged_thresholds(strategy: SwitchingStrategyType | str, config: dict[str, Any] | None,
                      thresholds: HealthThresholds) -> HealthThresholds:
    """What a step's verdict applies: the switch's thresholds, at the A/B test's own
    `confidence` for an A/B test. Reads recorded options (a running workflow's)."""
    options = validate_strategy_config(strategy, config, recorded=True)
    if isinstance(options, ABTestOptions):
        return thresholds.model_copy(update={"confidence": options.confidence})
    return thresholds


class Decision(BaseModel):
    """What follows an A/B test: promote now, or wait for an operator (and why)."""

    promote: bool = False
    reason: str = ""


def rolls_back(step: PlanStep, strategy: SwitchingStrategyType | str,
               config: dict[str, Any] | None, verdict: Verdict) -> bool:
    """Whether an unhealthy verdict rolls the switch back on its own.

    Always, but at the end of an A/B test with a `manual` decision whose target is only
    worse than the stable version (no absolute limit crossed): comparing the two is what
    that test is for, and its result goes to the operator, who may accept a slower
    version that answers better. A target over an absolute limit (error rate, p95 or p99
    latency) hurts users whatever the test: rolled back in every strategy."""
    if not step.decide or verdict.over_limits:
        return True
    options = validate_strategy_config(strategy, config, recorded=True)
    return not (isinstance(options, ABTestOptions) and options.decision == "manual")


def ab_decision(strategy: SwitchingStrategyType | str, config: dict[str, Any] | None,
                verdict: Verdict) -> Decision:
    """The end of an A/B test, from its options' `decision` and the final verdict:
    `auto` promotes a target that is not worse on any guarded metric; otherwise (manual,
    or an auto test whose verdict is not healthy) an operator decides."""
    options = validate_strategy_config(strategy, config, recorded=True)
    assert isinstance(options, ABTestOptions)
    if options.decision == "auto" and verdict.outcome == HEALTHY:
        return Decision(promote=True, reason=f"A/B test: target not worse ({verdict.reason})")
    if options.decision == "manual":
        why = "the A/B test has ended" if verdict.outcome != UNHEALTHY \
            else f"the A/B test has ended with the target worse ({verdict.reason})"
    else:
        why = f"the A/B test was inconclusive ({verdict.reason})"
    return Decision(reason=f"{why}; waiting for an operator to promote or roll back")
