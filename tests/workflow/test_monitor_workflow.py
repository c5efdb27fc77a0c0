"""MonitorWorkflow on the time-skipping server, with activity doubles: looks at its interval
(one local assessment per look, engine figures read from what the hosts recorded),
continues as new to keep its history short, and stops on a signal or when monitoring is
switched off. Runs from before the one-look patch are covered by the replay tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from turnout import contracts as c
from workflows import WORKFLOWS, MonitorWorkflow


@dataclass
class FakeMonitoring:
    interval_s: float = 60
    # Looks after which `assess_health` says monitoring was switched off.
    stop_after: int | None = None
    looks: list[c.AssessHealthInput] = field(default_factory=list)
    # The test server's (skipped) time of each look.
    times: list[float] = field(default_factory=list)
    env: WorkflowEnvironment | None = None
    local: list[bool] = field(default_factory=list)
    # Looks (1-based) that fail as a look does when the store is away.
    failing: set[int] = field(default_factory=set)
    failures: list[c.FailedLookInput] = field(default_factory=list)

    def control_activities(self) -> list[Any]:
        @activity.defn(name=c.ASSESS_HEALTH)
        async def assess_health(input: c.AssessHealthInput) -> c.AssessHealthResult:
            self.looks.append(input)
            self.local.append(activity.info().is_local)
            assert self.env is not None
            self.times.append((await self.env.get_current_time()).timestamp())
            if len(self.looks) in self.failing:
                raise ApplicationError("database is locked", non_retryable=True)
            keep = self.stop_after is None or len(self.looks) < self.stop_after
            return c.AssessHealthResult(summary=f"look {len(self.looks)}",
                                        interval_s=self.interval_s, keep_monitoring=keep)

        @activity.defn(name=c.RECORD_FAILED_LOOK)
        async def record_failed_look(input: c.FailedLookInput) -> None:
            self.failures.append(input)

        return [assess_health, record_failed_look]


async def run_monitor(env: WorkflowEnvironment, fake: FakeMonitoring,
                      input: c.MonitorInput, *, run_for: timedelta | None = None,
                      stop: bool = False) -> tuple[str | None, WorkflowExecutionStatus | None]:
    queue = f"control-{uuid.uuid4()}"
    fake.env = env
    control = Worker(env.client, task_queue=queue, workflows=WORKFLOWS,
                     activities=fake.control_activities())
    async with control:
        handle = await env.client.start_workflow(
            MonitorWorkflow.run, input, id=f"monitor-{uuid.uuid4()}", task_queue=queue)
        if run_for is None:
            return await handle.result(), None
        await env.sleep(run_for.total_seconds())
        if stop:
            await handle.signal(c.STOP_MONITOR)
            return await handle.result(), None
        description = await handle.describe()
        await handle.terminate()
        return None, description.status


async def test_looks_every_interval_with_one_local_assessment(
        time_env: WorkflowEnvironment) -> None:
    fake = FakeMonitoring(stop_after=4)
    result, _ = await run_monitor(time_env, fake, c.MonitorInput(model_id="m"))
    assert result is not None and result.startswith("stopped: look 4")
    assert len(fake.looks) == 4
    # Engine figures come from the store, where each host records them every interval.
    assert fake.local == [True] * 4
    assert all(look.measured_by_hosts and not look.resources for look in fake.looks)
    gaps = [b - a for a, b in zip(fake.times, fake.times[1:], strict=False)]
    # The first pause is a random share of the interval, so that monitors started together
    # spread their looks; then one look per interval.
    assert 6 <= gaps[0] < 60 + 30, gaps
    assert all(60 <= gap < 90 for gap in gaps[1:]), gaps
    # Each look judges the interval since the previous one; the first, the monitoring
    # interval of the settings (0 asks the activity for it).
    assert fake.looks[0].window_s == 0
    first_pause = fake.looks[1].window_s
    assert 6 <= first_pause <= 60
    assert [look.window_s for look in fake.looks[2:]] == [60, 60]


async def test_continues_as_new_and_keeps_looking(time_env: WorkflowEnvironment) -> None:
    fake = FakeMonitoring(interval_s=30)
    _, status = await run_monitor(time_env, fake, c.MonitorInput(model_id="m", looks_per_run=3),
                                  run_for=timedelta(minutes=5))
    assert status is WorkflowExecutionStatus.RUNNING
    # 5 minutes at one look per 30 s, across at least three runs of 3 looks.
    assert len(fake.looks) >= 9


async def test_a_stop_signal_ends_it(time_env: WorkflowEnvironment) -> None:
    fake = FakeMonitoring()
    result, _ = await run_monitor(time_env, fake, c.MonitorInput(model_id="m"),
                                  run_for=timedelta(minutes=3), stop=True)
    assert result == "stopped by signal"
    assert 3 <= len(fake.looks) <= 5


async def test_monitors_started_together_look_at_different_moments(
        time_env: WorkflowEnvironment) -> None:
    fake = FakeMonitoring(interval_s=60, stop_after=None)
    fake.env = time_env
    queue = f"control-{uuid.uuid4()}"
    async with Worker(time_env.client, task_queue=queue, workflows=WORKFLOWS,
                      activities=fake.control_activities()):
        handles = [await time_env.client.start_workflow(
            MonitorWorkflow.run, c.MonitorInput(model_id=f"m{i}"), id=f"monitor-{uuid.uuid4()}",
            task_queue=queue) for i in range(8)]
        await time_env.sleep(100)
        for handle in handles:
            await handle.terminate()
    first_pauses = sorted(look.window_s for look in fake.looks
                          if look.window_s not in (0, 30, 60))
    # Every monitor's second look came after its own random share of the interval.
    assert len(first_pauses) >= 8, first_pauses
    assert first_pauses[-1] - first_pauses[0] > 20, first_pauses


async def test_after_continuing_as_new_the_first_look_judges_the_interval(
        time_env: WorkflowEnvironment) -> None:
    """With a monitoring interval of 45 s (not the 30 s default of the look's result),
    the first look of every run after continue-as-new judges the last 45 s."""
    fake = FakeMonitoring(interval_s=45)
    _, status = await run_monitor(time_env, fake, c.MonitorInput(model_id="m", looks_per_run=2),
                                  run_for=timedelta(minutes=6))
    assert status is WorkflowExecutionStatus.RUNNING
    assert len(fake.looks) >= 6
    assert fake.looks[0].window_s == 0
    # Looks 3, 5, ... are the first of a new run: 45 s like the others, never 30.
    assert [look.window_s for look in fake.looks[2:]] == [45.0] * (len(fake.looks) - 2)


async def test_a_failed_look_is_counted_recorded_and_tried_again(
        time_env: WorkflowEnvironment) -> None:
    """Looks 2 and 3 fail (the store is away): the monitor keeps running, records each
    failure, looks again one interval later, and the next good look carries the count and
    the reason for `GET /health/models`; the count survives continue-as-new."""
    fake = FakeMonitoring(interval_s=30, failing={2, 3})
    _, status = await run_monitor(time_env, fake, c.MonitorInput(model_id="m", looks_per_run=4),
                                  run_for=timedelta(minutes=4))
    assert status is WorkflowExecutionStatus.RUNNING
    assert [f.failed_looks for f in fake.failures] == [1, 2]
    assert all("database is locked" in f.reason and f.interval_s == 30
               for f in fake.failures)
    assert len(fake.looks) >= 6
    fourth = fake.looks[3]
    assert fourth.failed_looks == 2 and fourth.last_failure is not None
    assert "database is locked" in fourth.last_failure
    # Tried again one interval after each failure.
    assert 30 <= fake.times[2] - fake.times[1] < 40 and 30 <= fake.times[3] - fake.times[2] < 40
    # Look 5 is the first of the second run: the count came along.
    assert fake.looks[4].failed_looks == 2
