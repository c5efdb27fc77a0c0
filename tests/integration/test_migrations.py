"""The Alembic migrations on SQLite and PostgreSQL: a store of any earlier revision, with
data in it, upgrades to head and keeps its data; head downgrades to every revision and to
nothing; and head is exactly the schema the code maps (no drift between the migrations and
`turnout/store/schema.py`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from turnout.store import Store
from turnout.store.db import alembic_config, create_engine
from turnout.store.schema import Base

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]


def revisions(url: str) -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config(url))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


async def current_revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision())
    finally:
        await engine.dispose()


async def test_every_revision_upgrades_to_head_with_its_data_and_back(
        tmp_path: Path, new_database: Callable[[Path], str]) -> None:
    url = new_database(tmp_path)
    all_revisions = revisions(url)
    assert len(all_revisions) >= 6 and all_revisions[0] == "0001"
    for revision in all_revisions:
        await asyncio.to_thread(command.upgrade, alembic_config(url), revision)
        assert await current_revision(url) == revision
        # A model and its route written by a store of that revision.
        engine = create_engine(url)
        async with engine.begin() as connection:
            await connection.execute(text(
                "INSERT INTO models (model_id, model_arch, model_stage, live_version, "
                "created_at) VALUES (:m, 'A', :r, 'v1', CURRENT_TIMESTAMP)"),
                {"m": f"A_{revision}", "r": revision})
            await connection.execute(text(
                "INSERT INTO routes (model_id, generation, backends, change_key, updated_at) "
                "VALUES (:m, 3, '[]', 'k', CURRENT_TIMESTAMP)"), {"m": f"A_{revision}"})
        await engine.dispose()
        await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
        store = Store.from_url(url)
        try:
            model = await store.get_model(f"A_{revision}")
            route = await store.get_route(f"A_{revision}")
            assert model.live_version == "v1" and route is not None and route.generation == 3
        finally:
            await store.close()
        await asyncio.to_thread(command.downgrade, alembic_config(url), revision)
        assert await current_revision(url) == revision
    await asyncio.to_thread(command.downgrade, alembic_config(url), "base")
    assert await current_revision(url) is None
    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
    assert await current_revision(url) == all_revisions[-1]


async def test_head_is_the_schema_the_code_maps(tmp_path: Path,
                                                new_database: Callable[[Path], str]) -> None:
    url = new_database(tmp_path)
    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(lambda sync: compare_metadata(
                MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata))
    finally:
        await engine.dispose()
    assert diff == []
