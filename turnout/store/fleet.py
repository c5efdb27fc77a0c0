"""The store's record of the engine fleet: hosts and the holders of each version's engines.

A part of `Store` (it inherits these methods); kept apart so the fleet's records read in
one place. Engines themselves stay in `repo.py` beside the other engine calls.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from turnout.domain import EngineState
from turnout.fleet import EngineHost, FleetState, Holder, HolderKind, HostCapacity
from turnout.replicas import EngineReplica
from turnout.store.schema import (
    EngineHolderRow,
    EngineHostRow,
    EngineResourcesRow,
    EngineRow,
    VersionRow,
    utcnow,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from turnout.store.repo import Store


class HostClaimed(Exception):
    """Another live engine worker holds this host id."""

    def __init__(self, host_id: str, instance_id: str, last_seen: datetime) -> None:
        self.host_id = host_id
        super().__init__(
            f"engine host id {host_id!r} is held by another live engine worker (instance "
            f"{instance_id}, last seen {last_seen:%Y-%m-%d %H:%M:%S} UTC): give this worker "
            f"its own VLLM_MODEL_SWITCHING_ENGINE_HOST, or stop the other one")


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class FleetStore:
    _session: async_sessionmaker[AsyncSession]  # reads
    _write: async_sessionmaker[AsyncSession]  # write transactions (`turnout.store.db.writer`)

    # ---------------------------------------------------------------- hosts

    async def claim_host(self, host: EngineHost, *, live_after_s: float) -> EngineHost:
        """Record `host` as run by `host.instance_id`; refuse (`HostClaimed`) while another
        instance's heartbeat is younger than `live_after_s`."""
        try:
            return await self._claim_host(host, live_after_s)
        except IntegrityError:  # another worker inserted the row between our read and write
            return await self._claim_host(host, live_after_s)

    async def _claim_host(self, host: EngineHost, live_after_s: float) -> EngineHost:
        now = utcnow()
        async with self._write.begin() as session:
            row = await session.get(EngineHostRow, host.host_id, with_for_update=True)
            if row is not None and row.instance_id != host.instance_id and \
                    _aware(row.last_seen) > now - timedelta(seconds=live_after_s):
                raise HostClaimed(row.host_id, row.instance_id, _aware(row.last_seen))
            capacity = host.capacity.model_dump(mode="json")
            if row is None:
                row = EngineHostRow(host_id=host.host_id, task_queue=host.task_queue,
                                    instance_id=host.instance_id, capacity=capacity,
                                    started_at=now, last_seen=now)
                session.add(row)
            else:
                row.task_queue, row.instance_id, row.capacity = \
                    host.task_queue, host.instance_id, capacity
                row.started_at, row.last_seen = now, now
        return _host(row)

    async def heartbeat_host(self, host_id: str, instance_id: str) -> bool:
        """Refresh the host's heartbeat; False when another instance has claimed it since."""
        async with self._write.begin() as session:
            row = await session.get(EngineHostRow, host_id)
            if row is None or row.instance_id != instance_id:
                return False
            row.last_seen = utcnow()
            return True

    async def list_hosts(self) -> list[EngineHost]:
        async with self._session() as session:
            rows = (await session.scalars(select(EngineHostRow)
                                          .order_by(EngineHostRow.host_id))).all()
            return [_host(row) for row in rows]

    # ---------------------------------------------------------------- holders

    async def hold(self, holder: Holder) -> Holder:
        """Add a holder of a version's engines (again: refreshes priority and expiry)."""
        async with self._write.begin() as session:
            key = (holder.model_id, holder.version, holder.kind.value, holder.holder_id)
            row = await session.get(EngineHolderRow, key)
            if row is None:
                row = EngineHolderRow(model_id=holder.model_id, version=holder.version,
                                      kind=holder.kind.value, holder_id=holder.holder_id,
                                      priority=holder.priority, expires_at=holder.expires_at,
                                      since=holder.since or utcnow())
                session.add(row)
            else:
                row.priority, row.expires_at = holder.priority, holder.expires_at
        return _holder(row)

    async def release(self, model_id: str, version: str, kind: HolderKind,
                      holder_id: str | None = None) -> int:
        """Drop a holder (every holder of that kind when `holder_id` is None); how many went."""
        query = delete(EngineHolderRow).where(
            EngineHolderRow.model_id == model_id, EngineHolderRow.version == version,
            EngineHolderRow.kind == kind.value)
        if holder_id is not None:
            query = query.where(EngineHolderRow.holder_id == holder_id)
        async with self._write.begin() as session:
            return (await session.execute(query)).rowcount or 0  # type: ignore[attr-defined]

    async def release_serving_except(self, model_id: str, keep: set[str]) -> None:
        """Only the live version serves (and the one it replaces, until it is retired):
        a serving holder of any other version is a leftover, and would keep it forever."""
        async with self._write.begin() as session:
            await session.execute(delete(EngineHolderRow).where(
                EngineHolderRow.model_id == model_id,
                EngineHolderRow.kind == HolderKind.SERVING.value,
                EngineHolderRow.version.not_in(keep)))

    async def holders(self, *, model_id: str | None = None,
                      version: str | None = None) -> list[Holder]:
        query = select(EngineHolderRow)
        if model_id is not None:
            query = query.where(EngineHolderRow.model_id == model_id)
        if version is not None:
            query = query.where(EngineHolderRow.version == version)
        async with self._session() as session:
            rows = (await session.scalars(query.order_by(
                EngineHolderRow.model_id, EngineHolderRow.version, EngineHolderRow.since))).all()
            return [_holder(row) for row in rows]


    async def mark_engines_used(self, model_id: str, version: str) -> None:
        """The version served until now: its engines are the most recently used cached."""
        async with self._write.begin() as session:
            await session.execute(update(EngineRow).where(
                EngineRow.model_id == model_id, EngineRow.version == version)
                .values(last_used_at=utcnow()))

    # ---------------------------------------------------------------- sizes

    async def set_weights_bytes(self, model_id: str, version: str, size: int) -> None:
        """Record the size of a version's weights, as an engine host read it from the files."""
        async with self._write.begin() as session:
            row = await session.get(VersionRow, (model_id, version))
            if row is not None and row.weights_bytes != size:
                row.weights_bytes = size

    async def weights_sizes(self) -> dict[tuple[str, str], int]:
        async with self._session() as session:
            rows = await session.execute(select(VersionRow.model_id, VersionRow.version,
                                                VersionRow.weights_bytes)
                                         .where(VersionRow.weights_bytes.is_not(None)))
            return {(m, v): int(size or 0) for m, v, size in rows.all()}

    async def measured_memory(self) -> dict[tuple[str, str, str], int]:
        """The resident memory each host last measured of each of its engines, in bytes."""
        async with self._session() as session:
            rows = (await session.scalars(select(EngineResourcesRow))).all()
            return {(r.model_id, r.version, r.host): int(r.figures["memory_mb"] * 2**20)
                    for r in rows if r.figures.get("memory_mb") is not None}

    # ---------------------------------------------------------------- replicas

    async def engine_replicas(self, *, model_id: str | None = None) -> list[EngineReplica]:
        """Every engine (or one model's) with its state and its host's last heartbeat, in
        one query: what each gateway's reconcile loop judges replicas by."""
        query = select(EngineRow.model_id, EngineRow.version, EngineRow.host, EngineRow.url,
                       EngineRow.state, EngineHostRow.last_seen).outerjoin(
            EngineHostRow, EngineHostRow.host_id == EngineRow.host)
        if model_id is not None:
            query = query.where(EngineRow.model_id == model_id)
        async with self._session() as session:
            rows = (await session.execute(query)).all()
        return [EngineReplica(model_id=m, version=v, host=h, url=url, state=EngineState(state),
                              host_last_seen=_aware(seen) if seen is not None else None)
                for m, v, h, url, state, seen in rows]


async def read_fleet(store: Store) -> FleetState:
    """The fleet as the store holds it now (a few reads, no transaction: placement checks
    again on the host, where it loads)."""
    routes = await store.list_routes()
    serving = {r.model_id: {v for v, w in r.weights().items() if w > 0} for r in routes}
    for model_id, live in (await store.live_versions()).items():
        if live is not None:
            serving.setdefault(model_id, set()).add(live)
    shadows = {r.model_id: shadow.version for r in routes if (shadow := r.shadow())}
    return FleetState(hosts=await store.list_hosts(), engines=await store.list_engines(),
                      holders=await store.holders(), serving=serving, shadows=shadows,
                      weights=await store.weights_sizes(),
                      measured=await store.measured_memory())


def _host(row: EngineHostRow) -> EngineHost:
    return EngineHost(host_id=row.host_id, task_queue=row.task_queue,
                      instance_id=row.instance_id,
                      capacity=HostCapacity.model_validate(row.capacity),
                      started_at=_aware(row.started_at), last_seen=_aware(row.last_seen))


def _holder(row: EngineHolderRow) -> Holder:
    return Holder(model_id=row.model_id, version=row.version, kind=HolderKind(row.kind),
                  holder_id=row.holder_id, priority=row.priority,
                  expires_at=_aware(row.expires_at) if row.expires_at else None,
                  since=_aware(row.since))
