"""The `plane` fixture: one real control plane per test module (see `plane.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.integration.plane import ControlPlane, control_plane


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    # Default analysis settings: the fakes answer in about a millisecond, in the test's own
    # event loop beside the gateway, workers and API, and that scheduling noise is not
    # "slower by more than the tolerance" (see turnout/telemetry/verdicts.py).
    async with control_plane(tmp_path_factory.mktemp("plane")) as plane:
        yield plane
