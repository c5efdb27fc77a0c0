"""The gateway's request-body checks that need no server: JSON nesting depth."""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy import MAX_JSON_DEPTH, json_depth_exceeds


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


# Strings hold brackets (text, not nesting); lists run past the length from which they
# are scanned in C.
TEXT = st.text(st.sampled_from(list('[]{}"\\ ab:,é')), max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda inner: st.lists(inner, max_size=40) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=60)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.integers(min_value=0, max_value=8), st.booleans())
def test_depth_is_measured_exactly(value: Any, limit: int, ascii_only: bool) -> None:
    parsed = json.loads(json.dumps(value, ensure_ascii=ascii_only))
    assert json_depth_exceeds(parsed, limit) == (depth(value) > limit)


def test_the_limit_is_inclusive() -> None:
    at_limit: Any = []
    for _ in range(MAX_JSON_DEPTH - 1):
        at_limit = [at_limit]
    assert not json_depth_exceeds(at_limit, MAX_JSON_DEPTH)
    assert json_depth_exceeds([at_limit], MAX_JSON_DEPTH)
    assert json_depth_exceeds({"a": [1] * 100 + [[at_limit]]}, MAX_JSON_DEPTH)
    wide = {"messages": [{"role": "user", "content": [{"type": "text"}]}] * 500}
    assert not json_depth_exceeds(wide, MAX_JSON_DEPTH)


def test_the_check_costs_normal_bodies_a_small_share_of_parsing_them() -> None:
    """Its cost is the number of items in arrays and objects, not the bytes: a long chat,
    a base64 image, a token-id prompt all cost well under what parsing them did, and a
    small body a few microseconds (the gateway spends ~450 us of CPU per request)."""
    image = "data:image/png;base64," + "QUFB" * 250_000
    bodies = [
        {"model": "m", "prompt": "hi", "max_tokens": 64, "stream": True},
        {"model": "m", "messages": [{"role": "user", "content": "def f(x): [x]\n" * 100}] * 20},
        {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": image}}]}]},
        {"model": "m", "prompt": list(range(20_000))},
    ]
    for body in bodies:
        raw = json.dumps(body)
        parse = check = 0.0
        for _ in range(20):
            started = time.thread_time()
            parsed = json.loads(raw)
            parse += time.thread_time() - started
            started = time.thread_time()
            assert not json_depth_exceeds(parsed, MAX_JSON_DEPTH)
            check += time.thread_time() - started
        assert check < max(parse * 0.5, 20 * 20e-6), (raw[:40], check, parse)
