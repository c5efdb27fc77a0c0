"""`make run` cleans up after itself: `python -m workers.stack` run as users run it, killed
as terminals and OOM killers kill it.

Its own ports (263xx), apart from the other e2e modules and from `make run`'s defaults.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from turnout.runtime import port_free

PORTS = {"TEMPORAL_ADDRESS": "127.0.0.1:26333", "API_PORT": "26301",
         "GATEWAY_PORT": "26300", "GATEWAY_ADMIN_PORT": "26302",
         "ENGINE_PORT_START": "26310", "ENGINE_PORT_END": "26319"}
UI_PORT = 26334
LISTENING = (26333, 26301, 26300, 26302, UI_PORT)


def launcher_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODEL_SWITCHING_")}
    env.update({f"VLLM_MODEL_SWITCHING_{k}": v for k, v in PORTS.items()})
    return env


class Launcher:
    """`make run`'s command (or `turnout up`, which runs it in its place), in a session of
    its own like a terminal's foreground job; its output in a file (a pipe nobody reads
    would block it)."""

    def __init__(self, state_dir: Path, *, cli: bool = False) -> None:
        self.out_path = state_dir.parent / f"launcher-{time.monotonic_ns()}.out"
        command = ["turnout.client.cli", "up"] if cli else ["workers.stack"]
        with self.out_path.open("w") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", *command, "--state-dir", str(state_dir),
                 "--ui-port", str(UI_PORT)],
                env=launcher_env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.pid = self.popen.pid

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.2)


def api_ready() -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{PORTS['API_PORT']}/healthz",
                         timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def children(pid: int) -> set[int]:
    """Processes whose parent is `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def state_dir(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[Path]:
    root = tmp_path / "state"
    for name, path in tiny_models.items():  # made once per session, not per stack
        shutil.copytree(path, root / "models" / name)
    yield root


def started(state_dir: Path, *, cli: bool = False) -> Launcher:
    launcher = Launcher(state_dir, cli=cli)
    try:
        wait_until(lambda: api_ready() or launcher.popen.poll() is not None, 120, "the API")
    except AssertionError:
        launcher.popen.kill()
        raise
    assert launcher.popen.poll() is None, launcher.output[-3000:]
    return launcher


def stop(launcher: Launcher) -> int:
    """Ctrl-C, as a user stops it: its exit code."""
    if launcher.popen.poll() is None:
        launcher.popen.send_signal(signal.SIGINT)
    return launcher.wait(120)


def test_a_stack_killed_hard_leaves_nothing_running_and_the_next_one_starts(
        state_dir: Path) -> None:
    launcher = started(state_dir, cli=True)  # `turnout up`: the same process, exec'ed
    try:
        servers = children(launcher.pid)
        # Temporal, the control and engine workers, the gateway and the API.
        assert len(servers) >= 5, servers
        launcher.popen.kill()  # SIGKILL: no handler runs, no stop()
        launcher.wait(10)
        wait_until(lambda: not any(alive(p) for p in servers), 60,
                   f"the servers {sorted(p for p in servers if alive(p))} to end")
        wait_until(lambda: all(port_free("127.0.0.1", p, reuse_address=True)
                               for p in LISTENING), 30, "the ports to be free")
    finally:
        if launcher.popen.poll() is None:
            launcher.popen.kill()
    again = started(state_dir)
    assert stop(again) == 0, again.output[-3000:]
    assert "stopped." in again.output


def test_a_second_stack_says_what_is_in_its_way(state_dir: Path, tmp_path: Path) -> None:
    first = started(state_dir)
    try:
        servers = children(first.pid)
        token = (state_dir / "gateway-admin-token").read_text()
        same_dir = Launcher(state_dir)
        assert same_dir.wait(60) == 1, same_dir.output[-3000:]
        assert f"another turnout stack (pid {first.pid}) runs from" in same_dir.output
        assert (state_dir / "gateway-admin-token").read_text() == token  # the first one's
        other = tmp_path / "other"
        same_ports = Launcher(other)
        assert same_ports.wait(60) == 1, same_ports.output[-3000:]
        assert "port 26333 (temporal) is already in use" in same_ports.output
        assert "VLLM_MODEL_SWITCHING_TEMPORAL_ADDRESS" in same_ports.output
        assert not (other / "temporal.db").exists()  # nothing was started
        assert all(alive(p) for p in servers) and api_ready()  # the first one is untouched
    finally:
        code = stop(first)
    assert code == 0, first.output[-3000:]
    assert not any(alive(p) for p in servers)
