"""Bounds on free-form JSON and text (`turnout.limits`)."""

from __future__ import annotations

import time

import pytest

from turnout.limits import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    JSONTooLarge,
    check_json_size,
    fit,
    json_depth,
)


def test_depth_is_measured_without_recursion() -> None:
    deep: object = 1
    for _ in range(200_000):  # far beyond Python's recursion limit
        deep = [deep]
    started = time.perf_counter()
    assert json_depth(deep) == MAX_JSON_DEPTH + 1  # stops counting past the bound
    assert time.perf_counter() - started < 0.05
    with pytest.raises(JSONTooLarge, match="levels deep"):
        check_json_size(deep)
    assert json_depth({"a": [1, {"b": 2}]}) == 3 and json_depth(5) == 0


def test_size_is_the_serialized_size() -> None:
    assert check_json_size({"a": "x" * (MAX_JSON_BYTES - 10)})
    with pytest.raises(JSONTooLarge, match="bytes"):
        check_json_size({"a": "x" * MAX_JSON_BYTES})
    with pytest.raises(JSONTooLarge, match="serializable"):
        check_json_size({"a": float("nan")})


def test_fit_cuts_with_a_mark() -> None:
    assert fit("short", 10) == "short" and fit(None, 3) is None
    cut = fit("x" * 400, 300)
    assert cut is not None and len(cut) == 300 and cut.endswith("…")
