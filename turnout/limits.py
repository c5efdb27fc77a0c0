"""Bounds on what a client may send: text lengths that match the store's columns, and the
size and nesting depth of the free-form JSON objects (`metadata`, `strategy_config`,
`engine_args`, ...).

One place for these numbers, so that the API contract (pydantic `max_length`), the store's
columns (`turnout/store/schema.py`) and the store's own cutting of text the system builds
itself (`fit`) agree. A request beyond a bound is a 422 naming the field, found before
anything is written or started.
"""

from __future__ import annotations

import json
from typing import Any

# Text columns of the store (String(n) in turnout/store/schema.py).
MODEL_ID_MAX = 300
VERSION_MAX = 128
ACTOR_MAX = 256  # requested_by, acknowledged_by, updated_by, audit actor
ALERT_TITLE_MAX = 300
ALERT_TYPE_MAX = 32
AUDIT_ACTION_MAX = 64
WORKFLOW_ID_MAX = 400
HOLDER_ID_MAX = 1024  # engine holders: operation and workflow ids
ENGINE_URL_MAX = 512  # external endpoints become an engine's url
SERVED_NAME_MAX = 512
# Text kept in JSON or Text columns, bounded all the same so one request cannot fill a
# table (or an audit row) with megabytes.
REASON_MAX = 2000
MODEL_SOURCE_MAX = 1024  # a model directory or hub id

# Engines of one version: one per engine host (see turnout.fleet).
MAX_REPLICAS = 64

# Free-form JSON objects of a request: at most this many bytes once serialized and this
# many levels of nesting (an object holding an object is depth 2).
MAX_JSON_BYTES = 16 * 1024
MAX_JSON_DEPTH = 8


class JSONTooLarge(ValueError):
    """A JSON value beyond `MAX_JSON_BYTES` or `MAX_JSON_DEPTH`."""


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a JSON-like value (a scalar is 0, `{}` is 1), counted without
    recursion and only as far as `limit + 1`: a hostile 100,000-level value is measured
    in constant stack and a few steps."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
    return deepest


def check_json_size(value: Any, *, max_bytes: int = MAX_JSON_BYTES,
                    max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`value` itself if it is within both bounds, else `JSONTooLarge` saying which.

    Depth first: serializing a very deep value would itself recurse without bound.
    """
    depth = json_depth(value, max_depth)
    if depth > max_depth:
        raise JSONTooLarge(f"nested more than {max_depth} levels deep")
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise JSONTooLarge(f"not serializable as JSON: {exc}") from None
    if size > max_bytes:
        raise JSONTooLarge(f"{size} bytes as JSON; at most {max_bytes}")
    return value


def bounded_json(value: Any) -> Any:
    """Pydantic after-validator: the default JSON bounds (a ValueError becomes a 422)."""
    return check_json_size(value)


def fit(text: str | None, limit: int) -> str | None:
    """`text` cut to at most `limit` characters, marked with an ellipsis when cut.

    For text the system builds itself into a bounded column (an alert title from a model
    id and a version, an actor name): a long one is shortened, never a failed write.
    """
    if text is None or len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + "…"
