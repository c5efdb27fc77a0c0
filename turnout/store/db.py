"""Connecting to the store and bringing its schema up to date."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# The execution option that marks a write transaction (`writer(engine)`).
_WRITE = "turnout_write"


def writer(engine: AsyncEngine) -> AsyncEngine:
    """The same engine (and pool) for write transactions: on SQLite they start with
    `BEGIN IMMEDIATE`, taking the database's write lock before their first read, so a
    read-modify-write (a route's next generation, an alert's count) cannot interleave with
    another process's; a second writer waits (busy timeout) instead of failing when it
    tries to write on a stale snapshot. Reads keep plain `BEGIN` and never wait. On
    PostgreSQL rows are locked with `SELECT ... FOR UPDATE` where it matters."""
    return engine.execution_options(**{_WRITE: True})


def create_engine(database_url: str, *, timeout_s: float | None = None) -> AsyncEngine:
    """An async engine; SQLite gets WAL and a busy timeout since several processes share it.

    `timeout_s` bounds every wait for the database (connecting, a connection from the
    pool, a statement; SQLite's lock), for a caller that must answer in time (the API);
    by default workers wait as long as the drivers do (SQLite's lock: 30 s).
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        if timeout_s is None:
            return create_async_engine(url, pool_pre_ping=True)
        return create_async_engine(
            url, pool_pre_ping=True, pool_timeout=timeout_s,
            connect_args={"timeout": timeout_s, "command_timeout": timeout_s})
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    busy_s = 30.0 if timeout_s is None else timeout_s
    engine = create_async_engine(url, connect_args={"timeout": busy_s})

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # SQLAlchemy, not the driver, begins transactions (below): the driver's own
        # implicit BEGIN comes only before the first write, leaving the reads before it
        # outside the transaction.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL stays consistent and loses nothing when a process dies; only
        # an OS crash may drop the last commits. FULL would fsync on every small write
        # (a route, an operation event), which costs more than the write itself.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
        immediate = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached or used right now (refused or
    lost connection, a timeout, a locked or read-only SQLite file), as opposed to a fault
    of the statement or the data, which retrying cannot mend."""
    if isinstance(exc, OSError | sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True  # OSError: refused connections, TimeoutError (asyncpg's timeouts)
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


# The packages a store call's exception comes from when the database itself is at fault.
_DATABASE_CLIENTS = frozenset({"sqlalchemy", "asyncpg", "aiosqlite", "sqlite3"})


def is_store_outage(exc: BaseException) -> bool:
    """`is_unavailable`, raised by the database's client: a refused connection of an HTTP
    client (also an `OSError`) is another part's fault, which waiting for the store would
    not mend."""
    if not is_unavailable(exc):
        return False
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return True
    frame = exc.__traceback__
    while frame is not None:
        module = frame.tb_frame.f_globals.get("__name__", "")
        if module.partition(".")[0] in _DATABASE_CLIENTS:
            return True
        frame = frame.tb_next
    return False


def alembic_config(database_url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations up to `revision` (blocking)."""
    from alembic import command

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)


async def upgrade_async(database_url: str) -> None:
    await asyncio.to_thread(upgrade, database_url)
