"""Bounds of path and query parameters the routers share (the store's column sizes)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

# A model id is `{model_arch}_{model_stage}`, stored in 300 characters.
ModelIdPath = Annotated[str, Path(min_length=1, max_length=300)]
# Operation ids are 32 hex digits; 64 is the column.
OperationIdPath = Annotated[str, Path(min_length=1, max_length=64)]
# Row ids are SQL integers: beyond 2**63 - 1 a database cannot even compare them.
MAX_ROW_ID = 2**63 - 1
