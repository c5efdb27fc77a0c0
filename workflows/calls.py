"""Calling activities by their typed references (`turnout.contracts.ActivityRef`).

`execute(c.SET_TRAFFIC, input, ...)` is `workflow.execute_activity` with the result type
the contract declares: the caller gets a `SetTrafficResult` (as mypy sees it too), and the
input is the declared type. The commands recorded are exactly those of a direct call (same
name, same options), so switching a call site to these helpers changes no history.
"""

from __future__ import annotations

from typing import Any, TypeVar

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from turnout.contracts import ActivityRef

InputT = TypeVar("InputT")
ResultT = TypeVar("ResultT")


async def execute(ref: ActivityRef[InputT, ResultT], arg: InputT,
                  **options: Any) -> ResultT:
    """Run the activity `ref` with `arg`; `options` as `workflow.execute_activity`'s."""
    result: ResultT = await workflow.execute_activity(
        ref, arg, result_type=ref.result_type, **options)
    return result


def start(ref: ActivityRef[InputT, ResultT], arg: InputT,
          **options: Any) -> workflow.ActivityHandle[ResultT]:
    """Start the activity `ref` (a handle to await or cancel)."""
    handle: workflow.ActivityHandle[ResultT] = workflow.start_activity(
        ref, arg, result_type=ref.result_type, **options)
    return handle


async def execute_local(ref: ActivityRef[InputT, ResultT], arg: InputT,
                        **options: Any) -> ResultT:
    """Run the activity `ref` as a local activity."""
    result: ResultT = await workflow.execute_local_activity(
        ref, arg, result_type=ref.result_type, **options)
    return result
