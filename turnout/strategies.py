"""Strategy options and planning: strategy + options → the traffic steps of a switch.

Pure code: the workflow calls `plan_switch` to know what to do, the API and SDK call
`validate_strategy_config` to refuse bad options before anything starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from turnout.domain import SwitchingStrategyType

# How many times a step judged inconclusive (too few requests) is re-judged before the
# rollout waits for an operator: too little traffic is never taken for health.
MAX_INCONCLUSIVE_EXTENSIONS = 3


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImmediateOptions(_Options):
    """All traffic to the target at once."""


class GradualOptions(_Options):
    duration_minutes: float = Field(30, gt=0, le=7 * 24 * 60)
    steps: int = Field(10, ge=1, le=100)


class ABTestOptions(_Options):
    traffic_percentage: float = Field(20, gt=0, lt=100)
    test_duration_hours: float = Field(24, gt=0, le=30 * 24)
    # What follows the test: wait for an operator's promote or rollback ("manual"), or
    # promote when the target is not worse on any guarded metric ("auto").
    decision: Literal["manual", "auto"] = "manual"
    confidence: float = Field(0.95, gt=0.5, lt=1)


class CanaryOptions(_Options):
    initial_percentage: float = Field(5, gt=0, le=100)
    step_percentage: float = Field(15, gt=0, le=100)
    evaluation_period_minutes: float = Field(30, gt=0, le=24 * 60)


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


def validate_strategy_config(strategy: SwitchingStrategyType | str,
                             config: dict[str, Any] | None) -> _Options:
    """Parse options for a strategy; errors carry `loc` = ("strategy_config", field)."""
    try:
        kind = SwitchingStrategyType(strategy)
    except ValueError:
        allowed = ", ".join(s.value for s in SwitchingStrategyType)
        raise StrategyConfigError([{"loc": ("strategy",), "type": "enum",
                                    "msg": f"must be one of: {allowed}"}]) from None
    try:
        return OPTIONS[kind].model_validate(config or {})
    except ValidationError as exc:
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
                config: dict[str, Any] | None) -> list[PlanStep]:
    """The steps of a switch; the last one always puts the target at 100%."""
    options = validate_strategy_config(strategy, config)
    match options:
        case GradualOptions(duration_minutes=minutes, steps=steps):
            hold = minutes * 60 / steps
            return [PlanStep(target_percent=_pct(100 * i / steps),
                             hold_seconds=hold if i < steps else 0, judge=i < steps,
                             summary=f"gradual step {i}/{steps}")
                    for i in range(1, steps + 1)]
        case CanaryOptions(initial_percentage=start, step_percentage=step,
                           evaluation_period_minutes=minutes):
            percents = [start]
            while percents[-1] < 100:
                percents.append(min(100.0, percents[-1] + step))
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
