"""The store's fleet records with the real migrations, on SQLite and PostgreSQL: engine
hosts claimed by one worker at a time, and the holders that keep a version's engines
loaded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from turnout.domain import EngineInfo, EngineState
from turnout.fleet import EngineHost, Holder, HolderKind, HostCapacity
from turnout.store import HostClaimed, Store, upgrade_async

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]


@pytest_asyncio.fixture(loop_scope="session")
async def store(tmp_path: Path, new_database: Callable[[Path], str]) -> AsyncIterator[Store]:
    url = new_database(tmp_path)
    await upgrade_async(url)
    store = Store.from_url(url)
    yield store
    await store.close()


def a_host(instance: str, host_id: str = "gpu-1") -> EngineHost:
    return EngineHost(host_id=host_id, task_queue=f"turnout-engines-{host_id}",
                      instance_id=instance,
                      capacity=HostCapacity(memory_bytes=8 << 30, engine_extra_bytes=3 << 30,
                                            max_cached_models=2, port_start=8100,
                                            port_end=8109, cpu_count=2))


async def test_a_host_id_is_claimed_by_one_live_worker_at_a_time(store: Store) -> None:
    claimed = await store.claim_host(a_host("first"), live_after_s=30)
    assert claimed.capacity.ports == 10 and claimed.last_seen is not None
    with pytest.raises(HostClaimed, match="'gpu-1' is held by another live engine worker "
                                          r"\(instance first"):
        await store.claim_host(a_host("second"), live_after_s=30)
    # The same worker may claim again (a restart with the same instance id).
    await store.claim_host(a_host("first"), live_after_s=30)
    assert await store.heartbeat_host("gpu-1", "first")
    assert not await store.heartbeat_host("gpu-1", "second")
    # Once the first is silent for longer than the live window, a new worker takes over,
    # and the first one's heartbeats tell it so.
    await asyncio.sleep(0.3)
    await store.claim_host(a_host("second"), live_after_s=0.2)
    assert not await store.heartbeat_host("gpu-1", "first")
    [host] = await store.list_hosts()
    assert (host.host_id, host.instance_id, host.capacity.max_cached_models) == \
        ("gpu-1", "second", 2)


async def test_two_workers_racing_for_one_host_id_leave_one_owner(store: Store) -> None:
    results = await asyncio.gather(
        *(store.claim_host(a_host(f"w{i}", "race"), live_after_s=30) for i in range(4)),
        return_exceptions=True)
    [winner] = [r for r in results if isinstance(r, EngineHost)]
    assert [type(r) for r in results if r is not winner] == [HostClaimed] * 3
    [host] = [h for h in await store.list_hosts() if h.host_id == "race"]
    assert host.instance_id == winner.instance_id


async def test_holders_are_counted_per_version_and_released_one_by_one(store: Store) -> None:
    until = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
    await store.hold(Holder(model_id="m", version="v1", kind=HolderKind.SERVING,
                            holder_id="m"))
    await store.hold(Holder(model_id="m", version="v1", kind=HolderKind.SHADOW,
                            holder_id="shadow-m"))
    await store.hold(Holder(model_id="m", version="v2", kind=HolderKind.STANDBY,
                            holder_id="op-1", expires_at=until))
    # Holding again refreshes, it does not add.
    await store.hold(Holder(model_id="m", version="v2", kind=HolderKind.STANDBY,
                            holder_id="op-1", expires_at=until + timedelta(hours=1)))
    v2 = await store.holders(model_id="m", version="v2")
    assert [(h.kind, h.expires_at) for h in v2] == \
        [(HolderKind.STANDBY, until + timedelta(hours=1))]
    assert await store.release("m", "v1", HolderKind.SERVING) == 1
    assert [h.kind for h in await store.holders(model_id="m", version="v1")] == \
        [HolderKind.SHADOW]
    assert await store.release("m", "v1", HolderKind.SHADOW, "someone-else") == 0
    assert await store.release("m", "v1", HolderKind.SHADOW, "shadow-m") == 1
    assert await store.holders(model_id="m", version="v1") == []


async def test_engines_keep_their_memory_and_last_use(store: Store) -> None:
    used = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    await store.save_engine(EngineInfo(model_id="m", version="v1", host="gpu-1",
                                       url="http://127.0.0.1:8100", served_model_name="m:v1",
                                       state=EngineState.READY, memory_bytes=3 << 30,
                                       last_used_at=used))
    engine = await store.get_engine("m", "v1", "gpu-1")
    assert engine is not None
    assert (engine.memory_bytes, engine.last_used_at, engine.sleeping) == \
        (3 << 30, used, False)
