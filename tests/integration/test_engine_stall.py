"""A start that makes no progress fails fast (`EngineStalled`), and its process is gone.

The "engine" is a script in place of the engine's Python (`engine_python`): it is started
exactly as vLLM would be (its own session, its log, the store's record), by the real
`EngineActivities` with a real SQLite store, but prints one line and sleeps, as an engine
starved of CPU or stuck in a kernel call does. No vLLM needed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.engines import ENGINE_STALLED, ENGINE_START_TIMEOUT, EngineActivities
from turnout.config import ModelSwitchingConfig
from turnout.contracts import LoadVersionInput
from turnout.domain import RegisterModelRequest
from turnout.store import Store

MODEL_ID = "TinyLlama_chat"
HOST = "stallhost"


@pytest.fixture
def store(engine_store: Store) -> Store:
    return engine_store


def _fake_engine(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-engine.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


async def _register(store: Store, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    await store.register_version(RegisterModelRequest(
        model=str(model), model_arch="TinyLlama", model_stage="chat", version="v1"))


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_start_that_stops_logging_fails_as_stalled(store: Store,
                                                           tmp_path: Path) -> None:
    settings = ModelSwitchingConfig(
        state_dir=str(tmp_path / "state"), model_roots=[str(tmp_path)],
        engine_host=HOST, engine_port_start=8350,
        engine_port_end=8359, engine_startup_timeout_s=300, engine_stall_timeout_s=3,
        engine_python=_fake_engine(tmp_path, 'echo "fake engine: loading weights"\n'
                                             "sleep 3600\n"))
    await _register(store, tmp_path)
    acts = EngineActivities(settings, store)
    beats: list[object] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details[0] if details else None)

    started = time.monotonic()
    with pytest.raises(ApplicationError) as err:
        await env.run(acts.load_version, LoadVersionInput(model_id=MODEL_ID, version="v1"))
    elapsed = time.monotonic() - started
    print(f"stalled start failed after {elapsed:.1f} s: {err.value.message}")

    assert err.value.type == ENGINE_STALLED and err.value.non_retryable
    assert "made no progress for 3 s" in err.value.message
    assert "fake engine: loading weights" in err.value.message  # the log's last lines
    assert str(Path(settings.state_dir) / "engines") in err.value.message  # where the log is
    assert elapsed < 30  # not the 300 s startup timeout
    # Heartbeats as for any start, with the process they are about.
    pids = {b.get("pid") for b in beats if isinstance(b, dict)}
    assert len(pids) == 1 and None not in pids
    pid = pids.pop()
    # Stopped and forgotten like any failed start: the script and its `sleep` are gone.
    assert _group_gone(pid)  # type: ignore[arg-type]
    assert await store.list_engines() == []
    assert not acts._children


async def test_a_start_that_keeps_logging_is_not_stalled(store: Store,
                                                         tmp_path: Path) -> None:
    """Progress resets the watch: a slow start that logs runs until the startup timeout."""
    settings = ModelSwitchingConfig(
        state_dir=str(tmp_path / "state"), model_roots=[str(tmp_path)],
        engine_host=HOST, engine_port_start=8350,
        engine_port_end=8359, engine_startup_timeout_s=6, engine_stall_timeout_s=2,
        engine_python=_fake_engine(tmp_path, 'while true; do echo "fake engine: step"; '
                                             "sleep 0.5; done\n"))
    await _register(store, tmp_path)
    acts = EngineActivities(settings, store)

    started = time.monotonic()
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(acts.load_version,
                                        LoadVersionInput(model_id=MODEL_ID, version="v1"))
    assert err.value.type == ENGINE_START_TIMEOUT, err.value.message
    assert time.monotonic() - started >= 6
    assert await store.list_engines() == []
    assert not acts._children
