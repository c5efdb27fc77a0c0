"""The whole stack on one machine: Temporal dev server, workers, gateway and API.

`make run` (or `turnout up`) runs `python -m workers.stack`; the end-to-end tests use the
same `Stack` class so that what is tested is what users run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from turnout.config import ModelSwitchingConfig, redact_url
from turnout.environments import TEMPORAL, process_environment, role_of, settings_environment
from turnout.runtime import installed_binary, port_free, setup_logging
from turnout.store import Store, upgrade

log = logging.getLogger("turnout.stack")

SEARCH_ATTRIBUTES = {
    "TurnoutModelId": "Keyword",
    "TurnoutTargetVersion": "Keyword",
    "TurnoutStrategy": "Keyword",
    "TurnoutPhase": "Keyword",
    "TurnoutTrafficPercent": "Int",
}


def settings_env(settings: ModelSwitchingConfig) -> dict[str, str]:
    """The environment that gives another process exactly these settings (all of them)."""
    return settings_environment(settings)


@dataclass
class Process:
    name: str
    argv: list[str]
    log_path: Path
    # What kind of process it is (`turnout.environments.ROLES`): decides which secrets its
    # environment holds. None: an unknown command, given no secret.
    role: str | None = None
    # Variables of this process only, over the role's (a second engine worker's host id).
    env: Mapping[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


# The processes every stack runs; `add_process` may add more.
_CORE = ("temporal", "control-worker", "engine-worker", "gateway", "api")
# How long stopping the engines may take before the stack gives up on them (a hung store).
_STOP_ENGINES_S = 120


class StackConflict(RuntimeError):
    """Another stack runs from this state directory, or a port of this one is taken."""


def dies_with_launcher(argv: list[str]) -> list[str]:
    """`argv` run so that it gets SIGTERM when the launcher's thread that started it ends,
    however it ends (SIGKILL, a terminal closed hard): Linux's parent-death signal, set by
    util-linux's `setpriv` before it execs the command (same pid, nothing left between).
    Without `setpriv` (not Linux) the command runs as given."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


@dataclass
class Stack:
    """Starts, watches and stops the processes of a local turnout deployment."""

    settings: ModelSwitchingConfig
    temporal_db: Path
    log_dir: Path
    temporal_ui_port: int = 8233
    headless: bool = False
    # Added to every process's environment, as given (no filtering: the caller decides).
    extra_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The environment the processes inherit from (filtered per process); None: os.environ.
    # Out of the repr, like the settings' secrets: it may hold credentials.
    base_env: Mapping[str, str] | None = field(default=None, repr=False)
    processes: dict[str, Process] = field(default_factory=dict)
    _started_at: datetime = field(default_factory=lambda: datetime.now(UTC), init=False,
                                  repr=False)
    _lock: Any = field(default=None, init=False, repr=False)  # the state dir's lock file
    _made_admin_token: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.settings.gateway_admin_token:
            # Gateway admin endpoints always want a token; a local stack makes its own, hands
            # it to the gateway and the control worker through their environment, and keeps
            # it (owner-only) for the operator once it holds its state directory (`claim`).
            token = secrets.token_urlsafe(24)
            self.settings = self.settings.model_copy(update={"gateway_admin_token": token})
            self._made_admin_token = True
        python = sys.executable
        host, _, port = self.settings.temporal_address.rpartition(":")
        temporal = [installed_binary("temporal"),
                    "server", "start-dev", "--db-filename", str(self.temporal_db),
                    "--ip", host or "127.0.0.1", "--port", port, "--log-level", "warn",
                    "--ui-port", str(self.temporal_ui_port),
                    # WAL with synchronous=NORMAL: a killed process loses nothing (the WAL is
                    # in the OS cache) and each commit stops waiting for an fsync, which was
                    # the dev server's bottleneck with hundreds of running switches. Only an
                    # OS crash can lose the last commits; production runs on PostgreSQL.
                    "--sqlite-pragma", "journal_mode=wal",
                    "--sqlite-pragma", "synchronous=normal"]
        if self.headless:
            temporal.append("--headless")
        for name, kind in SEARCH_ATTRIBUTES.items():
            temporal += ["--search-attribute", f"{name}={kind}"]
        commands = {
            "temporal": temporal,
            "control-worker": [python, "-m", "workers.control"],
            "engine-worker": [python, "-m", "workers.engine"],
            "gateway": [python, "-m", "gateway"],
            "api": [python, "-m", "api"],
        }
        if not self.settings.monitors_on_control_worker:
            commands["monitor-worker"] = [python, "-m", "workers.monitor"]
        self.processes = {name: Process(name, argv, self.log_dir / f"{name}.log",
                                        role=TEMPORAL if name == "temporal" else name)
                          for name, argv in commands.items()}

    def environment(self, name: str) -> dict[str, str]:
        """The environment process `name` starts with: only the secrets its role needs
        (`turnout.environments.process_environment`), then `extra_env`."""
        parent = os.environ if self.base_env is None else self.base_env
        process = self.processes[name]
        return {**process_environment(process.role or "", parent, self.settings),
                **self.extra_env, **process.env}

    @property
    def admin_token_path(self) -> Path:
        return Path(self.settings.state_dir) / "gateway-admin-token"

    @property
    def gateway_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway_admin_port}"

    @property
    def api_url(self) -> str:
        return self.settings.resolved_api_url

    @property
    def gateway_url(self) -> str:
        host = "127.0.0.1" if self.settings.gateway_host in ("0.0.0.0", "") \
            else self.settings.gateway_host
        return f"http://{host}:{self.settings.gateway_port}"

    @property
    def lock_path(self) -> Path:
        return Path(self.settings.state_dir) / "stack.lock"

    def claim(self) -> None:
        """Hold this state directory's lock for as long as the stack runs (a second stack
        on it says so at once, `StackConflict`, instead of meeting the first one's servers
        or overwriting its admin token), then write the admin token file.

        The lock is the kernel's (`flock`): it goes with the process holding it, so a stack
        killed with SIGKILL leaves nothing to clean up; its servers end with it
        (`dies_with_launcher`), its engines are adopted by the next stack's engine worker.
        """
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.lock_path.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise StackConflict(
                f"another turnout stack (pid {holder}) runs from {self.settings.state_dir}: "
                f"stop it first (Ctrl-C in its terminal, or kill {holder}), or give this "
                "one another --state-dir and other ports") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock
        if self._made_admin_token:
            path, token = self.admin_token_path, self.settings.gateway_admin_token or ""
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(token + "\n")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the last descriptor releases the flock
            self._lock = None

    def check_ports(self) -> None:
        """`StackConflict` naming the first of this stack's ports that is taken."""
        s = self.settings
        host, _, port = s.temporal_address.rpartition(":")
        ports = [("temporal", "TEMPORAL_ADDRESS", host or "127.0.0.1", int(port)),
                 ("gateway", "GATEWAY_PORT", s.gateway_host or "127.0.0.1", s.gateway_port),
                 ("gateway admin", "GATEWAY_ADMIN_PORT", s.gateway_admin_host,
                  s.gateway_admin_port),
                 ("api", "API_PORT", s.api_host, s.api_port)]
        if not self.headless:
            ports.append(("Temporal Web UI", "--ui-port", host or "127.0.0.1",
                          self.temporal_ui_port))
        for name, setting, bind_host, number in ports:
            if not port_free(bind_host, number, reuse_address=True):
                where = setting if setting.startswith("--") \
                    else ModelSwitchingConfig.env_name(setting.lower())
                raise StackConflict(
                    f"port {number} ({name}) is already in use: another turnout stack or "
                    f"another server holds it; stop it, or set {where}")

    async def start(self) -> None:
        self._started_at = datetime.now(UTC)
        if self._lock is None:
            self.claim()
        self.check_ports()
        self.temporal_db.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(upgrade, self.settings.database_url)
        self.start_process("temporal")
        await self.wait_for_port(self.settings.temporal_address, "temporal")
        for name in ("control-worker", "monitor-worker", "engine-worker", "gateway", "api"):
            if name in self.processes:  # a monitor worker only with a queue of its own
                self.start_process(name)
        await self.wait_for_http(f"{self.gateway_url}/health", "gateway")
        await self.wait_for_http(f"{self.api_url}/healthz", "api", headers=self._api_headers)
        await self.wait_for_engine_host()

    async def wait_for_engine_host(self, timeout_s: float = 90) -> None:
        """Until the engine worker has claimed its host and heartbeats: before that, a
        switch would find no host to load on."""
        deadline = time.monotonic() + timeout_s
        store = Store.from_url(self.settings.database_url)
        try:
            while True:
                self._check_alive("engine-worker")
                hosts = {h.host_id: h for h in await store.list_hosts()}
                host = hosts.get(self.settings.engine_host)
                if host is not None and host.started_at is not None and host.last_seen and \
                        host.last_seen >= self._started_at:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the engine worker did not claim host {self.settings.engine_host} "
                        f"in {timeout_s:g}s; see {self.processes['engine-worker'].log_path}")
                await asyncio.sleep(0.2)
        finally:
            await store.close()

    def start_process(self, name: str) -> None:
        process = self.processes[name]
        if process.running:
            return
        logfile = process.log_path.open("ab")
        process.popen = subprocess.Popen(dies_with_launcher(process.argv),
                                         env=self.environment(name),
                                         stdout=logfile, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        logfile.close()
        log.info("started %s (pid %d), log %s", name, process.popen.pid, process.log_path)

    def add_process(self, name: str, argv: list[str], role: str | None = None,
                    env: Mapping[str, str] | None = None) -> None:
        """Another process of this deployment (a second gateway, say); `stop` ends it too.

        Its environment is that of its `role`, by default the role of the `python -m`
        module it runs (a second gateway gets what the gateway gets), with `env` over it
        (a second engine worker's `VLLM_MODEL_SWITCHING_ENGINE_HOST`, say).
        """
        self.processes[name] = Process(name, argv, self.log_dir / f"{name}.log",
                                       role=role or role_of(argv), env=dict(env or {}))

    def signal_process(self, name: str, sig: int) -> None:
        """Send a signal to one process group without waiting (SIGSTOP/SIGCONT freeze it)."""
        process = self.processes[name]
        if process.running and process.popen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, sig)

    def kill_process(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one process and wait for it to exit (SIGKILL simulates a crash)."""
        process = self.processes[name]
        self.signal_process(name, sig)
        if process.popen:
            process.popen.wait(timeout=30)

    async def stop(self, *, stop_engines: bool = True) -> None:
        """Stop in reverse order of dependence, then the engines this stack started."""
        extra = [name for name in self.processes if name not in _CORE]
        try:
            for name in (*extra, "api", "gateway", "control-worker", "engine-worker"):
                await asyncio.to_thread(self._terminate, name)
            if stop_engines:
                try:
                    await asyncio.wait_for(self.stop_engines(), _STOP_ENGINES_S)
                except TimeoutError:
                    log.error("stopping the engines took over %ds; left running (see `turnout "
                              "engines`; the next stack adopts them)", _STOP_ENGINES_S)
            await asyncio.to_thread(self._terminate, "temporal")
        finally:
            self.release()

    async def stop_engines(self) -> None:
        from activities.engines import EngineActivities

        store = Store.from_url(self.settings.database_url)
        try:
            # Every host's: a local stack may run several engine workers on this machine.
            hosts = {e.host for e in await store.list_engines() if not e.external}
            stopped = 0
            for host in sorted(hosts | {self.settings.engine_host}):
                settings = self.settings.model_copy(update={"engine_host": host})
                stopped += len(await EngineActivities(settings, store).stop_all())
            if stopped:
                log.info("stopped %d engine(s)", stopped)
        finally:
            await store.close()

    def _terminate(self, name: str, grace_s: float = 15) -> None:
        process = self.processes[name]
        if not process.running or process.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.popen.pid, signal.SIGCONT)  # a frozen process cannot exit
            os.killpg(process.popen.pid, signal.SIGTERM)
        try:
            process.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %gs; killing it", name, grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGKILL)
            try:
                process.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:  # stuck in the kernel: not waited for forever
                log.error("%s (pid %d) did not end after SIGKILL; left behind", name,
                          process.popen.pid)

    async def wait_for_port(self, address: str, name: str, timeout_s: float = 60) -> None:
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive(name)
            try:
                _, writer = await asyncio.open_connection(host or "127.0.0.1", int(port))
                writer.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not open {address} in {timeout_s:g}s; "
                                       f"see {self.processes[name].log_path}") from None
                await asyncio.sleep(0.2)

    @property
    def _api_headers(self) -> dict[str, str]:
        """The key to the API when authentication is on (the launcher holds every setting)."""
        s = self.settings
        return {"Authorization": f"Bearer {s.api_key}"} \
            if s.enable_authentication and s.api_key else {}

    async def wait_for_http(self, url: str, name: str, timeout_s: float = 90,
                            headers: Mapping[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2, headers=headers) as client:
            while True:
                self._check_alive(name)
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not answering at {url} after {timeout_s:g}s; "
                                       f"see {self.processes[name].log_path}")
                await asyncio.sleep(0.2)

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.popen is not None and process.popen.poll() is not None:
            tail = process.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with code {process.popen.returncode}:\n{tail}")


def default_stack(root: Path, **overrides: Any) -> Stack:
    defaults: dict[str, Any] = {"state_dir": str(root)}
    if ModelSwitchingConfig.env_name("database_url") not in os.environ:
        defaults["database_url"] = f"sqlite+aiosqlite:///{root}/turnout.db"
    settings = ModelSwitchingConfig.from_env(**{**defaults, **overrides})
    return Stack(settings=settings, temporal_db=root / "temporal.db", log_dir=root / "logs")


async def _run(args: argparse.Namespace) -> int:
    from turnout.tinymodels import ensure_tiny_models

    root = args.state_dir
    stack = default_stack(root)
    stack.temporal_ui_port = args.ui_port
    try:
        stack.claim()
        stack.check_ports()
    except StackConflict as exc:
        stack.release()
        log.error("%s", exc)
        return 1
    models = await asyncio.to_thread(ensure_tiny_models, root / "models")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal was closed; the servers would end with us anyway, but cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stack.start()
        _print_banner(stack, models)
        while not stop.is_set():
            for process in stack.processes.values():
                if not process.running:
                    log.error("%s exited; see %s", process.name, process.log_path)
                    stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1)
    finally:
        print("\nstopping turnout ...", flush=True)
        await stack.stop()
        print("stopped.", flush=True)
    return 0


def _print_banner(stack: Stack, models: dict[str, Path]) -> None:
    api, gw = stack.api_url, stack.gateway_url
    v1, v2 = models.get("tiny-v1"), models.get("tiny-v2")
    # The key's variable, never its value: the banner ends up in terminals and logs.
    auth = ("\n  authentication   on: add -H \"Authorization: Bearer "
            "$VLLM_MODEL_SWITCHING_API_KEY\" to the API calls below"
            if stack.settings.enable_authentication else "")
    print(f"""
turnout is running (Ctrl-C stops everything)
  REST API         {api}   (OpenAPI docs: {api}/docs)
  gateway          {gw}   (OpenAI-compatible: {gw}/v1)
  gateway admin    {stack.gateway_admin_url}/admin/state
                   (bearer token: {stack.admin_token_path})
  Temporal Web UI  http://localhost:{stack.temporal_ui_port}
  store            {redact_url(stack.settings.database_url)}
  logs             {stack.log_dir}{auth}

Try it with the two tiny model versions made for you:
  curl -X POST {api}/models -H 'Content-Type: application/json' \\
    -d '{{"model": "{v1}", "model_arch": "TinyLlama", "model_stage": "chat", "version": "v1"}}'
  curl -X POST {api}/models -H 'Content-Type: application/json' \\
    -d '{{"model": "{v2}", "model_arch": "TinyLlama", "model_stage": "chat", "version": "v2"}}'
  curl -X POST {api}/switch -H 'Content-Type: application/json' \\
    -d '{{"model_id": "TinyLlama_chat", "target_version": "v1", "strategy": "immediate"}}'
  curl {api}/switch/operations/<operation_id>
  curl {gw}/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "TinyLlama_chat", "prompt": "Hello", "max_tokens": 8}}'
""", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.stack",
                                     description="Run the whole turnout stack locally.")
    parser.add_argument("--state-dir", default=os.environ.get(
        "VLLM_MODEL_SWITCHING_STATE_DIR", ".turnout"))
    parser.add_argument("--ui-port", type=int, default=8233)
    args = parser.parse_args()
    args.state_dir = Path(args.state_dir).resolve()
    setup_logging(os.environ.get("TURNOUT_LOG_LEVEL", "INFO"))
    sys.exit(asyncio.run(_run(args)))


if __name__ == "__main__":
    main()
