"""A real PostgreSQL server for a test session (or a benchmark), from the installed binaries.

`make test` runs the store, API and control-plane tests on SQLite and on PostgreSQL; this
starts the PostgreSQL they use: `initdb` into a temporary directory, `pg_ctl start` on a
free local port, a password-protected role, one fresh database per test. The server
refuses to run as root, so under root (CI containers, these machines) it runs as the
`postgres` user the Debian package creates (or `nobody`). Nothing here ever skips: a
server that cannot start is an error naming why, and the tests that need it fail with it.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from tests.support import free_port
from turnout.runtime import parent_death_signal

# Debian installs the server binaries beside each other, outside PATH.
_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")
_USER = "turnout"
# The server's own zone is not UTC, so a time written or compared without its zone would
# show up as hours off in the tests.
SERVER_TIMEZONE = "America/New_York"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found or started (the message says why and what to do)."""


def _bin_dir() -> Path:
    for pattern in _BIN_GLOBS:
        for found in sorted(glob.glob(pattern), reverse=True):  # the newest version first
            if (Path(found) / "pg_ctl").exists() and (Path(found) / "initdb").exists():
                return Path(found)
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    raise PostgresUnavailable(
        "PostgreSQL's initdb and pg_ctl were not found (looked in "
        f"{', '.join(_BIN_GLOBS)} and PATH): install Debian's `postgresql` package "
        "(`apt-get install -y postgresql`; .ci/run does this)")


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (this user) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and neither a `postgres` nor a `nobody` user "
                              "exists to run the PostgreSQL server as")


@dataclass
class PostgresServer:
    """One running server; `url(db)` is an asyncpg URL, `create_database()` a fresh one."""

    root: Path
    port: int
    password: str
    bin_dir: Path
    user: pwd.struct_passwd | None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _as_user(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        # Nothing of the test run's settings (VLLM_MODEL_SWITCHING_*, PG*) reaches the server.
        return {**{k: v for k, v in os.environ.items()
                   if not k.startswith(("PG", "VLLM_MODEL_SWITCHING_"))},
                "PGPASSWORD": self.password, "LC_ALL": "C"}

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=self._env(), cwd=self.root, check=False, **self._as_user())

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = self._run(str(self.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                         "-h", "127.0.0.1", "-p", str(self.port), "-U", _USER, "-d", database,
                         "-Atc", sql)
        if done.returncode != 0:
            raise PostgresUnavailable(f"psql {sql!r} failed: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database (no schema); its asyncpg URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """End the server (immediately: nothing of a test database is kept) and its files."""
        self._end(signal.SIGQUIT)
        shutil.rmtree(self.root, ignore_errors=True)

    def pause(self) -> None:
        """Stop the server, keeping its data (a store outage); `resume()` starts it again."""
        self._end(signal.SIGINT)  # PostgreSQL's fast shutdown: clients are disconnected

    def resume(self) -> None:
        self._start()

    def _end(self, sig: int) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(sig)
        try:
            self._process.wait(60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)

    def _start(self) -> None:
        """Run the postmaster as a child of this process that dies with it (a killed test
        run leaves no server behind), and wait until it takes connections."""
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir),
                "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
                "-c", f"unix_socket_directories={self.root}", "-c", "max_connections=300",
                # A test server: durability across an OS crash is not what is tested, and
                # fsyncs on a shared CI disk would dominate the run.
                "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", f"timezone={SERVER_TIMEZONE}"]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root, env=self._env(), preexec_fn=parent_death_signal(signal.SIGQUIT),
                **self._as_user())
        finally:
            log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited with {self._process.returncode} at start:\n"
                    f"{self._log_tail()}")
            done = self._run(str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1",
                             "-p", str(self.port), "-U", _USER)
            if done.returncode == 0:
                return
            time.sleep(0.1)
        self._end(signal.SIGQUIT)
        raise PostgresUnavailable(f"postgres did not take connections within 60 s:\n"
                                  f"{self._log_tail()}")

    def _log_tail(self) -> str:
        log = self.root / "server.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def start_postgres() -> PostgresServer:
    """Initialise and start a server in a new temporary directory (blocking, a few seconds).
    Call it from the main thread: the server ends with the thread that started it."""
    bin_dir = _bin_dir()
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="turnout-pg-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    server = PostgresServer(root=root, port=free_port(), password=secrets.token_urlsafe(16),
                            bin_dir=bin_dir, user=user)
    pwfile = root / "pwfile"
    pwfile.write_text(server.password + "\n")
    if user is not None:
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    try:
        done = server._run(str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", _USER,
                           "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                           "--no-sync", "--locale=C")
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({done.returncode}): "
                                      f"{done.stderr.strip() or done.stdout.strip()}")
        pwfile.unlink()
        server._start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


@asynccontextmanager
async def writes_blocked(database_url: str, tables: str = "operations"
                         ) -> AsyncIterator[None]:
    """Hold a lock on the operations table (or `tables`, comma-separated) that lets reads
    through but blocks every insert and update until the block ends: the store stalls
    those writes (the chaos tests' window between two steps of a process)."""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://",
                                                      "postgresql://", 1))
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {tables} IN SHARE ROW EXCLUSIVE MODE")
            yield
            # Leaving the block commits the transaction (it wrote nothing): the lock ends.
    finally:
        await conn.close()
