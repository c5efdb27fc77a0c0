"""A fresh store for tests that drive a gateway directly (no control plane)."""

from __future__ import annotations

from pathlib import Path

from turnout.domain import RegisterModelRequest
from turnout.store import Store, upgrade_async

# The model the gateway tests route: versions v1 and v2 of `tiny` / `default`.
TINY_MODEL = "tiny_default"


async def tiny_store(tmp_path: Path, *, aliases: tuple[str, ...] = (),
                     database_url: str | None = None) -> tuple[str, Store]:
    """(database URL, store) with the real migrations and versions v1 and v2 of
    `tiny_default` registered (model paths `/models/tiny-v1`, `/models/tiny-v2`): the empty
    database `database_url`, by default a SQLite file in `tmp_path`."""
    db_url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'turnout.db'}"
    await upgrade_async(db_url)
    store = Store.from_url(db_url)
    for version in ("v1", "v2"):
        await store.register_version(RegisterModelRequest(
            model=f"/models/tiny-{version}", model_arch="tiny", model_stage="default",
            version=version, aliases=list(aliases)))
    return db_url, store
