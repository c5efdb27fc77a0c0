"""StandbyWorkflow: the version a switch replaced stays loaded for a while, then goes.

Started by the switch (and outliving it) when it retires the old live version: until the
window ends, an emergency rollback or any switch back to that version finds its engines
loaded and only changes the route. When the window ends the standby lets go; the engines
stop unless something else holds them by then (the version was switched back to, say).
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from turnout import contracts as c
    from turnout.fleet import HolderKind
    from workflows import fleet


@workflow.defn(name=c.STANDBY_WORKFLOW)
class StandbyWorkflow:
    @workflow.run
    async def run(self, input: c.StandbyInput) -> None:
        until = input.until or workflow.now()
        workflow.set_current_details(
            f"`{input.version}` of `{input.model_id}` stands by until {until:%H:%M:%S} UTC: "
            f"a rollback to it is a route change, not a cold start")
        wait = until - workflow.now()
        if wait.total_seconds() > 0:
            await workflow.sleep(wait, summary=f"{input.version} stands by until "
                                               f"{until:%H:%M:%S} UTC")
        await fleet.release_version(input.model_id, input.version, HolderKind.STANDBY,
                                    input.holder_id)
        workflow.set_current_details(f"standby of `{input.version}` ended: released")
