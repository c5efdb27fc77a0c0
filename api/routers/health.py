"""Health of every model's versions (`GET /health/models`) and the monitor's thresholds.

The figures come from the monitor (a workflow per model that looks at every live and
candidate version each interval and writes its latest look to the store); this router only
reads them, so it never calls a gateway or an engine itself.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, create_model
from pydantic.fields import FieldInfo

from api.auth import Operator, Viewer, check_role
from api.deps import SettingsDep, StoreDep
from api.errors import ERROR_RESPONSES, FieldErrors
from api.params import ModelIdPath
from turnout import contracts as c
from turnout.auth import thresholds_role
from turnout.config import ModelSwitchingConfig
from turnout.domain import MODEL_ID_PATTERN, AuditEntry, ModelInfo
from turnout.limits import ACTOR_MAX
from turnout.store import Store
from turnout.telemetry.health import (
    LOOK_SLACK_S,
    ModelHealth,
    MonitorThresholds,
    VersionHealth,
    VersionState,
    applied_thresholds,
)

router = APIRouter(prefix="/health", tags=["health"], responses=ERROR_RESPONSES)

class HealthReport(BaseModel):
    monitoring_enabled: bool
    interval_s: float
    models: list[ModelHealth]


def _bounded(field: FieldInfo) -> Any:
    """A field's type with its bounds (`gt`, `le`, ...), to make it optional and keep them.
    Numbers are strict: `true` or `"5"` is not a level."""
    strict = [Strict()] if field.annotation in (int, float) else []
    if not field.metadata and not strict:
        return field.annotation
    return Annotated[(field.annotation, *field.metadata, *strict)]  # type: ignore[valid-type]


ThresholdsUpdate: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "ThresholdsUpdate",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Levels to change (the others keep their value), for one model or, without "
            "`model_id`, for every model.",
    model_id=(str | None, Field(None, pattern=MODEL_ID_PATTERN)),
    requested_by=(str | None, Field(None, max_length=ACTOR_MAX,
                                    description="A free note for the audit log")),
    # Each level keeps its bounds (documented in the schema, checked before anything
    # is changed); None or absent leaves it as it is.
    **{name: (_bounded(field) | None, Field(None, description=field.description))
       for name, field in MonitorThresholds.model_fields.items()},
)


async def thresholds_for(store: Store, settings: ModelSwitchingConfig,
                         model_id: str | None) -> MonitorThresholds:
    return applied_thresholds(settings, *await store.threshold_overrides(model_id))


async def _model_health(store: Store, settings: ModelSwitchingConfig,
                        model_id: str) -> ModelHealth:
    """The monitor's latest look as it stands now (`ModelHealth.stale`: its versions are
    `unknown` when its looks fail or stopped); before its first look, the versions it is
    about to look at, `no_data`, with when it looks."""
    model = await store.get_model(model_id)
    thresholds = await thresholds_for(store, settings, model_id)
    snapshots = await store.list_health(model_id)
    now = datetime.now(UTC)
    interval = settings.monitoring_interval_s
    latest = snapshots[0] if snapshots else None
    if latest is not None and latest.checked_at is not None:
        health = latest.model_copy(update={"thresholds": thresholds,
                                           "versions": _with_registered(latest, model)})
        return health.stale(now, interval) if settings.enable_health_monitoring else health
    roles = await store.monitored_versions(model_id, model.live_version)
    looked = "monitoring is switched off" if not settings.enable_health_monitoring \
        else "not looked at yet"
    versions = [VersionHealth.model_validate({"version": version, "role": role,
                                              "reason": looked})
                for version, role in roles.items()]
    versions += [VersionHealth(version=v.version, role="registered", reason=_IDLE)
                 for v in model.versions if v.version not in roles]
    # A new model's monitor starts within a keeper period of its registration and looks
    # at once.
    due = (model.created_at or now) + timedelta(seconds=c.MONITOR_KEEPER_PERIOD_S)
    next_look = max(now, due) if settings.enable_health_monitoring else None
    health = ModelHealth(model_id=model_id, live_version=model.live_version,
                         versions=versions, thresholds=thresholds, interval_s=interval,
                         next_look_at=next_look)
    if latest is not None:  # only failed looks so far
        health = health.model_copy(update={
            "failed_looks": latest.failed_looks, "last_failure": latest.last_failure,
            "last_failure_at": latest.last_failure_at})
        return health.stale(now, interval)
    if next_look is not None and (now - due).total_seconds() > 2 * interval + LOOK_SLACK_S:
        return health.model_copy(update={"versions": [
            v.model_copy(update={"state": VersionState.UNKNOWN,
                                 "reason": "no look yet: the monitor is not looking"})
            for v in versions]})
    return health


_IDLE = "neither live, nor served, nor loaded: nothing to measure"


def _with_registered(health: ModelHealth, model: ModelInfo) -> list[VersionHealth]:
    """The look's versions, then every other registered version (`no_data`)."""
    looked = {v.version for v in health.versions}
    return [*health.versions, *(VersionHealth(version=v.version, role="registered",
                                              reason=_IDLE)
                                for v in model.versions if v.version not in looked)]


@router.get("/models", response_model=HealthReport)
async def health_of_models(principal: Viewer, store: StoreDep,
                           settings: SettingsDep) -> HealthReport:
    """Each model's live and candidate versions with their figures over the monitor's last
    interval, their state (healthy / degraded / unhealthy / no_data), the levels crossed
    and the thresholds applied."""
    models = [await _model_health(store, settings, m.model_id)
              for m in await store.list_models()]
    return HealthReport(monitoring_enabled=settings.enable_health_monitoring,
                        interval_s=settings.monitoring_interval_s, models=models)


@router.get("/models/{model_id}", response_model=ModelHealth)
async def health_of_model(model_id: ModelIdPath, principal: Viewer, store: StoreDep,
                          settings: SettingsDep) -> ModelHealth:
    return await _model_health(store, settings, model_id)


@router.get("/thresholds", response_model=MonitorThresholds)
async def get_thresholds(principal: Viewer, store: StoreDep, settings: SettingsDep,
                         model_id: str | None = Query(None, max_length=300)
                         ) -> MonitorThresholds:
    """The levels applied to `model_id` (or to every model without overrides of its own)."""
    if model_id is not None:
        await store.get_model(model_id)
    return await thresholds_for(store, settings, model_id)


@router.put("/thresholds", response_model=MonitorThresholds,
            openapi_extra={"x-turnout-role": "operator with model_id, admin without"})
async def put_thresholds(request: Request, body: ThresholdsUpdate,  # type: ignore[valid-type]
                         principal: Operator, store: StoreDep,
                         settings: SettingsDep) -> MonitorThresholds:
    """Change some levels (the guide's `health_monitor.update_thresholds`). The result must
    hold together: a warning level above its critical level is a 422 naming the warning
    field, and nothing is changed. Returns the levels now applied.

    One model's levels (with `model_id`) need role `operator`; every model's (without)
    need `admin`."""
    fields: dict[str, Any] = body.model_dump(exclude_unset=True)  # type: ignore[attr-defined]
    model_id = fields.pop("model_id", None)
    await check_role(request, principal, thresholds_role(model_id))
    requested_by = fields.pop("requested_by", None)
    changes = {k: v for k, v in fields.items() if v is not None}
    if model_id is not None:
        await store.get_model(model_id)
    current = await thresholds_for(store, settings, model_id)
    try:
        applied = current.updated(changes)
    except ValidationError as exc:
        raise FieldErrors(_field_errors(exc, current, changes)) from None
    await store.set_threshold_overrides(model_id, changes, principal.name)
    await store.audit(AuditEntry(actor=principal.name, action="thresholds_updated",
                                 model_id=model_id,
                                 details={"changes": changes, "requested_by": requested_by}))
    return applied


def _field_errors(exc: ValidationError, current: MonitorThresholds,
                  changes: dict[str, Any]) -> list[dict[str, Any]]:
    """Pydantic's errors with `body.<field>` locations; a warning/critical conflict names
    the warning field (the model-level check has no location of its own)."""
    errors = [{"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
              for err in exc.errors() if err["loc"]]
    if not errors:
        merged = MonitorThresholds.model_construct(**{**current.model_dump(), **changes})
        errors = [{"loc": ["body", name], "msg": message, "type": "value_error"}
                  for name, message in merged.level_conflicts()]
    return errors
