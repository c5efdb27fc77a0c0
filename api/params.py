"""Bounds of path and query parameters the routers share (the store's column sizes)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BeforeValidator

from turnout.limits import MODEL_ID_MAX, VERSION_MAX

# A model id is `{model_arch}_{model_stage}`, stored in 300 characters.
ModelIdPath = Annotated[str, Path(min_length=1, max_length=MODEL_ID_MAX)]
VersionPath = Annotated[str, Path(min_length=1, max_length=VERSION_MAX)]
# Operation ids are 32 hex digits; 64 is the column.
OperationIdPath = Annotated[str, Path(min_length=1, max_length=64)]
# Row ids are SQL integers: beyond 2**63 - 1 a database cannot even compare them.
MAX_ROW_ID = 2**63 - 1

# RFC 3339 (the `date-time` of OpenAPI): date, `T`, time and an offset (`Z` or `+01:00`).
# A time without an offset would be read in some zone or other; a bare number would be
# taken for a Unix time: both are refused.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: Any) -> Any:
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 date-time with an offset, e.g. "
                         "2025-01-31T12:00:00Z")
    return value


DateTimeQuery = Annotated[datetime, BeforeValidator(_rfc3339)]


def single_query_values(request: Request) -> None:
    """Every query parameter of this API takes one value: a repeated one (`?limit=1&limit=2`)
    is a 422 naming it, not silently the last of them."""
    keys = [key for key, _ in request.query_params.multi_items()]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise RequestValidationError([{"type": "repeated", "loc": ("query", key),
                                       "msg": "given more than once; give one value",
                                       "input": None} for key in repeated])
