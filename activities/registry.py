"""Registry activities: what a switch reads from and writes to the store."""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from turnout import contracts as c
from turnout.domain import Alert, AuditEntry, OperationRecord, SwitchingStrategyType
from turnout.fleet import Holder, HolderKind
from turnout.store import NotFound, Store


class RegistryActivities:
    def __init__(self, store: Store) -> None:
        self.store = store

    @activity.defn(name=c.DESCRIBE_MODEL)
    async def describe_model(self, input: c.DescribeModelInput) -> c.ModelSnapshot:
        try:
            model = await self.store.get_model(input.model_id)
        except NotFound as exc:
            raise ApplicationError(str(exc), type=c.NOT_FOUND, non_retryable=True) from None
        target = model.version(input.target_version)
        route = await self.store.get_route(input.model_id)
        return c.ModelSnapshot(model_id=model.model_id, live_version=model.live_version,
                               target_exists=target is not None,
                               target_external=bool(target and target.config.endpoint),
                               serving_versions=sorted(route.weights()) if route else [])

    @activity.defn(name=c.MARK_LIVE)
    async def mark_live(self, input: c.MarkLiveInput) -> None:
        """Make the target live; its engines are now held by the route as the serving
        version, no longer by the switch, a standby window or a preload. (Idempotent.)"""
        replaced = await self.store.live_version(input.model_id)
        await self.store.set_live_version(input.model_id, input.version)
        # The replaced version keeps serving until the switch retires it (drained first).
        await self.store.release_serving_except(
            input.model_id, {input.version, replaced or input.version})
        await self.store.hold(Holder(model_id=input.model_id, version=input.version,
                                     kind=HolderKind.SERVING, holder_id=input.model_id))
        for kind in (HolderKind.SWITCH, HolderKind.STANDBY, HolderKind.PRELOAD):
            await self.store.release(input.model_id, input.version, kind)

    @activity.defn(name=c.RAISE_ALERT)
    async def raise_alert(self, alert: Alert) -> Alert:
        """Fire (or refresh) an alert; retries refresh the same one rather than adding."""
        stored = await self.store.raise_alert(alert)
        activity.logger.warning("alert %s on %s %s: %s", stored.severity.value, stored.model_id,
                                stored.version or "", stored.title)
        return stored

    @activity.defn(name=c.RESOLVE_ALERT)
    async def resolve_alert(self, input: c.ResolveAlertInput) -> Alert | None:
        """Resolve the alert firing for (model, version, type), if one is."""
        resolved = await self.store.resolve_alert(input.model_id, input.version, input.type)
        if resolved is not None:
            activity.logger.info("alert resolved on %s %s: %s", resolved.model_id,
                                 resolved.version or "", resolved.title)
        return resolved

    @activity.defn(name=c.RECORD_OPERATION)
    async def record_operation(self, input: c.RecordOperationInput) -> None:
        """Keep the operations table and the audit log in step with the workflow.

        Keyed by (operation, event): a retried call writes nothing twice.
        """
        await self.store.create_operation(OperationRecord(
            operation_id=input.operation_id, workflow_id=input.workflow_id,
            model_id=input.model_id, target_version=input.target_version,
            strategy=SwitchingStrategyType(input.strategy), strategy_config=input.strategy_config,
            status=input.status, requested_by=input.actor))
        if input.status.terminal:
            await self.store.finish_operation(input.operation_id, input.status, input.outcome,
                                              input.reason)
        else:
            await self.store.set_operation_status(input.operation_id, input.status)
        if not input.audit or await self.store.has_audit(input.event, input.operation_id):
            return
        details = dict(input.details, target_version=input.target_version,
                       strategy=input.strategy, status=input.status.value)
        if input.outcome:
            details["outcome"] = input.outcome.value
        if input.reason:
            details["reason"] = input.reason
        await self.store.audit(AuditEntry(actor=input.actor, action=input.event,
                                          model_id=input.model_id,
                                          operation_id=input.operation_id, details=details))
        activity.logger.info("operation %s: %s (%s)", input.operation_id, input.event,
                             input.status.value)



