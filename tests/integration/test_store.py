"""The store under concurrent writers, with the real migrations, on SQLite and PostgreSQL.

The API and the workflow's first activity both create an operation's record, and two
clients may register versions of a new model at the same moment: neither may fail.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.route_writers import add_replica
from turnout import contracts as c
from turnout.config import engine_task_queue
from turnout.domain import (
    Alert,
    AlertSeverity,
    AlertState,
    Backend,
    EngineInfo,
    EngineState,
    OperationRecord,
    RegisterModelRequest,
    Route,
    SwitchingStrategyType,
)
from turnout.fleet import EngineHost, Holder, HolderKind, HostCapacity
from turnout.store import Store, upgrade_async
from turnout.store.repo import Conflict

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]


@pytest_asyncio.fixture(loop_scope="session")
async def stores(tmp_path: Path, new_database: Callable[[Path], str]
                 ) -> AsyncIterator[list[Store]]:
    """Two stores on one database: two processes' connection pools."""
    url = new_database(tmp_path)
    await upgrade_async(url)
    pair = [Store.from_url(url), Store.from_url(url)]
    yield pair
    for store in pair:
        await store.close()


async def test_racing_creators_of_one_operation_both_succeed(stores: list[Store]) -> None:
    for i in range(30):
        record = OperationRecord(operation_id=f"op-{i}", workflow_id="switch-m_s",
                                 model_id="m_s", target_version="v1",
                                 strategy=SwitchingStrategyType.IMMEDIATE)
        await asyncio.gather(*(store.create_operation(record) for store in stores))
    listed = await stores[0].list_operations(model_id="m_s", limit=100)
    assert sorted(op.operation_id for op in listed) == sorted(f"op-{i}" for i in range(30))


async def test_racing_registrations_of_a_new_model_both_land(stores: list[Store]) -> None:
    for i in range(20):
        requests = [RegisterModelRequest(model=f"org/m{i}", model_arch=f"Arch{i}",
                                         model_stage="s", version=version)
                    for version in ("v1", "v2")]
        await asyncio.gather(*(store.register_version(request)
                               for store, request in zip(stores, requests, strict=True)))
        model = await stores[1].get_model(f"Arch{i}_s")
        assert sorted(v.version for v in model.versions) == ["v1", "v2"]


async def test_racing_registrations_of_one_version_give_one_conflict(
        stores: list[Store]) -> None:
    request = RegisterModelRequest(model="org/x", model_arch="Same", model_stage="s",
                                   version="v1")
    results = await asyncio.gather(*(store.register_version(request) for store in stores),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "VersionInfo"]
    assert any(isinstance(r, Conflict) for r in results)


async def test_a_retried_look_does_not_count_a_breach_twice(stores: list[Store]) -> None:
    store = stores[0]
    first, second = (datetime(2026, 11, 27, 10, 0, s, tzinfo=UTC) for s in (0, 30))
    alert = Alert(model_id="m_s", version="v2", type="error_rate", title="errors",
                  severity=AlertSeverity.WARNING)
    fired = await store.raise_alert(alert.model_copy(update={"last_seen": first}))
    retried = await store.raise_alert(alert.model_copy(update={"last_seen": first}))
    later = await store.raise_alert(alert.model_copy(update={
        "last_seen": second, "severity": AlertSeverity.CRITICAL}))
    assert fired.id == retried.id == later.id
    assert (fired.count, retried.count, later.count) == (1, 1, 2)
    assert later.severity is AlertSeverity.CRITICAL and later.first_seen == first
    assert later.last_seen == second
    resolved = await store.resolve_alert("m_s", "v2", "error_rate")
    assert resolved is not None and resolved.state is AlertState.RESOLVED
    assert await store.resolve_alert("m_s", "v2", "error_rate") is None
    # After recovery, a new breach is a new alert.
    again = await stores[1].raise_alert(alert)
    assert again.id != fired.id and again.count == 1


async def test_concurrent_route_writers_in_several_processes_lose_nothing(
        tmp_path: Path, stores: list[Store]) -> None:
    """Route writes from four processes at once: each gets a generation of its own, the
    generations run 1..N without a gap, and every change is in the final route (each one
    added a replica to what it found: a read-add-write that raced would lose some)."""
    url = stores[0].engine.url.render_as_string(hide_password=False)
    writers, count = 4, 25
    start = tmp_path / "start"
    processes = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.route_writers", url, "m_s", f"w{i}",
        str(count), str(start), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE) for i in range(writers)]
    await asyncio.sleep(1.0)  # every writer connected and waiting
    start.touch()
    generations: list[int] = []
    for process in processes:
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
        generations += json.loads(out)
    assert sorted(generations) == list(range(1, writers * count + 1))
    route = await stores[1].get_route("m_s")
    assert route is not None and route.generation == writers * count
    kept = sorted(r.url for r in route.backends[0].replicas)
    assert kept == sorted(f"http://w{w}-{i}" for w in range(writers) for i in range(count))


async def test_a_retried_route_write_is_not_applied_twice(stores: list[Store]) -> None:
    first = await stores[0].update_route("m_s", add_replica("a"), change_key="op/step-0")
    again = await stores[1].update_route("m_s", add_replica("a"), change_key="op/step-0")
    assert again.generation == first.generation and again.backends == first.backends
    refused = ValueError("refused")

    def refuse(current: Route | None) -> list[Backend]:
        raise refused

    with pytest.raises(ValueError, match="refused"):
        await stores[0].update_route("m_s", refuse, change_key="op/step-1")
    assert (await stores[0].get_route("m_s")) == first


async def test_the_longest_names_fit_every_column(stores: list[Store]) -> None:
    """The longest ids a registration allows (128-character halves of the model id, a
    128-character version), in every key the system builds from them: PostgreSQL enforces
    column lengths, and a key that does not fit fails its write after every retry."""
    store = stores[0]
    arch, stage, version = "A" * 128, "s" * 128, "v" * 128
    await store.register_version(RegisterModelRequest(
        model="org/x", model_arch=arch, model_stage=stage, version=version))
    model_id = f"{arch}_{stage}"
    host = "h" * 256
    await store.claim_host(EngineHost(host_id=host, task_queue=engine_task_queue(host),
                                      instance_id=uuid.uuid4().hex,
                                      capacity=HostCapacity(memory_bytes=1 << 30)),
                           live_after_s=30)
    await store.save_engine(EngineInfo(
        model_id=model_id, version=version, host=host, url="http://127.0.0.1:8100",
        served_model_name=f"{model_id}:{version}", state=EngineState.READY))
    for holder_id in (c.preload_workflow_id(model_id, version),
                      c.shadow_workflow_id(model_id), "0" * 64):
        await store.hold(Holder(model_id=model_id, version=version, kind=HolderKind.PRELOAD,
                                holder_id=holder_id))
    replace = c.replace_engine_workflow_id(model_id, version, host)
    run_id = str(uuid.uuid4())
    route = await store.write_route(model_id, [], change_key=f"{replace}/{run_id}/route")
    assert route.generation == 1
    await store.create_operation(OperationRecord(
        operation_id="o" * 64, workflow_id=f"switch-{model_id}", model_id=model_id,
        target_version=version, strategy=SwitchingStrategyType.CANARY,
        requested_by="r" * 256))
    alert = await store.raise_alert(Alert(
        model_id=model_id, version=version, type="rollout", severity=AlertSeverity.CRITICAL,
        title=f"{version} of {model_id} rolled back automatically", message="m" * 5000))
    assert len(alert.title) <= 300
    assert len(await store.holders(model_id=model_id)) == 3
