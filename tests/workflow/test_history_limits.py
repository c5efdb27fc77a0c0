"""How big a switch's history grows at worst, measured: the longest plan a switch accepts
(100 steps), each step judged inconclusive as often as it may be before it waits for an
operator, with verdicts the size real judgments return, and a 48-hour A/B test steered by
many pauses and resumes. Temporal ends a workflow whose history passes 51,200 events or
50 MB and refuses a single payload over 2 MB; it suggests continuing as new from 4 MB on.
"""

from __future__ import annotations

import json
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError

from turnout import contracts as c
from turnout.domain import VERDICTS_KEPT, Outcome
from turnout.strategies import MAX_INCONCLUSIVE_EXTENSIONS, MAX_PLAN_STEPS, plan_switch

from .conftest import Harness
from .test_rollouts import control, evaluating_at, rollout, until

# A verdict from a real run (tests/replay/histories/switch-canary-two-steps-v6.json).
REAL_VERDICT = c.Verdict.model_validate(json.loads(
    (Path(__file__).parent / "data" / "verdict-two-steps-v6.json").read_text()))
# Temporal's limits (server defaults): a history's events and bytes, one payload's bytes.
MAX_EVENTS = 51_200
MAX_HISTORY_BYTES = 50 * 1024 * 1024
MAX_PAYLOAD_BYTES = 2 * 1024 * 1024
SUGGEST_CONTINUE_AS_NEW_BYTES = 4 * 1024 * 1024


async def measure(handle: WorkflowHandle, *, completed: bool = True) -> tuple[int, int, int]:
    """Events, bytes, and the largest single event of the workflow's history."""
    history = await handle.fetch_history()
    sizes = [event.ByteSize() for event in history.events]
    if completed:
        assert history.events[-1].event_type == \
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    return len(sizes), sum(sizes), max(sizes)


async def test_the_longest_canary_judged_at_every_extension_stays_within_limits(
        harness: Harness) -> None:
    config = {"initial_percentage": 1, "step_percentage": 1,
              "evaluation_period_minutes": 10}
    steps = len(plan_switch("canary", config))
    assert steps == MAX_PLAN_STEPS
    looks_per_step = 1 + MAX_INCONCLUSIVE_EXTENSIONS
    harness.cluster.real_verdict = REAL_VERDICT
    harness.cluster.verdicts = (["inconclusive"] * MAX_INCONCLUSIVE_EXTENSIONS
                                + ["healthy"]) * (steps - 1)
    async with rollout(harness, "canary", config) as handle:
        result = await handle.result()
        events, size, largest = await measure(handle)
    assert result.outcome is Outcome.PROMOTED
    assert result.verdict_count == (steps - 1) * looks_per_step
    assert len(result.verdicts) == VERDICTS_KEPT
    print(f"100-step canary, {result.verdict_count} looks: {events} events, "
          f"{size / 1e6:.2f} MB, largest event {largest / 1e6:.2f} MB")
    assert events < MAX_EVENTS / 4
    assert size < SUGGEST_CONTINUE_AS_NEW_BYTES
    assert largest < MAX_PAYLOAD_BYTES / 4


async def test_a_48_hour_ab_test_with_many_controls_stays_within_limits(
        harness: Harness) -> None:
    harness.cluster.real_verdict = REAL_VERDICT
    config = {"traffic_percentage": 20, "test_duration_hours": 48}
    pauses = 200
    async with rollout(harness, "ab_test", config) as handle:
        await until(handle, evaluating_at(20))
        for _ in range(pauses):  # an operator who pauses and resumes every 15 minutes
            await harness.env.sleep(48 * 3600 / (pauses + 1))
            await control(handle, c.PAUSE)
            await control(handle, c.RESUME)
        await harness.env.sleep(3600)  # the rest of the 48 hours
        await until(handle, lambda s: s.phase == "awaiting_decision")
        await control(handle, c.PROMOTE, "B wins")
        result = await handle.result()
        events, size, largest = await measure(handle)
    assert result.outcome is Outcome.PROMOTED
    print(f"48-hour A/B test, {pauses} pauses and resumes: {events} events, "
          f"{size / 1e6:.2f} MB, largest event {largest / 1e6:.2f} MB")
    assert events < MAX_EVENTS / 4
    assert size < SUGGEST_CONTINUE_AS_NEW_BYTES


async def test_pauses_are_refused_before_the_history_fills_then_the_switch_still_ends(
        harness: Harness) -> None:
    """Only pauses and resumes grow a history without end: past 20,000 events they are
    refused with the reason, and rollback (or promote, abort) still ends the switch."""
    config = {"traffic_percentage": 20, "test_duration_hours": 48}
    pairs = 0
    async with rollout(harness, "ab_test", config) as handle:
        await until(handle, evaluating_at(20))
        while True:
            try:
                await control(handle, c.PAUSE)
            except WorkflowUpdateFailedError as err:
                assert "history is nearly full" in str(err.cause)
                assert "roll back" in str(err.cause)
                break
            await control(handle, c.RESUME)
            pairs += 1
            assert pairs < 2000, "pauses were never refused"
        events, size, _ = await measure(handle, completed=False)
        assert 20_000 < events < 20_100 and size < MAX_HISTORY_BYTES / 2
        await control(handle, c.ROLLBACK, "enough")
        result = await handle.result()
    assert result.outcome is Outcome.ROLLED_BACK
    assert pairs > 700  # an operator's pauses are refused only after hundreds
