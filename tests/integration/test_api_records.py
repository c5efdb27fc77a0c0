"""`api.records`: what the API writes after an action took effect, on a real SQLite store
that another connection locks (the store not answering). The write comes back False at
once and is written in the background once the lock ends, once; a write that retrying
cannot mend is not retried; at shutdown what is left is cancelled. (Through the whole
stack on PostgreSQL: tests/e2e/test_chaos_orchestration.py.)"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import pytest_asyncio

from api import records
from turnout.domain import AuditEntry
from turnout.store import Store, upgrade_async

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def database(tmp_path: Path) -> AsyncIterator[tuple[Path, Store]]:
    path = tmp_path / "records.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade_async(url)
    store = Store.from_url(url, timeout_s=0.5)  # the API's store, with a short timeout
    yield path, store
    await store.close()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    connection = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        yield
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def entry(action: str = "switch_requested") -> AuditEntry:
    return AuditEntry(actor="alice", action=action, model_id="M_s", operation_id="op-1")


async def test_a_write_the_store_does_not_answer_is_written_once_it_does(
        database: tuple[Path, Store]) -> None:
    path, store = database
    with locked(path):
        began = time.monotonic()
        written = await records.record(store, partial(records.audit_once, store, entry()),
                                       "the entry")
        assert written is False
        assert time.monotonic() - began < 5  # about the store's 0.5-s timeout, not more
        assert await store.list_audit(operation_id="op-1") == []
    deadline = time.monotonic() + 10
    while not await store.list_audit(operation_id="op-1"):
        assert time.monotonic() < deadline, "the entry was never written"
        await asyncio.sleep(0.1)
    await records.finish(store, 5)  # nothing left: it returns at once
    [written_entry] = await store.list_audit(operation_id="op-1")
    assert (written_entry.actor, written_entry.action) == ("alice", "switch_requested")


async def test_a_retry_writes_an_entry_once(database: tuple[Path, Store]) -> None:
    _, store = database
    await store.audit(entry())  # an earlier try that committed, then did not answer
    await records.audit_once(store, entry(), True)
    assert len(await store.list_audit(operation_id="op-1")) == 1


async def test_a_fault_retrying_cannot_mend_is_not_retried(
        database: tuple[Path, Store]) -> None:
    _, store = database
    calls = []

    async def broken(again: bool) -> None:
        calls.append(again)
        raise ValueError("not the store's fault")

    assert await records.record(store, broken, "a broken write") is False
    assert calls == [False]
    assert [task for task, owner in records._retrying.items() if owner is store] == []


async def test_at_shutdown_what_is_left_is_cancelled(database: tuple[Path, Store]) -> None:
    path, store = database
    with locked(path):
        assert await records.record(store, partial(records.audit_once, store, entry()),
                                    "the entry") is False
        [task] = [task for task, owner in records._retrying.items() if owner is store]
        await records.finish(store, 0.2)
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()
    assert [task for task, owner in records._retrying.items() if owner is store] == []
    assert await store.list_audit(operation_id="op-1") == []
