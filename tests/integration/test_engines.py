"""Engine activities on real vLLM CPU servers serving the project's tiny models.

Each vLLM start costs 20-100 s on a 2-core box, so this file starts few engines: one real
engine exercises load / reload / re-adopt / readopt / unload, one start fails with a bogus
config and one is cancelled while starting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import update
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.engines import (
    EngineActivities,
    engine_flags,
    validate_model_dir,
)
from turnout.config import ModelSwitchingConfig
from turnout.contracts import LoadVersionInput, UnloadVersionInput
from turnout.domain import EngineInfo, EngineState, RegisterModelRequest
from turnout.engine_args import EngineArgsError
from turnout.store import Store
from turnout.store.schema import VersionRow

pytest.importorskip("vllm")

MODEL_ID = "TinyLlama_chat"
HOST = "testhost"
# Engine ports of these tests: fixed (the tests check where an engine lands), below the
# kernel's ephemeral range (32768+, where vLLM's own sockets land) and apart from a running
# `make run` (8000-8002, engines 8100-8199) and the e2e modules' stacks, so the tests run
# beside either.
PORT_START, PORT_END = 21150, 21199


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return all(p.status() == psutil.STATUS_ZOMBIE for p in psutil.process_iter()
               if _pgid(p.pid) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.fixture
def store(engine_store: Store) -> Store:
    return engine_store


@pytest.fixture
def settings(tmp_path: Path, tiny_models: dict[str, Path]) -> ModelSwitchingConfig:
    # Models are the session's tiny ones, or copies made under tmp_path.
    roots = [str(tmp_path), *{str(path.parent) for path in tiny_models.values()}]
    return ModelSwitchingConfig(state_dir=str(tmp_path / "state"), engine_host=HOST,
                                model_roots=roots,
                                engine_port_start=PORT_START, engine_port_end=PORT_END,
                                engine_startup_timeout_s=300, engine_kv_cache_gib=1)


async def _register(store: Store, model: Path | str, version: str, **extra: Any) -> None:
    await store.register_version(RegisterModelRequest(
        model=str(model), model_arch="TinyLlama", model_stage="chat", version=version,
        **extra))


def _env(beats: list[Any] | None = None) -> ActivityEnvironment:
    env = ActivityEnvironment()
    if beats is not None:
        env.on_heartbeat = lambda *details: beats.append(details[0] if details else None)
    return env


async def test_load_serve_reload_readopt_unload(store: Store, settings: ModelSwitchingConfig,
                                                tiny_models: dict[str, Path]) -> None:
    await _register(store, tiny_models["tiny-v1"], "v1")
    acts = EngineActivities(settings, store)
    beats: list[Any] = []

    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await _env(beats).run(acts.load_version, LoadVersionInput(model_id=MODEL_ID,
                                                                       version="v1"))
    print(f"tiny engine ready (incl. warm-up) in {loop.time() - started:.1f} s")
    engine = result.engine
    assert not result.already_running
    assert engine.state is EngineState.READY and engine.host == HOST
    assert engine.served_model_name == f"{MODEL_ID}:v1"
    assert PORT_START <= (engine.port or 0) <= PORT_END and engine.pid
    assert any(b and b.get("pid") == engine.pid and b.get("port") == engine.port
               for b in beats)
    assert await asyncio.to_thread(Path(engine.log_path or "").is_file)
    assert str(Path(settings.state_dir) / "engines") in (engine.log_path or "")
    assert (await store.get_engine(MODEL_ID, "v1", HOST)).state is EngineState.READY

    async with httpx.AsyncClient(timeout=60) as client:
        resp = await client.post(f"{engine.url}/v1/completions", json={
            "model": engine.served_model_name, "prompt": "hi", "max_tokens": 3})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == f"{MODEL_ID}:v1"

    # Loading again (a retry, or a second workflow) finds the running engine.
    again = await _env().run(acts.load_version, LoadVersionInput(model_id=MODEL_ID,
                                                                 version="v1"))
    assert again.already_running and again.engine.pid == engine.pid

    # A retried attempt whose store write was lost adopts the pid from its heartbeat.
    await store.delete_engine(MODEL_ID, "v1", HOST)
    retry = _env()
    retry.info = dataclasses.replace(retry.info, attempt=2, heartbeat_details=[
        {"pid": engine.pid, "port": engine.port, "phase": "starting"}])
    adopted = await retry.run(acts.load_version, LoadVersionInput(model_id=MODEL_ID,
                                                                  version="v1"))
    assert adopted.already_running and adopted.engine.pid == engine.pid
    assert (await store.get_engine(MODEL_ID, "v1", HOST)).state is EngineState.READY

    # A restarted worker keeps the live engine; a loaded one that died meanwhile is found
    # dead, marked failed (gateways route around it) and handed over for replacement.
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()
    await _register(store, tiny_models["tiny-v2"], "v2")
    await store.save_engine(EngineInfo(model_id=MODEL_ID, version="v2", host=HOST,
                                       url=f"http://127.0.0.1:{PORT_END}", served_model_name="x",
                                       port=PORT_END, pid=dead.pid, state=EngineState.READY))
    restarted = EngineActivities(settings, store)
    kept = await restarted.readopt()
    assert [(e.version, e.pid) for e in kept] == [("v1", engine.pid)]
    [gone] = await restarted.find_dead()
    assert (gone.slot.version, gone.slot.host_id, gone.role, gone.pid) == \
        ("v2", HOST, "idle", dead.pid)
    assert (await store.get_engine(MODEL_ID, "v2", HOST)).state is EngineState.FAILED
    assert await restarted.find_dead() == []  # reported once
    await _env().run(restarted.unload_version, UnloadVersionInput(model_id=MODEL_ID,
                                                                  version="v2"))
    assert await store.get_engine(MODEL_ID, "v2", HOST) is None

    # The restarted worker (not the engine's parent) stops it, children included.
    beats.clear()
    await _env(beats).run(restarted.unload_version, UnloadVersionInput(model_id=MODEL_ID,
                                                                       version="v1"))
    assert _gone(engine.pid) and _group_gone(engine.pid)
    assert await store.get_engine(MODEL_ID, "v1", HOST) is None
    # Unloading what is not loaded is a no-op.
    await _env().run(restarted.unload_version, UnloadVersionInput(model_id=MODEL_ID,
                                                                  version="v1"))


async def test_missing_model_dir_fails_fast(store: Store, settings: ModelSwitchingConfig,
                                            tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    await _register(store, missing, "v1")
    acts = EngineActivities(settings, store)
    with pytest.raises(ApplicationError) as err:
        await _env().run(acts.load_version, LoadVersionInput(model_id=MODEL_ID, version="v1"))
    assert err.value.non_retryable and err.value.type == "ModelLoadError"
    assert str(missing) in err.value.message
    assert await store.list_engines() == []
    assert not acts._children


async def test_unreadable_config_fails_fast(store: Store, settings: ModelSwitchingConfig,
                                            tiny_models: dict[str, Path],
                                            tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_models["tiny-v1"], corrupt)
    (corrupt / "config.json").write_text("{this is not json")
    await _register(store, corrupt, "v1")
    acts = EngineActivities(settings, store)
    with pytest.raises(ApplicationError) as err:
        await _env().run(acts.load_version, LoadVersionInput(model_id=MODEL_ID, version="v1"))
    assert err.value.non_retryable and err.value.type == "ModelLoadError"
    assert str(corrupt / "config.json") in err.value.message
    assert await store.list_engines() == []
    assert not acts._children


async def test_engine_that_exits_before_ready(store: Store, settings: ModelSwitchingConfig,
                                              tiny_models: dict[str, Path],
                                              tmp_path: Path) -> None:
    """A config vLLM cannot serve: the process dies; the error quotes its log."""
    bogus = tmp_path / "bogus"
    shutil.copytree(tiny_models["tiny-v1"], bogus)
    (bogus / "config.json").write_text('{"model_type": "no_such_arch", '
                                       '"architectures": ["NoSuchForCausalLM"]}')
    await _register(store, bogus, "v1")
    acts = EngineActivities(settings, store)
    beats: list[Any] = []
    with pytest.raises(ApplicationError) as err:
        await _env(beats).run(acts.load_version, LoadVersionInput(model_id=MODEL_ID,
                                                                  version="v1"))
    print("engine exit error:", err.value.message)
    assert err.value.non_retryable and err.value.type == "EngineExitedError"
    assert "no_such_arch" in err.value.message or "NoSuch" in err.value.message
    pids = {b["pid"] for b in beats if b and b.get("pid")}
    assert pids and all(_gone(pid) and _group_gone(pid) for pid in pids)
    assert await store.list_engines() == []


async def test_cancel_while_starting_kills_the_engine(store: Store,
                                                      settings: ModelSwitchingConfig,
                                                      tiny_models: dict[str, Path]) -> None:
    await _register(store, tiny_models["tiny-v2"], "v2")
    acts = EngineActivities(settings, store)
    beats: list[Any] = []
    env = _env(beats)
    task = asyncio.ensure_future(env.run(acts.load_version,
                                         LoadVersionInput(model_id=MODEL_ID, version="v2")))
    for _ in range(200):
        if any(b and b.get("pid") for b in beats):
            break
        await asyncio.sleep(0.1)
    pid = next(b["pid"] for b in beats if b and b.get("pid"))
    record = await store.get_engine(MODEL_ID, "v2", HOST)
    assert record is not None and record.state is EngineState.STARTING
    await asyncio.sleep(2)  # let vLLM spawn its children too
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(pid) and _group_gone(pid)
    assert await store.get_engine(MODEL_ID, "v2", HOST) is None


async def test_external_endpoint_is_only_recorded(store: Store,
                                                  settings: ModelSwitchingConfig) -> None:
    await _register(store, "someone/else", "ext", endpoint="http://10.0.0.9:9000/")
    refused = EngineActivities(settings, store)  # a private address, not allowed here
    with pytest.raises(ApplicationError, match="ALLOW_PRIVATE_ENDPOINTS") as err:
        await _env().run(refused.load_version, LoadVersionInput(model_id=MODEL_ID,
                                                                version="ext"))
    assert err.value.non_retryable and await store.list_engines() == []
    settings = settings.model_copy(update={"allow_private_endpoints": True})
    acts = EngineActivities(settings, store)
    result = await _env().run(acts.load_version, LoadVersionInput(model_id=MODEL_ID,
                                                                  version="ext"))
    assert result.engine.external and result.engine.url == "http://10.0.0.9:9000"
    assert result.engine.served_model_name == "someone/else" and result.engine.pid is None
    assert not result.already_running
    assert (await acts.readopt())[0].external
    await _env().run(acts.unload_version, UnloadVersionInput(model_id=MODEL_ID, version="ext"))
    assert await store.list_engines() == []


def test_engine_args_become_flags_without_duplicates() -> None:
    flags = engine_flags({"max_model_len": 512, "enable_prefix_caching": True,
                          "enforce_eager": None, "override_generation_config":
                          {"temperature": 0}})
    assert flags.count("--max-model-len") == 1
    assert flags[flags.index("--max-model-len") + 1] == "512"
    assert "--enable-prefix-caching" in flags and "--enforce-eager" not in flags
    assert flags[flags.index("--dtype") + 1] == "float32"
    assert flags[flags.index("--override-generation-config") + 1] == '{"temperature": 0}'
    with pytest.raises(EngineArgsError, match="port"):
        engine_flags({"port": 1})


async def _stored(store: Store, model: Path | str, version: str, **config: Any) -> None:
    """A registration as an older release stored it (no catalogue): straight into the
    versions table, past today's request checks."""
    await _register(store, model, version)
    async with store.engine.begin() as conn:
        await conn.execute(update(VersionRow).where(VersionRow.version == version).values(
            config={"model": str(model), "model_arch": "TinyLlama", "model_stage": "chat",
                    **config}))


@pytest.mark.parametrize(("config", "needle"), [
    ({"endpoint": "http://169.254.169.254/latest#"}, "fragment"),
    ({"endpoint": "http://169.254.169.254/latest"}, "link-local"),
    ({"engine_args": {"max_model_len": ["256", "--host", "0.0.0.0"]}}, "max_model_len"),
    ({"engine_args": {"port": 9}}, "port"),
    ({"engine_args": {"trust_remote_code": True}}, "allow_trust_remote_code"),
    ({"served_model_name": "--trust-remote-code"}, "served model name"),
])
async def test_a_stored_registration_with_bad_args_fails_its_load(
        store: Store, settings: ModelSwitchingConfig, tiny_models: dict[str, Path],
        config: dict[str, Any], needle: str) -> None:
    """Defence in depth: what an older release let in never reaches vLLM's argv."""
    await _stored(store, tiny_models["tiny-v1"], "v1", **config)
    acts = EngineActivities(settings, store)
    with pytest.raises(ApplicationError) as err:
        await _env().run(acts.load_version, LoadVersionInput(model_id=MODEL_ID, version="v1"))
    assert err.value.non_retryable and err.value.type == "ModelLoadError"
    assert needle in err.value.message
    assert await store.list_engines() == [] and not acts._children


async def test_a_model_outside_the_roots_is_not_loaded(
        store: Store, settings: ModelSwitchingConfig, tiny_models: dict[str, Path],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A stored path outside the engine worker's roots, or a link under a root that
    points out of it, fails the load before anything starts."""
    outside = tmp_path_factory.mktemp("outside") / "tiny"
    shutil.copytree(tiny_models["tiny-v1"], outside)
    link = Path(settings.model_roots[0]) / "escape"
    link.symlink_to(outside)
    acts = EngineActivities(settings, store)
    for version, model in (("v1", outside), ("v2", link)):
        await _stored(store, model, version)
        with pytest.raises(ApplicationError) as err:
            await _env().run(acts.load_version,
                             LoadVersionInput(model_id=MODEL_ID, version=version))
        assert err.value.non_retryable and err.value.type == "ModelLoadError"
        assert "not under the model roots" in err.value.message
    assert await store.list_engines() == [] and not acts._children


def test_cached_hub_id_passes_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--org--tiny").mkdir()
    assert validate_model_dir("org/tiny") == "org/tiny"
    with pytest.raises(ApplicationError, match="does not exist"):
        validate_model_dir("org/absent")


async def test_a_load_that_does_not_fit_fails_before_anything_starts(
        store: Store, settings: ModelSwitchingConfig, tiny_models: dict[str, Path]) -> None:
    await _register(store, tiny_models["tiny-v1"], "v1")
    # 1 GiB for engines: a tiny model still needs its 1 GiB KV cache plus 2 GiB of runtime.
    acts = EngineActivities(settings.model_copy(update={"engine_memory_gib": 1.0}), store)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ApplicationError) as caught:
        await _env().run(acts.load_version, LoadVersionInput(model_id=MODEL_ID, version="v1"))
    assert (caught.value.type, caught.value.non_retryable) == ("InsufficientMemory", True)
    assert "needs about 3.0 GiB; the largest free is 1.0 GiB on host testhost" in \
        caught.value.message
    assert loop.time() - started < 5 and await store.list_engines() == []
    # The weights' size was read from the model's files and kept for placement.
    assert (MODEL_ID, "v1") in await store.weights_sizes()
