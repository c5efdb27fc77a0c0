"""A store outage longer than an activity's retries, on the time-skipping server: a
judgment or a step's shift that failed because the store did not answer is tried again
after a wait (each step applied once, the switch ending as it would have); any other
failure still interrupts the switch, and an operator's rollback during the outage ends it.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from turnout import contracts as c
from turnout.domain import OperationStatus, Outcome

from .conftest import Harness
from .test_rollouts import CANARY, control, evaluating_at, rollout, until

# The workflow sees what an activity raises once its retries are spent: here at once.
AWAY = ApplicationError("the store did not answer: ConnectionRefusedError: [Errno 111]",
                        type=c.STORE_UNAVAILABLE, non_retryable=True)
HEALTHY_ROUTES = [{"v2": 10, "v1": 90}, {"v2": 55, "v1": 45}, {"v2": 100}]


async def test_a_judgment_the_store_fails_is_made_again_once_it_answers(
        harness: Harness) -> None:
    harness.cluster.fail(c.JUDGE_HEALTH, AWAY, times=6)
    async with rollout(harness, "canary", CANARY) as handle:
        result = await handle.result()
    assert (result.status, result.outcome) == (OperationStatus.COMPLETED, Outcome.PROMOTED)
    assert harness.cluster.routes == HEALTHY_ROUTES
    judged = [i for n, i in harness.cluster.calls if n == c.JUDGE_HEALTH]
    assert len(judged) == 2 + 6
    # Every try judges the same window: the step's, not the time spent waiting.
    assert len({(i.window_start, i.window_end) for i in judged[:7]}) == 1


async def test_a_shift_the_store_fails_is_applied_once_it_answers(harness: Harness) -> None:
    harness.cluster.fail(c.SET_TRAFFIC, AWAY, times=4,
                         when=lambda i: i.weights.get("v2") == 55)
    async with rollout(harness, "canary", CANARY) as handle:
        result = await handle.result()
    assert result.outcome is Outcome.PROMOTED
    assert harness.cluster.routes == HEALTHY_ROUTES
    shifts = [i.change_key for n, i in harness.cluster.calls if n == c.SET_TRAFFIC]
    assert len(shifts) == 3 + 4 and len(set(shifts)) == 3  # the same change, tried again


async def test_the_wait_is_shown_and_a_rollback_during_it_ends_the_switch(
        harness: Harness) -> None:
    harness.cluster.fail(c.JUDGE_HEALTH, AWAY, times=1000)
    async with rollout(harness, "canary", CANARY) as handle:
        await until(handle, evaluating_at(10))
        await harness.env.sleep(CANARY["evaluation_period_minutes"] * 60 + 30)
        waiting = await until(handle, lambda s: "store did not answer" in (s.message or ""))
        assert waiting.weights == {"v2": 10, "v1": 90}
        await control(handle, c.ROLLBACK, "store is down, back out")
        result = await handle.result()
    assert (result.status, result.outcome) == (OperationStatus.FAILED, Outcome.ROLLED_BACK)
    assert "back out" in result.reason
    assert harness.cluster.routes[-1] == {"v1": 100}


async def test_another_failure_of_a_judgment_still_interrupts_the_switch(
        harness: Harness) -> None:
    harness.cluster.fail(c.JUDGE_HEALTH, ApplicationError("bad window", type="ValueError",
                                                          non_retryable=True), times=1)
    async with rollout(harness, "canary", CANARY) as handle:
        await until(handle, evaluating_at(10))
        result = await handle.result()
    assert (result.status, result.outcome) == (OperationStatus.FAILED, Outcome.ERROR)
    assert "bad window" in result.reason
    assert harness.cluster.routes[-1] == {"v1": 100}
