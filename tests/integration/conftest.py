"""The `plane` fixture: one real control plane per test module (see `plane.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.integration.plane import ControlPlane, control_plane


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    async with control_plane(tmp_path_factory.mktemp("plane")) as plane:
        yield plane
