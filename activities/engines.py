"""Engine activities: start, warm up, stop and re-adopt vLLM servers on this host.

One engine worker runs per serving host, on its own task queue, with one
`EngineActivities` instance. Each loaded version is one `vllm.entrypoints.openai.api_server`
process in its own session (process group), so that:

- it survives a restart of the worker (the worker re-adopts it from the store: `readopt`),
- stopping it kills vLLM's children too (`os.killpg`).

The store's engine table is the durable record of what runs where; Temporal heartbeats
carry the pid/port of a starting engine so a retried attempt adopts the process its
predecessor started instead of starting a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.host import detect_capacity
from turnout.config import ModelSwitchingConfig
from turnout.contracts import (
    ENGINE_EXITED,
    ENGINE_SLEEP_FAILED,
    ENGINE_STALLED,
    ENGINE_START_TIMEOUT,
    ENGINE_WARMUP_FAILED,
    INSUFFICIENT_MEMORY,
    LOAD_VERSION,
    MODEL_LOAD_ERROR,
    NO_FREE_PORT,
    UNLOAD_VERSION,
    VERSION_NOT_FOUND,
    EngineSlot,
    LoadVersionInput,
    LoadVersionResult,
    ReplaceEngineInput,
    UnloadVersionInput,
)
from turnout.cpu_cores import (
    EngineCores,
    cores_per_engine,
    format_cpu_list,
    omp_threads_bind,
    parse_cpu_list,
    pick_cores,
    worker_ranks,
)
from turnout.domain import SERVED_NAME_PATTERN, EngineInfo, EngineState, VersionInfo
from turnout.engine_args import TRUST_REMOTE_CODE_SETTING, EngineArgsError, engine_argv
from turnout.environments import ENGINE_HOST_ENV, engine_environment
from turnout.fleet import (
    CACHED_ROLES,
    GIB,
    EngineRole,
    HolderKind,
    HostCapacity,
    should_sleep,
)
from turnout.redaction import answer_summary
from turnout.registration import is_hub_id, model_dir_problem, stored_endpoint_problem
from turnout.runtime import port_free
from turnout.store import NotFound, Store
from turnout.store.fleet import read_fleet

log = logging.getLogger(__name__)

# ApplicationError types raised by the engine activities (all non-retryable but
# ENGINE_SLEEP_FAILED and NO_FREE_PORT: a retry would fail the same way, and the workflow
# turns them into a `load_failed` outcome). Their names are the contract's.
# Files that hold a model's weights (what an engine loads into memory).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
POLL_INTERVAL_S = 0.5
STOP_GRACE_S = 20.0
# Options every engine gets unless its version's engine_args change them (None drops one).
# An access-log line per request fills the engine's log for nothing: the gateway counts.
_DEFAULT_FLAGS: dict[str, Any] = {"dtype": "float32", "max_model_len": 256,
                                  "enforce_eager": True, "disable_uvicorn_access_log": True}
# Set in the engine worker's environment, the operator binds engines' threads: no partition.
OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_EXC_LINE = re.compile(r"\b[A-Za-z_][\w.]*(Error|Exception|Exit)\b\s*:")


def _logger() -> logging.LoggerAdapter | logging.Logger:
    """`activity.logger` adds the activity's context; outside an activity use ours."""
    return activity.logger if activity.in_activity() else log


def _heartbeat(details: Mapping[str, Any]) -> None:
    if activity.in_activity():
        activity.heartbeat(dict(details))


def engine_flags(engine_args: Mapping[str, Any], *,
                 allow_trust_remote_code: bool = False) -> list[str]:
    """Turn the defaults plus a version's `engine_args` into vLLM command-line flags.

    Only options of turnout's catalogue (`turnout.engine_args`) become flags, each with a
    value of its type: `{"max_model_len": 512}` → `--max-model-len 512`; `True` → a bare
    flag; `False` → `--no-<flag>` (or nothing for a plain flag); `None` drops the flag
    (also a default one, e.g. `{"enforce_eager": None}`). engine_args win over the
    defaults and never produce a flag twice. Anything else (an unknown or reserved key, a
    list smuggling more flags) raises `EngineArgsError`: nothing is passed through.
    """
    return engine_argv(engine_args, defaults=_DEFAULT_FLAGS,
                       allowed={TRUST_REMOTE_CODE_SETTING: allow_trust_remote_code})


def hub_cache_dir(model: str) -> Path | None:
    """The local Hugging Face cache entry of a hub id like `org/name`, if it is there.

    A version's `model` may name a hub model already in the local cache (nothing can be
    downloaded here); vLLM resolves those itself.
    """
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        return None
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    entry = Path(cache).expanduser() / ("models--" + model.replace("/", "--"))
    return entry if entry.is_dir() else None


def validate_model_dir(model: str, roots: Iterable[str] | None = None) -> str:
    """Fail fast, before spawning anything, on a model dir vLLM could never load, or may
    not: with `roots` (the engine worker's model roots) a directory must lie under one of
    them once symlinks are resolved, whatever the registration said.

    Returns what to pass as `--model`: the resolved directory, or a cached hub id as is.
    """
    if roots is not None:
        if is_hub_id(model) and Path(model).exists():
            # vLLM would load this relative directory, not the hub model it looks like.
            raise ApplicationError(
                f"{model} names a hub model but is also a directory relative to the engine "
                f"worker's working directory; register the directory by its absolute path",
                non_retryable=True, type=MODEL_LOAD_ERROR)
        problem = model_dir_problem(model, roots, resolve=True)
        if problem:
            raise ApplicationError(f"model {problem}", non_retryable=True,
                                   type=MODEL_LOAD_ERROR)
    path = Path(model).expanduser()
    if not path.is_dir():
        if hub_cache_dir(model) is not None:
            return model
        raise ApplicationError(f"model directory {path} does not exist", non_retryable=True,
                               type=MODEL_LOAD_ERROR)
    config = path / "config.json"
    if not config.is_file():
        raise ApplicationError(f"model directory {path} has no config.json",
                               non_retryable=True, type=MODEL_LOAD_ERROR)
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ApplicationError(f"cannot read {config}: {exc}", non_retryable=True,
                               type=MODEL_LOAD_ERROR) from None
    if not isinstance(data, dict):
        raise ApplicationError(f"{config} is not a JSON object", non_retryable=True,
                               type=MODEL_LOAD_ERROR)
    return str(path.resolve())


def sleep_mode_launch(sleep_mode: bool) -> tuple[list[str], dict[str, str]]:
    """The flag and variable an engine needs for vLLM's sleep mode: vLLM serves `/sleep`
    and `/wake_up` only in its development mode."""
    if not sleep_mode:
        return [], {}
    return ["--enable-sleep-mode"], {"VLLM_SERVER_DEV_MODE": "1"}


def weights_bytes(model: str) -> int:
    """Size of a model's weight files: a local directory, or a hub id's cache entry."""
    path = Path(model).expanduser()
    root = path if path.is_dir() else hub_cache_dir(model)
    if root is None:
        return 0
    total = 0
    for file in root.rglob("*"):
        if file.suffix in _WEIGHT_SUFFIXES:
            with contextlib.suppress(OSError):
                total += file.stat().st_size  # follows the cache's links to its blobs
    return total


def _log_lines(log_path: Path, max_bytes: int) -> list[str] | None:
    """The non-empty lines of the end of an engine's log (None: no log). Progress bars'
    carriage returns count as line ends, so a bar's last state is one line."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    return [line.strip() for line in lines if line.strip()]


def log_error_line(log_path: Path, max_bytes: int = 64_000) -> str:
    """The most telling line of a failed engine's log: its last exception, else last line."""
    lines = _log_lines(log_path, max_bytes)
    if lines is None:
        return "(no engine log)"
    for i in range(len(lines) - 1, -1, -1):
        if _EXC_LINE.search(lines[i]) and not lines[i].startswith("File "):
            # The exception line plus its continuation (pydantic puts the reason below it).
            tail = [ln for ln in lines[i:i + 4] if not ln.startswith("For further information")]
            return " | ".join(tail)[:800]
    for line in reversed(lines):
        if "ERROR" in line:
            return line[-500:]
    return lines[-1][-500:] if lines else "(engine log is empty)"


def log_last_lines(log_path: Path, count: int = 5, max_chars: int = 1000) -> str:
    """The last `count` lines of an engine's log, joined with ` | `: where a start that
    stopped making progress was when it stopped."""
    lines = _log_lines(log_path, 16_000)
    if lines is None:
        return "(no engine log)"
    if not lines:
        return "(engine log is empty)"
    return " | ".join(_shorten(line) for line in lines[-count:])[-max_chars:]


def _shorten(line: str, limit: int = 300) -> str:
    """A long line's start (who logged it, when) and end (what it says)."""
    return line if len(line) <= limit else f"{line[:100]} … {line[-(limit - 103):]}"


def log_size(log_path: Path) -> int:
    """How much an engine has logged so far (0 before its log exists)."""
    try:
        return log_path.stat().st_size
    except OSError:
        return 0


class StallWatch:
    """Whether a starting engine still makes progress: its log grows or /health answers.

    A start can stop making progress without exiting (measured on a 2-core host: an engine
    whose processes shared a core with a busy engine's worker logged nothing for minutes);
    `timeout_s` without either sign is a stall. Pure: the caller passes what it saw and
    when, so the rule is tested without waiting.
    """

    def __init__(self, timeout_s: float, *, now: float, log_size: int) -> None:
        self.timeout_s = timeout_s
        self._size = log_size
        self._progress_at = now

    def observe(self, now: float, *, log_size: int, answered: bool = False) -> bool:
        """Record one look (the log's size, whether /health answered at all); True once
        `timeout_s` has passed since the last progress."""
        if answered or log_size != self._size:
            self._size = log_size
            self._progress_at = now
        return self.silent_for(now) >= self.timeout_s

    def silent_for(self, now: float) -> float:
        return max(0.0, now - self._progress_at)


def is_engine_process(pid: int | None, port: int | None = None) -> bool:
    """True if `pid` is alive (not a zombie) and is a vLLM API server (on `port`, if given).

    Checking the command line guards against pid reuse: we never adopt or kill a process
    that merely got the pid of an engine that died long ago.
    """
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if API_SERVER_MODULE not in cmdline:
        return False
    if port is not None:
        return "--port" in cmdline and str(port) in cmdline
    return True


def unrecorded_engines(host: str, known: set[int]) -> list[int]:
    """vLLM servers that `host` started (ENGINE_HOST_ENV) and whose pid is not in `known`:
    the leaders of their sessions only, since vLLM's own children go with them."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid in known or API_SERVER_MODULE not in (proc.info["cmdline"] or ()):
                continue
            if _group_leader(proc.pid) and proc.environ().get(ENGINE_HOST_ENV) == host:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or another user's
    return found


class EngineActivities:
    """Temporal activities that manage the vLLM servers of one host.

    Register the bound methods `load_version` and `unload_version` on the host's engine task
    queue; call `readopt()` once when the worker starts.
    """

    def __init__(self, settings: ModelSwitchingConfig, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.host = settings.engine_host
        # Children we spawned in this process: lets us reap them and read exit codes.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Port choice + spawn + first store write happen under this lock so that two loads
        # in this worker never pick the same port.
        self._spawn_lock = asyncio.Lock()
        self._capacity: HostCapacity | None = None  # detected at the first load

    # ------------------------------------------------------------------ activities

    @activity.defn(name=LOAD_VERSION)
    async def load_version(self, input: LoadVersionInput) -> LoadVersionResult:
        """Make sure one version is served on this host; idempotent and retry-safe."""
        version = await self._get_version(input.model_id, input.version)
        config = version.config
        name = config.served_model_name or f"{input.model_id}:{input.version}"
        if config.endpoint:
            problem = stored_endpoint_problem(config.endpoint, self.settings)
            if problem:
                raise ApplicationError(f"endpoint of {input.model_id}:{input.version} refused: "
                                       f"{problem}", non_retryable=True, type=MODEL_LOAD_ERROR)
            existing = await self.store.get_engine(input.model_id, input.version, self.host)
            engine = EngineInfo(model_id=input.model_id, version=input.version, host=self.host,
                                url=config.endpoint.rstrip("/"),
                                served_model_name=config.served_model_name or config.model,
                                state=EngineState.READY, external=True,
                                started_at=existing.started_at if existing else None)
            await self.store.save_engine(engine)
            _logger().info("version %s:%s is external at %s", input.model_id, input.version,
                           engine.url)
            return LoadVersionResult(engine=engine, already_running=existing is not None)

        async with self._locked(input.model_id, input.version):
            return await self._load_local(version, name)

    @activity.defn(name=UNLOAD_VERSION)
    async def unload_version(self, input: UnloadVersionInput) -> None:
        """Stop the version's engine on this host (SIGTERM, then SIGKILL) and forget it.

        Unless `input.when` says it may still go: decided on the control worker, it is
        checked again here, under the same lock as loads, so an engine a new switch or
        shadow has taken since is left running.
        """
        async with self._locked(input.model_id, input.version):
            engine = await self.store.get_engine(input.model_id, input.version, self.host)
            if engine is None:
                _logger().info("unload %s:%s: nothing loaded on %s", input.model_id,
                               input.version, self.host)
                return
            if input.when != "always":
                state = await read_fleet(self.store)
                role = state.role(input.model_id, input.version)
                if role not in CACHED_ROLES or (input.when == "unheld"
                                                and role is not EngineRole.IDLE):
                    _logger().info("%s:%s is %s now: left running", input.model_id,
                                   input.version, role.value)
                    return
            if not engine.external and engine.pid:
                await self.store.save_engine(engine.model_copy(
                    update={"state": EngineState.STOPPING}))
                await self._stop(engine.pid, engine.port, grace_s=STOP_GRACE_S)
            await self.store.delete_engine(input.model_id, input.version, self.host)
            _logger().info("unloaded %s:%s (pid %s)", input.model_id, input.version, engine.pid)
            if input.when == "cached" and not await self.store.list_engines(
                    model_id=input.model_id, version=input.version):
                # Evicted everywhere: a standby or preload of it holds nothing any more.
                for kind in (HolderKind.STANDBY, HolderKind.PRELOAD):
                    await self.store.release(input.model_id, input.version, kind)

    # ------------------------------------------------------------------ worker start

    async def readopt(self) -> list[EngineInfo]:
        """Keep the engines of this host that still run and answer; forget the others.

        Called once when the engine worker starts: engines run in their own sessions and
        outlive the worker, so a restarted worker takes them over instead of restarting
        them. A recorded engine that is alive but not healthy is stopped, so no unknown
        process is left behind.
        """
        kept: list[EngineInfo] = []
        for engine in await self.store.list_engines(host=self.host):
            if engine.external:
                kept.append(engine)
                continue
            alive = is_engine_process(engine.pid, engine.port)
            if alive and await self._healthy(engine.url):
                if engine.state is not EngineState.READY:
                    engine = engine.model_copy(update={"state": EngineState.READY})
                    await self.store.save_engine(engine)
                kept.append(engine)
                log.info("re-adopted engine %s:%s pid=%s at %s", engine.model_id,
                         engine.version, engine.pid, engine.url)
                continue
            if not alive and engine.state is EngineState.READY:
                # It died while this worker was away: `find_dead` has it replaced.
                log.warning("engine %s:%s pid=%s died while the worker was away",
                            engine.model_id, engine.version, engine.pid)
                continue
            if alive:
                log.warning("engine %s:%s pid=%s is alive but not healthy: stopping it",
                            engine.model_id, engine.version, engine.pid)
                await self._stop(engine.pid, engine.port, grace_s=5)
            else:
                log.info("engine %s:%s pid=%s is gone: forgetting it", engine.model_id,
                         engine.version, engine.pid)
            await self.store.delete_engine(engine.model_id, engine.version, self.host)
        await self._stop_unrecorded({engine.pid for engine in kept if engine.pid})
        return kept

    async def _stop_unrecorded(self, kept: set[int]) -> None:
        """Stop this host's engines that no record knows: a worker killed between starting
        vLLM and writing its record leaves one running in its own session, holding memory
        and a port that nothing would ever free."""
        for pid in unrecorded_engines(self.host, kept):
            log.warning("engine pid=%s of host %s has no record (its worker died while "
                        "starting it): stopping it", pid, self.host)
            await self._stop(pid, None, grace_s=5)

    @property
    def _sleep_mode(self) -> bool:
        return self._capacity is not None and self._capacity.sleep_mode

    async def sleep_cached(self) -> int:
        """On a host with sleep mode: put its cached engines (standby, preloaded) to sleep,
        so they hold no GPU memory; `load_version` wakes one before it takes traffic.
        Returns how many were put to sleep."""
        if self._capacity is None:
            self._capacity = await asyncio.to_thread(detect_capacity, self.settings)
        if not self._sleep_mode:
            return 0
        state = None
        slept = 0
        for engine in await self.store.list_engines(host=self.host):
            if engine.external or engine.sleeping or engine.state is not EngineState.READY:
                continue
            state = state or await read_fleet(self.store)
            if not should_sleep(state.role(engine.model_id, engine.version),
                                sleep_mode=True):
                continue
            async with self._locked(engine.model_id, engine.version):
                await self._set_sleeping(engine, True)
                slept += 1
        return slept

    async def _set_sleeping(self, engine: EngineInfo, asleep: bool) -> EngineInfo:
        """vLLM's `/sleep?level=1` or `/wake_up`, then record it."""
        path = "/sleep?level=1" if asleep else "/wake_up"
        try:
            async with httpx.AsyncClient(timeout=300) as client:
                (await client.post(f"{engine.url}{path}")).raise_for_status()
        except httpx.HTTPError as exc:
            raise ApplicationError(f"{path} of {engine.model_id}:{engine.version} at "
                                   f"{engine.url} failed: {exc!r}", type=ENGINE_SLEEP_FAILED,
                                   non_retryable=False) from None
        engine = engine.model_copy(update={"sleeping": asleep})
        await self.store.save_engine(engine)
        _logger().info("engine %s:%s %s", engine.model_id, engine.version,
                       "put to sleep" if asleep else "woken")
        return engine

    async def find_dead(self) -> list[ReplaceEngineInput]:
        """Loaded engines of this host whose process has gone, each marked failed at once
        (gateways then route around it within a second), with its role and how it ended:
        what `ReplaceEngineWorkflow` needs to replace it or drop it from the cache."""
        dead = []
        state = None
        for engine in await self.store.list_engines(host=self.host):
            if engine.external or engine.state is not EngineState.READY or not engine.pid:
                continue
            lock = self._locks.get((engine.model_id, engine.version))
            if (lock is not None and lock.locked()) or self._alive(engine.pid, engine.port):
                continue  # a load or unload of it is under way: that one decides
            code = self._exit_code(engine.pid)
            self._children.pop(engine.pid, None)
            await self.store.save_engine(engine.model_copy(update={"state": EngineState.FAILED}))
            state = state or await read_fleet(self.store)
            role = state.role(engine.model_id, engine.version)
            how = ("process gone" if code is None else f"killed by signal {-code}"
                   if code < 0 else f"exit code {code}")
            log.error("engine %s:%s pid=%s on %s died (%s) as %s", engine.model_id,
                      engine.version, engine.pid, self.host, how, role.value)
            dead.append(ReplaceEngineInput(
                slot=EngineSlot(model_id=engine.model_id, version=engine.version,
                                  host_id=self.host, task_queue=self.settings.engine_task_queue),
                role=role.value, pid=engine.pid, exit=how))
        return dead

    async def stop_all(self) -> list[EngineInfo]:
        """Stop every engine of this host and forget it: the local stack's clean shutdown."""
        stopped = []
        for engine in await self.store.list_engines(host=self.host):
            if not engine.external:
                await self._stop(engine.pid, engine.port, grace_s=STOP_GRACE_S)
            await self.store.delete_engine(engine.model_id, engine.version, self.host)
            stopped.append(engine)
        return stopped

    # ------------------------------------------------------------------ loading

    def _url(self, port: int) -> str:
        """Where gateways reach an engine: this host's advertised address."""
        return f"http://{self.settings.engine_advertise_host}:{port}"

    async def _get_version(self, model_id: str, version: str) -> VersionInfo:
        try:
            return await self.store.get_version(model_id, version)
        except NotFound as exc:
            raise ApplicationError(str(exc), non_retryable=True,
                                   type=VERSION_NOT_FOUND) from None

    async def _load_local(self, version: VersionInfo, name: str) -> LoadVersionResult:
        model_id, ver = version.model_id, version.version
        existing = await self.store.get_engine(model_id, ver, self.host)

        # 1. A previous attempt of this activity started a process: adopt it.
        adopt = self._process_from_heartbeat()
        # 2. The store knows a live engine (a READY one, or one a crashed worker started).
        if adopt is None and existing and is_engine_process(existing.pid, existing.port):
            adopt = (existing.pid, existing.port)  # type: ignore[assignment]
        if adopt is not None:
            pid, port = adopt
            url = self._url(port)
            if (existing and existing.state is EngineState.READY and existing.pid == pid
                    and await self._healthy(url)):
                if existing.sleeping:
                    existing = await self._set_sleeping(existing, False)
                _logger().info("%s:%s already running: pid=%s at %s", model_id, ver, pid, url)
                return LoadVersionResult(engine=existing, already_running=True)
            log_path = self._log_path(model_id, ver)
            engine = EngineInfo(model_id=model_id, version=ver, host=self.host, url=url,
                                served_model_name=name, port=port, pid=pid,
                                state=EngineState.STARTING, log_path=str(log_path),
                                started_at=existing.started_at if existing else None)
            _logger().info("adopting starting engine %s:%s pid=%s port=%s", model_id, ver,
                           pid, port)
            await self.store.save_engine(engine)
            engine = await self._finish_start(engine, log_path)
            return LoadVersionResult(engine=engine, already_running=True)

        if existing is not None:
            _logger().info("forgetting dead engine record %s:%s pid=%s", model_id, ver,
                           existing.pid)
            await self.store.delete_engine(model_id, ver, self.host)

        model_dir = validate_model_dir(version.config.model, self.settings.resolved_model_roots)
        flags = self._checked_flags(version, name)
        need = await self._check_room(version, model_dir)
        engine, log_path = await self._spawn(version, model_dir, name, flags)
        engine = await self._finish_start(engine.model_copy(update={"memory_bytes": need}),
                                          log_path)
        return LoadVersionResult(engine=engine, already_running=False)

    def _checked_flags(self, version: VersionInfo, name: str) -> list[str]:
        """The version's vLLM flags, or a non-retryable `ModelLoadError`: a registration
        stored by an older release may hold engine arguments (or a served name) that
        turnout no longer passes to vLLM; it fails its load, saying which."""
        config = version.config
        what = f"{version.model_id}:{version.version}"
        if not re.fullmatch(SERVED_NAME_PATTERN, name):
            raise ApplicationError(f"served model name of {what} is not usable on a vLLM "
                                   f"command line: {name[:80]!r}", non_retryable=True,
                                   type=MODEL_LOAD_ERROR)
        try:
            flags = engine_flags(config.engine_args,
                                 allow_trust_remote_code=self.settings.allow_trust_remote_code)
        except EngineArgsError as exc:
            raise ApplicationError(f"engine_args of {what} refused: {exc}", non_retryable=True,
                                   type=MODEL_LOAD_ERROR) from None
        tokenizer = config.engine_args.get("tokenizer")
        if isinstance(tokenizer, str):
            problem = model_dir_problem(tokenizer, self.settings.resolved_model_roots,
                                        resolve=True)
            if problem:
                raise ApplicationError(f"tokenizer of {what}: {problem}", non_retryable=True,
                                       type=MODEL_LOAD_ERROR)
        return flags

    async def _check_room(self, version: VersionInfo, model_dir: str) -> int:
        """What the new engine needs (weights from the model's files, plus what this host
        gives every engine); fail at once, before spawning, if this host has not got it."""
        if self._capacity is None:
            self._capacity = await asyncio.to_thread(detect_capacity, self.settings)
        weights = await asyncio.to_thread(weights_bytes, model_dir)
        await self.store.set_weights_bytes(version.model_id, version.version, weights)
        need = weights + self._capacity.engine_extra_bytes
        state = await read_fleet(self.store)
        used = sum(state.engine_memory(e) for e in state.engines
                   if e.host == self.host and not e.external
                   and (e.model_id, e.version) != (version.model_id, version.version))
        free = self._capacity.memory_bytes - used
        if need > free:
            raise ApplicationError(
                f"{version.model_id} {version.version} needs about {need / GIB:.1f} GiB; "
                f"the largest free is {max(0, free) / GIB:.1f} GiB on host {self.host}",
                non_retryable=True, type=INSUFFICIENT_MEMORY)
        return need

    def _process_from_heartbeat(self) -> tuple[int, int] | None:
        if not activity.in_activity():
            return None
        details = activity.info().heartbeat_details
        if not details or not isinstance(details[0], Mapping):
            return None
        pid, port = details[0].get("pid"), details[0].get("port")
        if isinstance(pid, int) and isinstance(port, int) and is_engine_process(pid, port):
            return pid, port
        return None

    async def _engine_cores(self, version: VersionInfo) -> frozenset[int] | None:
        """The cores a new engine of `version` runs on; None leaves the placement to vLLM.

        On CPU hosts every process of an engine runs on cores of its own (why and how the
        cores are chosen: `turnout.cpu_cores`), picked from this worker's cores beside the
        cores the host's running engines are allowed on, read back from their processes.
        GPU hosts, and an operator who binds engines with VLLM_CPU_OMP_THREADS_BIND, get
        no partition.
        """
        if self._capacity is None:
            self._capacity = await asyncio.to_thread(detect_capacity, self.settings)
        if self._capacity.gpus or OMP_BIND_ENV in os.environ:
            return None
        host_cores = os.sched_getaffinity(0)
        state = await read_fleet(self.store)
        engines: list[EngineCores] = []
        for e in state.engines:
            if e.host != self.host or e.external or not self._alive(e.pid, e.port):
                continue
            cores = await asyncio.to_thread(engine_cpus, e.pid)  # type: ignore[arg-type]
            if cores is None:
                continue
            # A starting engine loads as hard as a serving one works; cached ones idle.
            busy = (e.state is not EngineState.READY
                    or state.role(e.model_id, e.version) not in CACHED_ROLES)
            engines.append(EngineCores(cores, busy))
        pick = pick_cores(host_cores, engines, want=cores_per_engine(
            len(host_cores), self.settings.engine_cpu_cores))
        if pick.shared:
            _logger().warning(
                "%s:%s shares cpus %s with a busy engine: host %s has %d cores, and busy "
                "engines use cpus %s (set engine_cpu_cores to give engines fewer cores)",
                version.model_id, version.version, format_cpu_list(pick.shared), self.host,
                len(host_cores), format_cpu_list(
                    core for e in engines if e.busy for core in e.cores))
        return pick.cores

    def _log_path(self, model_id: str, version: str) -> Path:
        # The host too: engine workers of several hosts may share a state dir (tests).
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{model_id}-{version}-{self.host}")
        return Path(self.settings.state_dir).expanduser() / "engines" / f"{safe}.log"

    async def _spawn(self, version: VersionInfo, model_dir: str, name: str,
                     flags: list[str]) -> tuple[EngineInfo, Path]:
        """Start a vLLM server in a new session and record it as STARTING."""
        s = self.settings
        log_path = self._log_path(version.model_id, version.version)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        async with self._spawn_lock:
            port = await self._free_port()
            cores = await self._engine_cores(version)
            env = self._engine_env(omp_threads_bind(
                cores, worker_ranks(version.config.engine_args)) if cores else None)
            on_cpus = f" on cpus {format_cpu_list(cores)}" if cores else ""
            sleep_flags, sleep_env = sleep_mode_launch(self._sleep_mode)
            env.update(sleep_env)
            argv = [s.engine_python or sys.executable, "-m", API_SERVER_MODULE,
                    "--model", model_dir, "--served-model-name", name,
                    "--host", s.engine_bind_host, "--port", str(port), *flags, *sleep_flags]
            with log_path.open("ab") as log_file:
                log_file.write(f"\n=== {datetime.now(UTC).isoformat()} turnout starts"
                               f"{on_cpus}: {' '.join(argv)}\n".encode())
                log_file.flush()
                # fork/exec off the event loop; a new session so we can kill the group
                # and so the engine outlives this worker.
                proc = await asyncio.to_thread(
                    _popen_on_cores, cores, argv, stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self._children[proc.pid] = proc
            # Before the record is written (the store may be slow or away): a retried
            # attempt adopts this process rather than starting a second one.
            _heartbeat({"pid": proc.pid, "port": port, "phase": "started"})
            engine = EngineInfo(model_id=version.model_id, version=version.version,
                                host=self.host, url=self._url(port),
                                served_model_name=name, port=port, pid=proc.pid,
                                state=EngineState.STARTING, log_path=str(log_path),
                                started_at=datetime.now(UTC))
            try:
                await self.store.save_engine(engine)
            except BaseException:
                await self._stop(proc.pid, port, grace_s=0)
                raise
        _logger().info("started engine %s:%s pid=%s port=%s cpus=%s log=%s",
                       version.model_id, version.version, proc.pid, port,
                       format_cpu_list(cores) if cores else "any", log_path)
        return engine, log_path

    def _engine_env(self, omp_bind: str | None = None) -> dict[str, str]:
        """An engine's environment: the allowlisted part of this worker's (no turnout
        setting, no credential), and what turnout sets unless the operator did.

        `omp_bind` (an engine's own cores, on CPU hosts) keeps vLLM's OpenMP threads on
        the cores the engine was started on: vLLM would otherwise bind them by itself,
        every engine of a host from the same first cores.
        """
        s = self.settings
        defaults = {"VLLM_CPU_KVCACHE_SPACE": _gib(s.engine_kv_cache_gib),
                    "PYTHONUNBUFFERED": "1"}
        if omp_bind is not None:
            defaults[OMP_BIND_ENV] = omp_bind
        env = engine_environment(os.environ, defaults, passthrough=s.engine_env_passthrough,
                                 denied=s.endpoint_credential_envs)
        env[ENGINE_HOST_ENV] = self.host
        return env

    async def _finish_start(self, engine: EngineInfo, log_path: Path) -> EngineInfo:
        """Wait for /health, warm up, mark READY; on any failure or cancel, kill and forget."""
        try:
            await self._wait_ready(engine, log_path)
            await self._warm_up(engine)
            engine = engine.model_copy(update={"state": EngineState.READY})
            await self.store.save_engine(engine)
        except BaseException as exc:
            _logger().warning("engine %s:%s pid=%s did not start (%s): stopping it",
                              engine.model_id, engine.version, engine.pid,
                              type(exc).__name__)
            await asyncio.shield(self._discard(engine))
            raise
        _logger().info("engine %s:%s ready at %s (pid %s)", engine.model_id, engine.version,
                       engine.url, engine.pid)
        return engine

    async def _discard(self, engine: EngineInfo) -> None:
        await self._stop(engine.pid, engine.port, grace_s=0)
        await self.store.delete_engine(engine.model_id, engine.version, self.host)

    async def _wait_ready(self, engine: EngineInfo, log_path: Path) -> None:
        """Poll /health until it answers 200; fail at once if the engine exits, when it
        stops making progress (`engine_stall_timeout_s`: no new log line, no /health
        answer), and at `engine_startup_timeout_s` in any case."""
        s = self.settings
        started = time.monotonic()
        deadline = started + s.engine_startup_timeout_s
        watch = StallWatch(s.engine_stall_timeout_s, now=started,
                           log_size=await asyncio.to_thread(log_size, log_path))
        details = {"pid": engine.pid, "port": engine.port, "phase": "starting"}
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if not self._alive(engine.pid, engine.port):
                    code = self._exit_code(engine.pid)
                    raise ApplicationError(
                        f"engine for {engine.model_id}:{engine.version} exited before it was "
                        f"ready (exit code {code}): {log_error_line(log_path)} "
                        f"[log: {log_path}]",
                        non_retryable=True, type=ENGINE_EXITED)
                answered = False
                try:
                    status = (await client.get(f"{engine.url}/health")).status_code
                    if status == 200:
                        _logger().info("engine %s:%s healthy after %.1f s", engine.model_id,
                                       engine.version, time.monotonic() - started)
                        return
                    answered = True
                except httpx.HTTPError:
                    pass
                now = time.monotonic()
                if watch.observe(now, log_size=await asyncio.to_thread(log_size, log_path),
                                 answered=answered):
                    raise ApplicationError(
                        f"engine for {engine.model_id}:{engine.version} made no progress for "
                        f"{watch.silent_for(now):.0f} s (no new log line, no /health answer) "
                        f"after {now - started:.0f} s of starting; its log ends: "
                        f"{log_last_lines(log_path)} [log: {log_path}]",
                        non_retryable=True, type=ENGINE_STALLED)
                if now > deadline:
                    raise ApplicationError(
                        f"engine for {engine.model_id}:{engine.version} not ready after "
                        f"{self.settings.engine_startup_timeout_s:.0f} s [log: {log_path}]",
                        non_retryable=True, type=ENGINE_START_TIMEOUT)
                _heartbeat(details)
                await asyncio.sleep(POLL_INTERVAL_S)

    async def _warm_up(self, engine: EngineInfo) -> None:
        """One tiny completion, so the first real request does not pay for lazy setup."""
        body = {"model": engine.served_model_name, "prompt": "hello", "max_tokens": 4}
        details = {"pid": engine.pid, "port": engine.port, "phase": "warming_up"}
        try:
            async with httpx.AsyncClient(timeout=300.0) as client:
                request = asyncio.ensure_future(
                    client.post(f"{engine.url}/v1/completions", json=body))
                try:
                    # Keep heartbeating: a big model's first completion may take a while.
                    while not request.done():
                        await asyncio.wait([request], timeout=POLL_INTERVAL_S)
                        _heartbeat(details)
                finally:
                    request.cancel()
                resp = request.result()
        except httpx.HTTPError as exc:
            raise ApplicationError(f"warm-up request to {engine.url} failed: {exc!r}",
                                   non_retryable=True, type=ENGINE_WARMUP_FAILED) from None
        if resp.status_code != 200:
            raise ApplicationError(
                f"warm-up request to {engine.url} answered "
                f"{answer_summary(resp.status_code, resp.headers.get('content-type'), resp.text)}",
                non_retryable=True, type=ENGINE_WARMUP_FAILED)

    async def _free_port(self) -> int:
        s = self.settings
        taken = {e.port for e in await self.store.list_engines(host=self.host) if e.port}
        for port in range(s.engine_port_start, s.engine_port_end + 1):
            if port not in taken and port_free(s.engine_bind_host, port):
                return port
        raise ApplicationError(
            f"no free engine port in {s.engine_port_start}-{s.engine_port_end} on {self.host}",
            non_retryable=False, type=NO_FREE_PORT)

    async def _healthy(self, url: str) -> bool:
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                return (await client.get(f"{url}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    # ------------------------------------------------------------------ processes

    def _alive(self, pid: int | None, port: int | None) -> bool:
        child = self._children.get(pid) if pid else None
        if child is not None:
            return child.poll() is None  # also reaps it, so it never lingers as a zombie
        return is_engine_process(pid, port)

    def _exit_code(self, pid: int | None) -> int | None:
        child = self._children.get(pid) if pid else None
        return child.poll() if child is not None else None

    async def _stop(self, pid: int | None, port: int | None, *, grace_s: float) -> None:
        """SIGTERM the engine's process group, wait up to `grace_s`, then SIGKILL it.

        Returns once the group is empty (or after 10 s more), so callers may assume the
        port and memory are free again.
        """
        if not pid:
            return
        if not self._alive(pid, port):
            self._children.pop(pid, None)
            return
        # Ours (start_new_session) lead their own group; anything else only gets kill(pid).
        group = pid in self._children or _group_leader(pid)
        details = {"pid": pid, "port": port, "phase": "stopping"}
        if grace_s > 0:
            _signal(pid, signal.SIGTERM, group)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if not self._alive(pid, port):
                    break
                _heartbeat(details)
                await asyncio.sleep(POLL_INTERVAL_S)
        # SIGKILL the group even if the leader left: vLLM's children may linger.
        _signal(pid, signal.SIGKILL, group)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self._alive(pid, port) and not (group and _group_exists(pid)):
                break
            await asyncio.sleep(0.1)
        self._children.pop(pid, None)

    @contextlib.asynccontextmanager
    async def _locked(self, model_id: str, version: str) -> AsyncIterator[None]:
        """Serialise loads/unloads of one version in this worker, heartbeating while waiting.

        Two workflows may ask for the same version at once; the second must find the first's
        engine rather than start another.
        """
        lock = self._locks.setdefault((model_id, version), asyncio.Lock())
        while lock.locked():
            _heartbeat({"phase": "waiting"})
            await asyncio.sleep(POLL_INTERVAL_S)
        await lock.acquire()  # free now: acquired without suspending
        try:
            yield
        finally:
            lock.release()


def engine_cpus(pid: int) -> frozenset[int] | None:
    """The cores an engine's processes may run on, read back from the kernel: the union of
    `Cpus_allowed_list` over every thread of the API server and of its children (vLLM's
    engine core and workers). None if the process is gone."""
    try:
        root = psutil.Process(pid)
        pids = [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return None
    cores: set[int] = set()
    for each in pids:
        cores |= process_cpus(each)
    return frozenset(cores) or None


def process_cpus(pid: int) -> frozenset[int]:
    """The cores any thread of one process may run on (empty if it is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return frozenset()
    cores: set[int] = set()
    for tid in tasks:
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                with contextlib.suppress(ValueError):
                    cores |= parse_cpu_list(line.split(":", 1)[1])
                break
    return frozenset(cores)


def _popen_on_cores(cores: frozenset[int] | None, argv: list[str],
                    **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start `argv` with its CPU affinity set to `cores`, as `taskset` would.

    The calling thread (one of asyncio's worker threads) narrows its own affinity, forks,
    and restores it: the child, and every process and thread it starts, inherits the mask
    from the first instruction on. (A `preexec_fn` would do it in the child, which is not
    safe in a process with threads; setting it after the start would race with the
    threads the child starts.)
    """
    if not cores:
        return subprocess.Popen(argv, **kwargs)
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cores)
    except OSError as exc:
        _logger().warning("cannot set CPU affinity %s (%s): starting unpinned",
                          format_cpu_list(cores), exc)
        return subprocess.Popen(argv, **kwargs)
    try:
        return subprocess.Popen(argv, **kwargs)
    finally:
        os.sched_setaffinity(0, before)


def _gib(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pid: int, sig: signal.Signals, group: bool) -> None:
    """Signal the whole session vLLM runs in (its pgid is its pid), or just `pid`."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
