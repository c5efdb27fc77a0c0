"""The `plane` fixture: one real control plane per test module (see `plane.py`)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.plane import ControlPlane, control_plane
from turnout.store import Store, upgrade


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory,
                new_database: Callable[[Path], str]) -> AsyncIterator[ControlPlane]:
    # Default analysis settings: the fakes answer in about a millisecond, in the test's own
    # event loop beside the gateway, workers and API, and that scheduling noise is not
    # "slower by more than the tolerance" (see turnout/telemetry/verdicts.py).
    root = tmp_path_factory.mktemp("plane")
    async with control_plane(root, database_url=new_database(root)) as plane:
        yield plane


@pytest_asyncio.fixture(loop_scope="session")
async def engine_store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh SQLite store for tests that drive `EngineActivities` directly; no engine is
    left running afterwards, whatever the test did."""
    from activities.engines import is_engine_process

    url = f"sqlite+aiosqlite:///{tmp_path / 'turnout.db'}"
    await asyncio.to_thread(upgrade, url)
    store = Store.from_url(url)
    yield store
    for engine in await store.list_engines():
        if engine.pid and is_engine_process(engine.pid, engine.port):
            os.killpg(engine.pid, signal.SIGKILL)
    await store.close()
