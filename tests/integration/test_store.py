"""The store under concurrent writers, on a real SQLite file with the real migrations.

The API and the workflow's first activity both create an operation's record, and two
clients may register versions of a new model at the same moment: neither may fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from turnout.domain import OperationRecord, RegisterModelRequest, SwitchingStrategyType
from turnout.store import Store, upgrade_async
from turnout.store.repo import Conflict

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def stores(tmp_path: Path) -> AsyncIterator[list[Store]]:
    """Two stores on one database file: two processes' connection pools."""
    url = f"sqlite+aiosqlite:///{tmp_path}/turnout.db"
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
