"""The whole stack on real parts: Temporal dev server, workers, gateway, API, vLLM engines."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.postgres import PostgresServer, start_postgres
from turnout.config import ModelSwitchingConfig
from turnout.store import Store
from workers.stack import Stack

# Ports away from the defaults so the tests can run beside a `make run`.
E2E_SETTINGS = {
    "temporal_address": "127.0.0.1:17233",
    "api_port": 18001,
    "gateway_port": 18000,
    "gateway_admin_port": 18002,
    "engine_port_start": 18100,
    "engine_port_end": 18149,
    "engine_host": "e2e",
    # Long enough that a gateway frozen for a few seconds is still waited for (the
    # kill-during-a-shift test freezes a replica so that a traffic shift is in flight).
    "gateway_live_after_s": 30,
    # Several looks of the health monitor fit in one short canary step.
    "monitoring_interval_s": 4,
    # These modules test rollouts with the replaced version stopped at once (the old
    # behaviour, kept by STANDBY_MINUTES=0); standby engines are tested in test_fleet.py.
    "standby_minutes": 0,
}


@pytest.fixture(scope="session")
def model_roots(tmp_path_factory: pytest.TempPathFactory,
                tiny_models: dict[str, Path]) -> list[str]:
    """`MODEL_ROOTS` of the e2e stacks: the tiny models' directory (a temporary one, or
    TURNOUT_TEST_MODELS_DIR) and pytest's base temp dir, where tests make broken copies."""
    return sorted({str(tmp_path_factory.getbasetemp()),
                   *(str(path.parent) for path in tiny_models.values())})


def e2e_stack(root: Path, *, ui_port: int, base_env: Mapping[str, str] | None = None,
              database_url: str | None = None, **settings: Any) -> Stack:
    """A headless stack of real parts keeping its state in `root` (its store a SQLite file
    there unless `database_url` says otherwise), with `settings` (each module its own ports
    and engine host id, so modules never meet)."""
    config = ModelSwitchingConfig.from_env(
        {}, state_dir=str(root),
        database_url=database_url or f"sqlite+aiosqlite:///{root}/turnout.db", **settings)
    return Stack(settings=config, temporal_db=root / "temporal.db", log_dir=root / "logs",
                 temporal_ui_port=ui_port, headless=True,
                 base_env=dict(base_env) if base_env is not None else None,
                 extra_env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get(
                     "VLLM_CPU_KVCACHE_SPACE", "1")})


@asynccontextmanager
async def running(stack: Stack) -> AsyncIterator[Stack]:
    """The stack started, then stopped (engines included) however the tests end."""
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()
        _dump_logs_on_failure(stack.log_dir)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the module's own, not the session's: the chaos modules lock
    its tables and stop it."""
    server = start_postgres()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory,
                model_roots: list[str]) -> AsyncIterator[Stack]:
    # The fake engines some tests register as external endpoints listen on 127.0.0.1.
    async with running(e2e_stack(tmp_path_factory.mktemp("stack"), ui_port=18233,
                                 model_roots=model_roots, allow_private_endpoints=True,
                                 **E2E_SETTINGS)) as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store(stack: Stack) -> AsyncIterator[Store]:
    """The test's own view of the module's stack's store."""
    view = Store.from_url(stack.settings.database_url)
    yield view
    await view.close()


def _dump_logs_on_failure(log_dir: Path) -> None:
    """Keep the tail of each process log in the test output; CI has nothing else."""
    if os.environ.get("TURNOUT_E2E_LOGS") != "1":
        return
    for log in sorted(log_dir.glob("*.log")):
        print(f"===== {log.name} =====\n{log.read_text(errors='replace')[-4000:]}")
