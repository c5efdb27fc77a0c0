"""Client keys of the data plane: what `Authorization` values are accepted."""

from __future__ import annotations

import time

import pytest

from gateway.auth import ClientKeys

KEY = "k3y-0123456789abcdef"
OTHER = "other-key-0123456789"


@pytest.mark.parametrize(("header", "accepted"), [
    (f"Bearer {KEY}", True),
    (f"bearer {KEY}", True),  # the scheme is case-insensitive (RFC 9110)
    (f"Bearer   {KEY}  ", True),
    (f"Bearer {OTHER}", True),
    (None, False),
    ("", False),
    (KEY, False),  # no scheme
    (f"Basic {KEY}", False),
    ("Bearer", False),
    ("Bearer ", False),
    (f"Bearer {KEY}x", False),
    (f"Bearer {KEY[:-1]}", False),
    ("Bearer k3y-ö123456789abcdef", False),  # non-ASCII: a wrong key, not an error
    ("Bearer \udcff\udcfe", False),  # bytes aiohttp could not decode (surrogateescape)
    ("Bearer \ud800", False),
    ("Bearer " + "x" * 100_000, False),
])
def test_keys_are_checked_and_anything_malformed_is_refused(header: str | None,
                                                           accepted: bool) -> None:
    assert ClientKeys([KEY, OTHER]).accepts(header) is accepted


def test_no_keys_accept_nothing_and_are_false() -> None:
    keys = ClientKeys([])
    assert not keys and not keys.accepts(f"Bearer {KEY}")
    assert ClientKeys([KEY])


def test_the_check_costs_the_same_with_many_keys() -> None:
    """One hash and a set lookup: a thousand keys cost what one does."""
    def cost(keys: ClientKeys) -> float:
        started = time.thread_time()
        for _ in range(20_000):
            keys.accepts(f"Bearer {OTHER}")
        return time.thread_time() - started

    one = ClientKeys([KEY])
    many = ClientKeys([f"{KEY}-{i}" for i in range(1000)])
    assert cost(many) < cost(one) * 2 + 0.01
