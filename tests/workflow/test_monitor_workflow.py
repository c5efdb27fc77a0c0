"""MonitorWorkflow on the time-skipping server, with activity doubles: looks at its interval,
measures engines per host (a dead host does not stop a look), continues as new to keep its
history short, and stops on a signal or when monitoring is switched off."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from turnout import contracts as c
from turnout.config import engine_task_queue
from workflows import WORKFLOWS, MonitorWorkflow


@dataclass
class FakeMonitoring:
    hosts: list[str] = field(default_factory=lambda: ["alive", "dead"])
    interval_s: float = 60
    # Looks after which `assess_health` says monitoring was switched off.
    stop_after: int | None = None
    looks: list[c.AssessHealthInput] = field(default_factory=list)
    measured: list[str] = field(default_factory=list)
    # Workflow time of each look, from the activity's info.
    times: list[float] = field(default_factory=list)

    def control_activities(self) -> list[Any]:
        @activity.defn(name=c.LIST_ENGINE_HOSTS)
        async def list_engine_hosts(input: c.ModelHostsInput) -> list[str]:
            return self.hosts

        @activity.defn(name=c.ASSESS_HEALTH)
        async def assess_health(input: c.AssessHealthInput) -> c.AssessHealthResult:
            self.looks.append(input)
            self.times.append(activity.info().current_attempt_scheduled_time.timestamp())
            keep = self.stop_after is None or len(self.looks) < self.stop_after
            return c.AssessHealthResult(summary=f"look {len(self.looks)}",
                                        interval_s=self.interval_s, keep_monitoring=keep)

        return [list_engine_hosts, assess_health]

    def engine_activity(self, host: str) -> Any:
        @activity.defn(name=c.MEASURE_ENGINES)
        async def measure_engines(input: c.MeasureEnginesInput) -> c.MeasureEnginesResult:
            self.measured.append(host)
            return c.MeasureEnginesResult(engines={"v1": [{"host": host, "cpu_percent": 12}]})

        return measure_engines


async def run_monitor(env: WorkflowEnvironment, fake: FakeMonitoring,
                      input: c.MonitorInput, *, run_for: timedelta | None = None,
                      stop: bool = False) -> tuple[str | None, WorkflowExecutionStatus | None]:
    queue = f"control-{uuid.uuid4()}"
    control = Worker(env.client, task_queue=queue, workflows=WORKFLOWS,
                     activities=fake.control_activities())
    # Only the "alive" host has a worker: the "dead" one's measurement must time out.
    alive = Worker(env.client, task_queue=engine_task_queue("alive"),
                   activities=[fake.engine_activity("alive")])
    async with control, alive:
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


async def test_looks_every_interval_and_measures_the_hosts_that_answer(
        time_env: WorkflowEnvironment) -> None:
    fake = FakeMonitoring(stop_after=4)
    result, _ = await run_monitor(time_env, fake,
                                  c.MonitorInput(model_id="m", measure_timeout_s=1))
    assert result is not None and result.startswith("stopped: look 4")
    assert len(fake.looks) == 4
    assert set(fake.measured) == {"alive"}
    # The dead host's engines are left out; the alive host's reach the assessment.
    assert all([r.engines for r in look.resources] == [{"v1": [{"host": "alive",
                                                               "cpu_percent": 12}]}]
               for look in fake.looks)
    gaps = [b - a for a, b in zip(fake.times, fake.times[1:], strict=False)]
    assert all(60 <= gap < 90 for gap in gaps), gaps
    # Each look judges the interval since the previous one.
    assert [look.window_s for look in fake.looks[1:]] == [60, 60, 60]


async def test_continues_as_new_and_keeps_looking(time_env: WorkflowEnvironment) -> None:
    fake = FakeMonitoring(hosts=[], interval_s=30)
    _, status = await run_monitor(time_env, fake, c.MonitorInput(model_id="m", looks_per_run=3),
                                  run_for=timedelta(minutes=5))
    assert status is WorkflowExecutionStatus.RUNNING
    # 5 minutes at one look per 30 s, across at least three runs of 3 looks.
    assert len(fake.looks) >= 9


async def test_a_stop_signal_ends_it(time_env: WorkflowEnvironment) -> None:
    fake = FakeMonitoring(hosts=[])
    result, _ = await run_monitor(time_env, fake, c.MonitorInput(model_id="m"),
                                  run_for=timedelta(minutes=3), stop=True)
    assert result == "stopped by signal"
    assert 3 <= len(fake.looks) <= 5
