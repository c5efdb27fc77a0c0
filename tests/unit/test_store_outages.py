"""Which failures are the store's: a switch waits those out and acts on every other."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from tests.support import free_port
from turnout.store import is_store_outage


def test_a_database_error_of_the_connection_is_an_outage() -> None:
    err = sa_exc.OperationalError("SELECT 1", {}, Exception("database is locked"))
    assert is_store_outage(err)


async def test_a_refused_database_connection_is_an_outage() -> None:
    with pytest.raises(OSError) as refused:
        await asyncpg.connect(host="127.0.0.1", port=free_port(), user="x", timeout=5)
    assert is_store_outage(refused.value)


def test_a_refused_connection_of_another_client_is_not() -> None:
    def connect_to_a_gateway() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(OSError) as refused:
        connect_to_a_gateway()
    assert not is_store_outage(refused.value)


def test_a_fault_of_the_statement_is_not() -> None:
    err = sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
    assert not is_store_outage(err)
