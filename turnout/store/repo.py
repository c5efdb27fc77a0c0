"""The store: models and versions, routes with generations, engines, operations, audit log.

One `Store` per process. Methods are small transactions; callers never see SQLAlchemy
rows, only the domain models of `turnout.domain`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from turnout.domain import (
    Alert,
    AlertSeverity,
    AlertState,
    AuditEntry,
    Backend,
    EngineInfo,
    EngineState,
    GatewayInfo,
    ModelInfo,
    OmniModelConfig,
    OperationRecord,
    OperationStatus,
    Outcome,
    RegisterModelRequest,
    Route,
    SwitchingStrategyType,
    VersionInfo,
)
from turnout.limits import (
    ACTOR_MAX,
    ALERT_TITLE_MAX,
    ALERT_TYPE_MAX,
    AUDIT_ACTION_MAX,
    VERSION_MAX,
    WORKFLOW_ID_MAX,
    fit,
)
from turnout.rules import STORED as STORED_RULES
from turnout.rules import ModelRules, RoutingRules
from turnout.store.db import create_engine, writer
from turnout.store.fleet import FleetStore
from turnout.store.schema import (
    AlertRow,
    AliasRow,
    AuditRow,
    EngineResourcesRow,
    EngineRow,
    GatewayRow,
    HealthSnapshotRow,
    ModelRow,
    OperationRow,
    RouteRow,
    RulesRow,
    ThresholdsRow,
    VersionRow,
    utcnow,
)
from turnout.telemetry.health import EngineResources, ModelHealth


class StoreError(Exception):
    """Base of the store's own errors."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


# The key under which threshold overrides for every model are stored.
ALL_MODELS = "*"

# What a route change does to the current route (None: the model has none yet): the new
# backends. Pure and quick: it runs inside the write transaction, with the row locked.
RouteChange = Callable[[Route | None], Iterable[Backend]]
# Compare-and-set attempts of one route write before giving up (each waits for the lock,
# so more than one or two only happen where the lock does not hold: never, by design).
_ROUTE_WRITE_ATTEMPTS = 20


def _not_before(value: datetime | None, than: datetime) -> bool:
    aware = _aware(value)
    return aware is not None and aware >= than


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _utc(value: datetime) -> datetime:
    """`value` in UTC (naive means UTC), for comparing with stored times: SQLite keeps them
    without an offset, so an offset must be applied before comparing. Times too close to
    the ends of the calendar to shift are clamped."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return (datetime.min if value.year == datetime.min.year else datetime.max).replace(
            tzinfo=UTC)


class Store(FleetStore):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._session = async_sessionmaker(engine, expire_on_commit=False)
        self._write = async_sessionmaker(writer(engine), expire_on_commit=False)

    @classmethod
    def from_url(cls, database_url: str, *, timeout_s: float | None = None) -> Store:
        """A store on `database_url`; `timeout_s` bounds its waits (`create_engine`)."""
        return cls(create_engine(database_url, timeout_s=timeout_s))

    async def close(self) -> None:
        await self.engine.dispose()

    # ---------------------------------------------------------------- models and versions

    async def register_version(self, request: RegisterModelRequest) -> VersionInfo:
        """Create the model if new and add a version to it; a version is immutable once made."""
        try:
            return await self._register_version(request)
        except IntegrityError:
            # Another registration created the same model (or version, alias) between our
            # reads and our insert: once more, now seeing its rows (→ Conflict if it clashes).
            return await self._register_version(request)

    async def _register_version(self, request: RegisterModelRequest) -> VersionInfo:
        config = OmniModelConfig.model_validate(
            request.model_dump(include=set(OmniModelConfig.model_fields))
        )
        model_id = config.model_id
        async with self._write.begin() as session:
            if await session.get(ModelRow, model_id) is None:
                session.add(ModelRow(model_id=model_id, model_arch=config.model_arch,
                                     model_stage=config.model_stage))
                await session.flush()
            if await session.get(VersionRow, (model_id, request.version)) is not None:
                raise Conflict(f"version {request.version!r} of model {model_id!r} already exists")
            for alias in request.aliases:
                owner = await session.get(AliasRow, alias)
                if owner is not None and owner.model_id != model_id:
                    raise Conflict(f"alias {alias!r} already names model {owner.model_id!r}")
                if owner is None:
                    session.add(AliasRow(alias=alias, model_id=model_id))
            row = VersionRow(model_id=model_id, version=request.version,
                             config=config.model_dump(mode="json"),
                             metadata_=request.metadata, created_at=utcnow())
            session.add(row)
        return _version(row)

    async def get_model(self, model_id: str) -> ModelInfo:
        async with self._session() as session:
            row = await session.get(ModelRow, model_id)
            if row is None:
                raise NotFound(f"model {model_id!r} is not registered")
            return await self._model_info(session, row)

    async def list_models(self) -> list[ModelInfo]:
        async with self._session() as session:
            rows = (await session.scalars(select(ModelRow).order_by(ModelRow.model_id))).all()
            return [await self._model_info(session, row) for row in rows]

    async def live_versions(self) -> dict[str, str | None]:
        """Every model id with its live version (None before its first switch)."""
        async with self._session() as session:
            rows = await session.execute(select(ModelRow.model_id, ModelRow.live_version))
            return {model_id: live for model_id, live in rows.all()}

    async def live_version(self, model_id: str) -> str | None:
        """One model's live version (None before its first switch), in one query: the
        monitor asks every interval for every model. `NotFound` if not registered."""
        async with self._session() as session:
            row = await session.get(ModelRow, model_id)
            if row is None:
                raise NotFound(f"model {model_id!r} is not registered")
            return row.live_version

    async def get_version(self, model_id: str, version: str) -> VersionInfo:
        async with self._session() as session:
            row = await session.get(VersionRow, (model_id, version))
            if row is None:
                if await session.get(ModelRow, model_id) is None:
                    raise NotFound(f"model {model_id!r} is not registered")
                raise NotFound(f"version {version!r} of model {model_id!r} is not registered")
            return _version(row)

    async def resolve_model_name(self, name: str) -> str | None:
        """A model id for what a client sent as `model`: the id itself or an alias."""
        async with self._session() as session:
            if await session.get(ModelRow, name) is not None:
                return name
            alias = await session.get(AliasRow, name)
            return alias.model_id if alias else None

    async def aliases(self) -> dict[str, str]:
        async with self._session() as session:
            return {a.alias: a.model_id for a in (await session.scalars(select(AliasRow))).all()}

    async def set_live_version(self, model_id: str, version: str) -> None:
        """Mark `version` live; the one it replaces becomes the rollback target."""
        async with self._write.begin() as session:
            row = await session.get(ModelRow, model_id)
            if row is None:
                raise NotFound(f"model {model_id!r} is not registered")
            if row.live_version != version:
                row.previous_version = row.live_version
                row.live_version = version

    async def _model_info(self, session: Any, row: ModelRow) -> ModelInfo:
        versions = (await session.scalars(
            select(VersionRow).where(VersionRow.model_id == row.model_id)
            .order_by(VersionRow.created_at))).all()
        aliases = (await session.scalars(
            select(AliasRow.alias).where(AliasRow.model_id == row.model_id))).all()
        return ModelInfo(model_id=row.model_id, model_arch=row.model_arch,
                         model_stage=row.model_stage, live_version=row.live_version,
                         previous_version=row.previous_version, aliases=sorted(aliases),
                         versions=[_version(v) for v in versions],
                         created_at=_aware(row.created_at))

    # ---------------------------------------------------------------- routes

    async def get_route(self, model_id: str) -> Route | None:
        async with self._session() as session:
            row = await session.get(RouteRow, model_id)
            return _route(row) if row else None

    async def list_routes(self) -> list[Route]:
        async with self._session() as session:
            return [_route(r) for r in (await session.scalars(select(RouteRow))).all()]

    async def write_route(self, model_id: str, backends: Iterable[Backend],
                          change_key: str) -> Route:
        """Store a new desired route with the next generation (see `update_route`)."""
        backends = list(backends)
        return await self.update_route(model_id, lambda _current: backends, change_key)

    async def update_route(self, model_id: str, change: RouteChange,
                           change_key: str) -> Route:
        """Write the route `change(current route)` returns, with the next generation.

        Atomic: `change` sees the route as it is inside the write transaction (the row
        locked: `FOR UPDATE` on PostgreSQL, the write lock of `BEGIN IMMEDIATE` on
        SQLite), and the generation is raised by the database on the condition that it is
        still the one read (compare-and-set), so concurrent writers of one model, from any
        number of processes, each get a generation of their own and each change is made
        on top of the others (a traffic shift keeps the shadow a mirror change just set).

        Idempotent by `change_key`: writing again with the key of the current route returns
        it unchanged, so a retried traffic activity never bumps the generation twice.
        `change` may raise to refuse (nothing is written).
        """
        for _ in range(_ROUTE_WRITE_ATTEMPTS):
            try:
                route = await self._update_route(model_id, change, change_key)
            except IntegrityError:  # another writer inserted the model's first route
                continue
            if route is not None:
                return route
        raise StoreError(f"the route of {model_id} kept changing under "
                         f"{_ROUTE_WRITE_ATTEMPTS} attempts to write it")

    async def _update_route(self, model_id: str, change: RouteChange,
                            change_key: str) -> Route | None:
        """One attempt; None when another writer moved the generation meanwhile."""
        async with self._write.begin() as session:
            row = await session.get(RouteRow, model_id, with_for_update=True,
                                    populate_existing=True)
            current = _route(row) if row is not None else None
            if current is not None and current.change_key == change_key:
                return current
            backends = list(change(current))
            payload = [b.model_dump(mode="json") for b in backends]
            now = utcnow()
            if current is None:
                session.add(RouteRow(model_id=model_id, generation=1, backends=payload,
                                     change_key=change_key, updated_at=now))
                await session.flush()
                generation: int | None = 1
            else:
                generation = await session.scalar(
                    update(RouteRow)
                    .where(RouteRow.model_id == model_id,
                           RouteRow.generation == current.generation)
                    .values(generation=RouteRow.generation + 1, backends=payload,
                            change_key=change_key, updated_at=now)
                    .returning(RouteRow.generation)
                    .execution_options(synchronize_session=False))
            if generation is None:
                return None
        return Route(model_id=model_id, generation=generation, backends=backends,
                     change_key=change_key, updated_at=now)

    # ---------------------------------------------------------------- routing rules

    async def set_rules(self, model_id: str, rules: RoutingRules,
                        updated_by: str | None = None) -> ModelRules:
        """Replace a model's rules as a whole (an empty list removes them)."""
        updated_by = fit(updated_by, ACTOR_MAX)
        async with self._write.begin() as session:
            if await session.get(ModelRow, model_id) is None:
                raise NotFound(f"model {model_id!r} is not registered")
            row = await session.get(RulesRow, model_id, with_for_update=True)
            payload = [rule.model_dump(mode="json", exclude_none=True) for rule in rules.rules]
            if row is None:
                row = RulesRow(model_id=model_id, rules=payload, updated_by=updated_by,
                               updated_at=utcnow())
                session.add(row)
            else:
                row.rules, row.updated_by, row.updated_at = payload, updated_by, utcnow()
        return _rules(row)

    async def get_rules(self, model_id: str) -> ModelRules:
        async with self._session() as session:
            row = await session.get(RulesRow, model_id)
            if row is None:
                if await session.get(ModelRow, model_id) is None:
                    raise NotFound(f"model {model_id!r} is not registered")
                return ModelRules(model_id=model_id)
            return _rules(row)

    async def list_rules(self, model_id: str | None = None) -> dict[str, RoutingRules]:
        """Every model's non-empty rules (or one model's): what gateways reconcile."""
        query = select(RulesRow)
        if model_id is not None:
            query = query.where(RulesRow.model_id == model_id)
        async with self._session() as session:
            return {row.model_id: _rules(row)
                    for row in (await session.scalars(query)).all() if row.rules}

    # ---------------------------------------------------------------- engines

    async def save_engine(self, engine: EngineInfo) -> None:
        async with self._write.begin() as session:
            row = await session.get(EngineRow, (engine.model_id, engine.version, engine.host))
            values = engine.model_dump(exclude={"started_at"})
            values["state"] = engine.state.value
            if row is None:
                session.add(EngineRow(**values, started_at=engine.started_at or utcnow()))
            else:
                for key, value in values.items():
                    setattr(row, key, value)

    async def get_engine(self, model_id: str, version: str, host: str | None = None
                         ) -> EngineInfo | None:
        engines = await self.list_engines(model_id=model_id, version=version, host=host)
        return engines[0] if engines else None

    async def list_engines(self, *, model_id: str | None = None, version: str | None = None,
                           host: str | None = None) -> list[EngineInfo]:
        query = select(EngineRow)
        if model_id is not None:
            query = query.where(EngineRow.model_id == model_id)
        if version is not None:
            query = query.where(EngineRow.version == version)
        if host is not None:
            query = query.where(EngineRow.host == host)
        async with self._session() as session:
            return [_engine(r) for r in (await session.scalars(query)).all()]

    async def delete_engine(self, model_id: str, version: str, host: str) -> None:
        async with self._write.begin() as session:
            await session.execute(delete(EngineRow).where(
                EngineRow.model_id == model_id, EngineRow.version == version,
                EngineRow.host == host))

    async def save_engine_resources(
            self, host: str, measured: dict[tuple[str, str], EngineResources]) -> None:
        """Replace a host's measurements with these, keyed by (model_id, version): the
        rows of engines the host no longer measures go."""
        now = utcnow()
        async with self._write.begin() as session:
            rows = {(r.model_id, r.version): r for r in (await session.scalars(
                select(EngineResourcesRow).where(EngineResourcesRow.host == host))).all()}
            for key, row in rows.items():
                if key not in measured:
                    await session.delete(row)
            for (model_id, version), resources in measured.items():
                figures = resources.model_dump(mode="json")
                held = rows.get((model_id, version))
                if held is None:
                    session.add(EngineResourcesRow(model_id=model_id, version=version,
                                                   host=host, figures=figures,
                                                   measured_at=now))
                else:
                    held.figures, held.measured_at = figures, now

    async def engine_resources(self, model_id: str, since: datetime
                               ) -> dict[str, list[EngineResources]]:
        """Per version, the latest measurement of each of its engines taken since `since`
        (an older one is from a host that stopped measuring: left out, not trusted)."""
        query = select(EngineResourcesRow).where(EngineResourcesRow.model_id == model_id) \
            .order_by(EngineResourcesRow.version, EngineResourcesRow.host)
        found: dict[str, list[EngineResources]] = {}
        async with self._session() as session:
            for row in (await session.scalars(query)).all():
                # Compared here, not in SQL: SQLite keeps no time zone with the value.
                if (_aware(row.measured_at) or since) < since:
                    continue
                found.setdefault(row.version, []).append(
                    EngineResources.model_validate(row.figures))
        return found

    # ---------------------------------------------------------------- gateways

    async def heartbeat_gateway(self, gateway_id: str, admin_url: str) -> None:
        async with self._write.begin() as session:
            row = await session.get(GatewayRow, gateway_id)
            if row is None:
                session.add(GatewayRow(gateway_id=gateway_id, admin_url=admin_url,
                                       last_seen=utcnow()))
            else:
                row.admin_url = admin_url
                row.last_seen = utcnow()

    async def remove_gateway(self, gateway_id: str) -> None:
        async with self._write.begin() as session:
            await session.execute(delete(GatewayRow).where(GatewayRow.gateway_id == gateway_id))

    async def live_gateways(self, max_age_s: float) -> list[GatewayInfo]:
        since = utcnow() - timedelta(seconds=max_age_s)
        async with self._session() as session:
            rows = (await session.scalars(select(GatewayRow))).all()
            return [GatewayInfo(gateway_id=r.gateway_id, admin_url=r.admin_url,
                                last_seen=_aware(r.last_seen))
                    for r in rows if (_aware(r.last_seen) or since) >= since]

    # ---------------------------------------------------------------- operations

    async def create_operation(self, record: OperationRecord) -> None:
        """Insert once: the API and the workflow's first activity both create the record,
        in either order and sometimes at the same moment; the second one is a no-op."""
        try:
            async with self._write.begin() as session:
                if await session.get(OperationRow, record.operation_id) is not None:
                    return
                values = record.model_dump(mode="json", exclude={"created_at", "finished_at"})
                values["requested_by"] = fit(values["requested_by"], ACTOR_MAX)
                values["workflow_id"] = fit(values["workflow_id"], WORKFLOW_ID_MAX)
                session.add(OperationRow(**values, created_at=record.created_at or utcnow()))
        except IntegrityError:
            return

    async def set_operation_run(self, operation_id: str, run_id: str) -> None:
        async with self._write.begin() as session:
            await session.execute(update(OperationRow).where(
                OperationRow.operation_id == operation_id).values(run_id=run_id))

    async def finish_operation(self, operation_id: str, status: OperationStatus,
                               outcome: Outcome | None, reason: str | None) -> None:
        async with self._write.begin() as session:
            await session.execute(
                update(OperationRow).where(OperationRow.operation_id == operation_id)
                .values(status=status.value, outcome=outcome.value if outcome else None,
                        reason=reason, finished_at=utcnow()))

    async def set_operation_status(self, operation_id: str, status: OperationStatus) -> None:
        async with self._write.begin() as session:
            await session.execute(
                update(OperationRow).where(OperationRow.operation_id == operation_id,
                                           OperationRow.finished_at.is_(None))
                .values(status=status.value))

    async def get_operation(self, operation_id: str) -> OperationRecord:
        async with self._session() as session:
            row = await session.get(OperationRow, operation_id)
            if row is None:
                raise NotFound(f"operation {operation_id!r} does not exist")
            return _operation(row)

    async def list_operations(self, *, model_id: str | None = None,
                              status: OperationStatus | None = None,
                              limit: int = 100) -> list[OperationRecord]:
        query = select(OperationRow).order_by(OperationRow.created_at.desc()).limit(limit)
        if model_id is not None:
            query = query.where(OperationRow.model_id == model_id)
        if status is not None:
            query = query.where(OperationRow.status == status.value)
        async with self._session() as session:
            return [_operation(r) for r in (await session.scalars(query)).all()]

    # ---------------------------------------------------------------- audit

    async def audit(self, entry: AuditEntry) -> AuditEntry:
        async with self._write.begin() as session:
            row = AuditRow(actor=fit(entry.actor, ACTOR_MAX),
                           action=fit(entry.action, AUDIT_ACTION_MAX), model_id=entry.model_id,
                           operation_id=entry.operation_id, details=entry.details,
                           at=entry.at or utcnow())
            session.add(row)
            await session.flush()
            return _audit(row)

    async def has_audit(self, action: str, operation_id: str) -> bool:
        async with self._session() as session:
            found = await session.scalar(select(AuditRow.id).where(
                AuditRow.action == action, AuditRow.operation_id == operation_id).limit(1))
            return found is not None

    async def list_audit(self, *, model_id: str | None = None, operation_id: str | None = None,
                         actor: str | None = None, action: str | None = None,
                         since: datetime | None = None, before: int | None = None,
                         limit: int = 500) -> list[AuditEntry]:
        """Entries newest first. `before` is a cursor: only entries with a smaller id (pass
        the last id of a page to get the next one). `since` keeps entries at or after it."""
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if model_id is not None:
            query = query.where(AuditRow.model_id == model_id)
        if operation_id is not None:
            query = query.where(AuditRow.operation_id == operation_id)
        if actor is not None:
            query = query.where(AuditRow.actor == actor)
        if action is not None:
            query = query.where(AuditRow.action == action)
        if since is not None:
            query = query.where(AuditRow.at >= _utc(since))
        if before is not None:
            query = query.where(AuditRow.id < before)
        async with self._session() as session:
            return [_audit(r) for r in (await session.scalars(query)).all()]

    async def ping(self) -> None:
        """Raise unless the database answers a trivial query (readiness)."""
        async with self._session() as session:
            await session.execute(text("SELECT 1"))


    # ---------------------------------------------------------------- alerts

    async def raise_alert(self, alert: Alert) -> Alert:
        """Fire an alert, or refresh the one already firing for (model, version, type).

        `alert.last_seen`, when set, is the time of the look that saw the breach: a retried
        look (same time) refreshes the alert without counting the breach twice.
        """
        seen = alert.last_seen or utcnow()
        # Titles are built from a model id and a version (and more): cut, never refused.
        title = fit(alert.title, ALERT_TITLE_MAX) or ""
        alert = alert.model_copy(update={"version": fit(alert.version, VERSION_MAX),
                                         "type": fit(alert.type, ALERT_TYPE_MAX) or ""})
        async with self._write.begin() as session:
            # Locked (PostgreSQL) so that two looks at once count the breach twice, not once.
            row = await session.scalar(select(AlertRow).where(
                AlertRow.model_id == alert.model_id, AlertRow.version == alert.version,
                AlertRow.type == alert.type, AlertRow.state == AlertState.FIRING.value)
                .with_for_update())
            if row is None:
                row = AlertRow(model_id=alert.model_id, version=alert.version, type=alert.type,
                               severity=alert.severity.value, title=title,
                               message=alert.message, figures=alert.figures,
                               operation_id=alert.operation_id, state=AlertState.FIRING.value,
                               count=1, first_seen=seen, last_seen=seen)
                session.add(row)
            elif alert.last_seen is not None and _not_before(row.last_seen, seen):
                return _alert(row)  # this look was already counted (a retried activity)
            else:
                row.count += 1
                row.severity, row.title, row.message = (alert.severity.value, title,
                                                        alert.message)
                row.figures, row.operation_id = alert.figures, alert.operation_id
                row.last_seen = seen
            await session.flush()
            return _alert(row)

    async def list_alerts(self, *, model_id: str | None = None,
                          severity: AlertSeverity | None = None,
                          state: AlertState | None = None, since: datetime | None = None,
                          limit: int = 500) -> list[Alert]:
        query = select(AlertRow).order_by(AlertRow.last_seen.desc()).limit(limit)
        if model_id is not None:
            query = query.where(AlertRow.model_id == model_id)
        if severity is not None:
            query = query.where(AlertRow.severity == severity.value)
        if state is not None:
            query = query.where(AlertRow.state == state.value)
        if since is not None:
            query = query.where(AlertRow.last_seen >= _utc(since))
        async with self._session() as session:
            return [_alert(r) for r in (await session.scalars(query)).all()]

    async def resolve_alert(self, model_id: str, version: str | None,
                            alert_type: str) -> Alert | None:
        """Resolve the alert firing for (model, version, type); None if none fires."""
        async with self._write.begin() as session:
            row = await session.scalar(select(AlertRow).where(
                AlertRow.model_id == model_id, AlertRow.version == version,
                AlertRow.type == alert_type, AlertRow.state == AlertState.FIRING.value))
            if row is None:
                return None
            row.state, row.last_seen = AlertState.RESOLVED.value, utcnow()
            await session.flush()
            return _alert(row)

    async def acknowledge_alert(self, alert_id: int, by: str | None) -> Alert:
        async with self._write.begin() as session:
            row = await session.get(AlertRow, alert_id)
            if row is None:
                raise NotFound(f"alert {alert_id} does not exist")
            row.acknowledged_by = fit(by, ACTOR_MAX) or "operator"
            return _alert(row)


    # ---------------------------------------------------------------- health monitoring

    async def threshold_overrides(self, model_id: str | None = None) -> list[dict[str, Any]]:
        """The threshold keys operators set, in the order they apply: every model's, then
        `model_id`'s (when given). Layer them over the settings with
        `turnout.telemetry.health.applied_thresholds(settings, *overrides)`."""
        keys = [ALL_MODELS] if model_id is None else [ALL_MODELS, model_id]
        async with self._session() as session:
            rows = [await session.get(ThresholdsRow, key) for key in keys]
        return [dict(row.overrides) if row is not None else {} for row in rows]

    async def set_threshold_overrides(self, model_id: str | None, overrides: dict[str, Any],
                                      updated_by: str | None = None) -> dict[str, Any]:
        """Merge `overrides` into the keys already set for `model_id` (None: every model);
        returns them all."""
        key = ALL_MODELS if model_id is None else model_id
        updated_by = fit(updated_by, ACTOR_MAX)
        async with self._write.begin() as session:
            # Locked (PostgreSQL): two operators' changes of different keys both stay.
            row = await session.get(ThresholdsRow, key, with_for_update=True)
            if row is None:
                row = ThresholdsRow(model_id=key, overrides=dict(overrides),
                                    updated_by=updated_by, updated_at=utcnow())
                session.add(row)
            else:
                row.overrides = {**row.overrides, **overrides}
                row.updated_by, row.updated_at = updated_by, utcnow()
            return dict(row.overrides)

    async def save_health(self, health: ModelHealth) -> None:
        snapshot = health.model_dump(mode="json")
        async with self._write.begin() as session:
            row = await session.get(HealthSnapshotRow, health.model_id)
            if row is None:
                session.add(HealthSnapshotRow(model_id=health.model_id, snapshot=snapshot,
                                              checked_at=utcnow()))
            else:
                row.snapshot, row.checked_at = snapshot, utcnow()

    async def record_failed_look(self, model_id: str, reason: str, at: datetime,
                                 failed_looks: int) -> None:
        """Keep a failed look with the model's latest one (the figures stay as they were
        last seen; `ModelHealth.stale` then reads its versions as `unknown`)."""
        async with self._session.begin() as session:
            row = await session.get(HealthSnapshotRow, model_id)
            health = ModelHealth.model_validate(row.snapshot) if row is not None \
                else ModelHealth(model_id=model_id)
            health = health.model_copy(update={
                "last_failure": reason[:2000], "last_failure_at": at,
                "failed_looks": max(failed_looks, health.failed_looks)})
            snapshot = health.model_dump(mode="json")
            if row is None:
                session.add(HealthSnapshotRow(model_id=model_id, snapshot=snapshot,
                                              checked_at=utcnow()))
            else:
                row.snapshot = snapshot

    async def monitored_versions(self, model_id: str, live_version: str | None
                                 ) -> dict[str, str]:
        """The versions the monitor looks at, with their role: the live one, those the
        route sends traffic to (candidates of a rollout) or copies traffic to (a shadow),
        and those with a ready engine (cached)."""
        roles: dict[str, str] = {}
        if live_version:
            roles[live_version] = "live"
        route = await self.get_route(model_id)
        for backend in route.backends if route else []:
            roles.setdefault(backend.version, "shadow" if backend.is_shadow else "candidate")
        for engine in await self.list_engines(model_id=model_id):
            if engine.state is EngineState.READY:
                roles.setdefault(engine.version, "cached")
        return roles

    async def list_health(self, model_id: str | None = None) -> list[ModelHealth]:
        query = select(HealthSnapshotRow).order_by(HealthSnapshotRow.model_id)
        if model_id is not None:
            query = query.where(HealthSnapshotRow.model_id == model_id)
        async with self._session() as session:
            return [ModelHealth.model_validate(r.snapshot)
                    for r in (await session.scalars(query)).all()]


def _alert(row: AlertRow) -> Alert:
    return Alert(id=row.id, model_id=row.model_id, version=row.version, type=row.type,
                 severity=AlertSeverity(row.severity), title=row.title, message=row.message,
                 figures=row.figures or {}, operation_id=row.operation_id,
                 state=AlertState(row.state), count=row.count,
                 acknowledged_by=row.acknowledged_by, first_seen=_aware(row.first_seen),
                 last_seen=_aware(row.last_seen))


def _version(row: VersionRow) -> VersionInfo:
    return VersionInfo(model_id=row.model_id, version=row.version,
                       config=OmniModelConfig.model_validate(row.config),
                       metadata=row.metadata_ or {}, created_at=_aware(row.created_at))


def _route(row: RouteRow) -> Route:
    return Route(model_id=row.model_id, generation=row.generation,
                 backends=[Backend.model_validate(b) for b in row.backends],
                 change_key=row.change_key, updated_at=_aware(row.updated_at))


def _rules(row: RulesRow) -> ModelRules:
    # STORED: a rule saved under older checks is loaded (and disabled if it must be), not
    # refused, so it cannot stop gateways from reading every model's rules.
    return ModelRules.model_validate(
        {"model_id": row.model_id, "rules": row.rules, "updated_by": row.updated_by,
         "updated_at": _aware(row.updated_at)}, context=STORED_RULES)


def _engine(row: EngineRow) -> EngineInfo:
    return EngineInfo(model_id=row.model_id, version=row.version, host=row.host, url=row.url,
                      served_model_name=row.served_model_name, port=row.port, pid=row.pid,
                      state=EngineState(row.state), external=row.external,
                      log_path=row.log_path, started_at=_aware(row.started_at),
                      memory_bytes=row.memory_bytes, last_used_at=_aware(row.last_used_at),
                      sleeping=bool(row.sleeping))


def _operation(row: OperationRow) -> OperationRecord:
    return OperationRecord(
        operation_id=row.operation_id, workflow_id=row.workflow_id, run_id=row.run_id,
        model_id=row.model_id,
        target_version=row.target_version, strategy=SwitchingStrategyType(row.strategy),
        strategy_config=row.strategy_config or {}, status=OperationStatus(row.status),
        outcome=Outcome(row.outcome) if row.outcome else None, reason=row.reason,
        requested_by=row.requested_by, created_at=_aware(row.created_at),
        finished_at=_aware(row.finished_at))


def _audit(row: AuditRow) -> AuditEntry:
    return AuditEntry(id=row.id, at=_aware(row.at), actor=row.actor, action=row.action,
                      model_id=row.model_id, operation_id=row.operation_id,
                      details=row.details or {})


