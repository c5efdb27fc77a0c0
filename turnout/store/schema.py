"""Tables of the store. The schema itself is created by the Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKeyConstraint, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from turnout.limits import HOLDER_ID_MAX


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class ModelRow(Base):
    __tablename__ = "models"

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    model_arch: Mapped[str] = mapped_column(String(128))
    model_stage: Mapped[str] = mapped_column(String(128))
    live_version: Mapped[str | None] = mapped_column(String(128))
    previous_version: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (ForeignKeyConstraint(["model_id"], ["models.model_id"], ondelete="CASCADE"),)

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    config: Mapped[dict[str, Any]]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Size of the weights, once an engine host has read it from the model's files.
    weights_bytes: Mapped[int | None] = mapped_column(BigInteger)


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (ForeignKeyConstraint(["model_id"], ["models.model_id"], ondelete="CASCADE"),)

    alias: Mapped[str] = mapped_column(String(256), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(300), index=True)


class RouteRow(Base):
    __tablename__ = "routes"

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    backends: Mapped[list[Any]]
    # A workflow id, run id and step: as long as those are (see migration 0007).
    change_key: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class EngineRow(Base):
    __tablename__ = "engines"

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(256), primary_key=True)
    url: Mapped[str] = mapped_column(String(512))
    served_model_name: Mapped[str] = mapped_column(String(512))
    port: Mapped[int | None]
    pid: Mapped[int | None]
    state: Mapped[str] = mapped_column(String(32))
    external: Mapped[bool] = mapped_column(default=False)
    log_path: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    # What the engine needs (its host's estimate when it loaded), when it last served
    # (for least-recently-used eviction) and whether it sleeps (vLLM sleep mode).
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    last_used_at: Mapped[datetime | None]
    sleeping: Mapped[bool] = mapped_column(default=False)


class OperationRow(Base):
    __tablename__ = "operations"

    operation_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(String(400))
    run_id: Mapped[str | None] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(300), index=True)
    target_version: Mapped[str] = mapped_column(String(128))
    strategy: Mapped[str] = mapped_column(String(32))
    strategy_config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(32), index=True)
    outcome: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str | None] = mapped_column(String(300), index=True)
    operation_id: Mapped[str | None] = mapped_column(String(64), index=True)
    details: Mapped[dict[str, Any]]


class GatewayRow(Base):
    __tablename__ = "gateways"

    gateway_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    admin_url: Mapped[str] = mapped_column(String(512))
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)


class RulesRow(Base):
    """A model's routing rules (`turnout.rules.RoutingRules`), replaced as a whole."""

    __tablename__ = "routing_rules"

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    rules: Mapped[list[Any]]
    updated_by: Mapped[str | None] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AlertRow(Base):
    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(300), index=True)
    version: Mapped[str | None] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(300))
    message: Mapped[str] = mapped_column(Text)
    figures: Mapped[dict[str, Any]]
    operation_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    count: Mapped[int] = mapped_column(Integer, default=1)
    acknowledged_by: Mapped[str | None] = mapped_column(String(256))
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ThresholdsRow(Base):
    """Monitoring threshold overrides (`PUT /health/thresholds`): only the keys an operator
    set, so a later change of a default in the settings still reaches the other keys.
    `model_id` "*" holds the overrides that apply to every model."""

    __tablename__ = "health_thresholds"

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    overrides: Mapped[dict[str, Any]]
    updated_by: Mapped[str | None] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class EngineResourcesRow(Base):
    """An engine host's latest measurement of one of its engines
    (`turnout.telemetry.health.EngineResources` as JSON); written only by that host."""

    __tablename__ = "engine_resources"

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(256), primary_key=True)
    figures: Mapped[dict[str, Any]]
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)


class HealthSnapshotRow(Base):
    """The monitor's latest look at a model (`turnout.telemetry.health.ModelHealth` as JSON)."""

    __tablename__ = "health_snapshots"

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    snapshot: Mapped[dict[str, Any]]
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)


class EngineHostRow(Base):
    """An engine host (`turnout.fleet.EngineHost`): its capacity, claimed by one live
    engine worker at a time (`instance_id`), with the heartbeat placement reads."""

    __tablename__ = "engine_hosts"

    host_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    task_queue: Mapped[str] = mapped_column(String(300))
    instance_id: Mapped[str] = mapped_column(String(64))
    capacity: Mapped[dict[str, Any]]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class EngineHolderRow(Base):
    """Why a version's engines stay loaded (`turnout.fleet.Holder`): an engine stops only
    when the last holder of its version has let go."""

    __tablename__ = "engine_holders"

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    # A switch's operation id, or a preload's or shadow's workflow id (up to ~400).
    holder_id: Mapped[str] = mapped_column(String(HOLDER_ID_MAX), primary_key=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime | None]
    since: Mapped[datetime] = mapped_column(default=utcnow)
