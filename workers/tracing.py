"""What the workers add to Temporal's `TracingInterceptor` spans when tracing is on: each
activity's span names the model, the version and the plan step it works on.

The workflow side puts the step of the switch in progress into a header of each activity
it schedules (headers are not part of what replay compares, and nothing is added when
tracing is off); the activity side reads the model and version from the activity's input
and sets all three on the `RunActivity:<name>` span.
"""

from __future__ import annotations

from typing import Any

from temporalio import activity, workflow
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    StartActivityInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from turnout import tracing

STEP_HEADER = "turnout-step"


class ActivityAttributes(Interceptor):
    """Worker interceptor: model, version and step on every activity's span."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next)

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput
                                   ) -> type[WorkflowInboundInterceptor] | None:
        return _WorkflowInbound


def worker_interceptors() -> list[Interceptor]:
    """For `Worker(interceptors=...)`: none when tracing is off. (Temporal's own
    `TracingInterceptor` comes with the client, see `turnout.runtime`.)"""
    return [ActivityAttributes()] if tracing.tracer() is not None else []


def _attributes(input: ExecuteActivityInput) -> dict[str, Any]:
    first = input.args[0] if input.args else None
    found: dict[str, Any] = {tracing.OPERATION: activity.info().workflow_id}
    model_id = getattr(first, "model_id", None)
    version = getattr(first, "version", None) or getattr(first, "target_version", None)
    if model_id:
        found[tracing.MODEL_ID] = model_id
    if version:
        found[tracing.VERSION] = version
    step = input.headers.get(STEP_HEADER)
    if step is not None:
        found[tracing.STEP] = activity.payload_converter().from_payload(step, int)
    return found


class _ActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        from opentelemetry import trace

        trace.get_current_span().set_attributes(_attributes(input))
        return await super().execute_activity(input)


def _step() -> int | None:
    """The plan step of the running workflow, if it is one with steps."""
    step = getattr(workflow.instance(), "trace_step", None)
    return step() if callable(step) else None


class _WorkflowOutbound(WorkflowOutboundInterceptor):
    def _with_step(self, headers: Any) -> Any:
        step = _step()
        if not step:
            return headers
        return {**headers, STEP_HEADER: workflow.payload_converter().to_payload(step)}

    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = self._with_step(input.headers)
        return super().start_activity(input)

    def start_local_activity(self, input: StartLocalActivityInput
                             ) -> workflow.ActivityHandle[Any]:
        input.headers = self._with_step(input.headers)
        return super().start_local_activity(input)


class _WorkflowInbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_WorkflowOutbound(outbound))
