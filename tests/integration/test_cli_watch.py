"""`turnout ... --watch` against a real running canary (the `plane` fixture: real Temporal
dev server, workers, store, gateway and API; fake external engines under real traffic):
run in a pseudo-terminal as an operator runs it, the view is redrawn as weights and
verdicts change and the exit code says how the switch ended; Ctrl-C leaves the switch
running; piped output is plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import sys
import termios
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.integration.plane import ControlPlane, first_version_live, traffic

pytestmark = pytest.mark.asyncio(loop_scope="session")

ARCH, STAGE = "WatchArch", "live"
MODEL_ID = f"{ARCH}_{STAGE}"
CANARY = {"initial_percentage": 20, "step_percentage": 40, "evaluation_period_minutes": 0.05}
SLOW_CANARY = {"initial_percentage": 20, "step_percentage": 40, "evaluation_period_minutes": 60}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def cli_env(plane: ControlPlane) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODEL_SWITCHING_")}
    env.update(VLLM_MODEL_SWITCHING_API_URL=plane.api_url, USER="watcher", TERM="xterm-256color",
               COLUMNS="160", LINES="50")
    env.pop("NO_COLOR", None)
    return env


class Terminal:
    """`turnout ARGS` on a pseudo-terminal of 160x50: what it wrote, as raw bytes."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.process: asyncio.subprocess.Process | None = None
        self._master = -1

    async def start(self, plane: ControlPlane, *args: str) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turnout.client.cli", *args, env=cli_env(plane),
            stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        self._master = master
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._master)
            return
        self.output.extend(data)

    @property
    def text(self) -> str:
        return ANSI.sub("", self.output.decode(errors="replace"))

    async def wait_for(self, pattern: str, timeout_s: float = 60) -> None:
        for _ in range(int(timeout_s * 10)):
            if re.search(pattern, self.text):
                return
            assert self.process is not None and self.process.returncode is None, self.text
            await asyncio.sleep(0.1)
        raise AssertionError(f"{pattern!r} never shown:\n{self.text[-3000:]}")

    async def close(self) -> None:
        """End the watcher if the test did not (a failed test must not leave it polling)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._master >= 0:
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(self._master)
                os.close(self._master)
            self._master = -1

    async def exit_code(self, timeout_s: float = 120) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await asyncio.sleep(0.2)  # the last bytes
        with contextlib.suppress(OSError, ValueError):
            asyncio.get_running_loop().remove_reader(self._master)
        os.close(self._master)
        self._master = -1
        return code


@pytest_asyncio.fixture(loop_scope="session")
async def terminal() -> AsyncIterator[Terminal]:
    term = Terminal()
    try:
        yield term
    finally:
        await term.close()


async def start_switch(plane: ControlPlane, target: str, config: dict[str, Any]) -> str:
    async with plane.http() as client:
        response = await client.post("/switch", json={
            "model_id": MODEL_ID, "target_version": target, "strategy": "canary",
            "strategy_config": config})
        assert response.status_code == 202, response.text
        return response.json()["operation_id"]


def shown_weights(text: str, version: str) -> list[float]:
    """The target's share on each redrawn weight line, in the order shown, deduplicated."""
    seen: list[float] = []
    for match in re.finditer(rf"^\s+{version} [█░]+\s+([\d.]+)%\s+target", text, re.M):
        value = float(match.group(1))
        if not seen or seen[-1] != value:
            seen.append(value)
    return seen


async def test_v1_goes_live(plane: ControlPlane) -> None:
    async with plane.http() as client:
        await first_version_live(plane, client, ARCH, STAGE)


async def test_watched_canary_redraws_weights_and_verdicts_and_exits_0(
        plane: ControlPlane, terminal: Terminal) -> None:
    async with traffic(plane.gateway_url, MODEL_ID):
        await terminal.start(plane, "switch", MODEL_ID, "v2", "--strategy", "canary",
                             "--config", json.dumps(CANARY), "--watch", "--interval", "0.3")
        code = await terminal.exit_code()
    text = terminal.text
    assert code == 0, text[-3000:]
    assert "\x1b[" in terminal.output.decode(errors="replace")  # drawn for a terminal
    # Redrawn in place as the canary stepped: 20% then 60% then 100% on the target.
    weights = shown_weights(text, "v2")
    assert weights[-1] == 100.0, weights
    assert [w for w in weights if w in (20.0, 60.0)] == [20.0, 60.0], weights
    # Verdicts came and went: the first and second look, each judged healthy, with the
    # figures of every guarded metric against the stable version.
    assert re.search(r"last check \(1 so far\): healthy", text), text[-3000:]
    assert re.search(r"last check \(2 so far\): healthy", text), text[-3000:]
    assert re.search(r"error rate\s+0\.00%\s+0\.00%", text), text[-3000:]
    assert re.search(r"p95 latency\s+[\d.]+ ms\s+[\d.]+ ms\s+[+-]\d+%", text), text[-3000:]
    assert re.search(r"next check \d\d:\d\d:\d\d \(in \d+ s\)", text), text[-3000:]
    assert "actions now: turnout pause" in text
    assert "ended: promoted (exit code 0)" in text


async def test_ctrl_c_leaves_the_switch_running_and_a_rollback_exits_non_zero(
        plane: ControlPlane, terminal: Terminal) -> None:
    # v2 is live now: a slow canary back to v1, that only an operator ends.
    operation_id = await start_switch(plane, "v1", SLOW_CANARY)
    await terminal.start(plane, "status", operation_id, "--watch", "--interval", "0.3")
    await terminal.wait_for(r"v1 [█░]+\s+20\.0%\s+target")
    await terminal.wait_for(rf"actions now: turnout pause {operation_id}\s+turnout promote")
    assert terminal.process is not None
    terminal.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert await terminal.exit_code(30) == 130
    assert f"the switch goes on (turnout status {operation_id} --watch)" in terminal.text
    async with plane.http() as client:
        status = (await client.get(f"/switch/operations/{operation_id}")).json()
        assert status["status"] == "running" and status["weights"]["v1"] == 20.0, status

        # Watched again, piped (not a terminal): plain text, and a rollback exits 3.
        watcher = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turnout.client.cli", "status", operation_id, "--watch",
            "--interval", "0.3", env=cli_env(plane), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            assert watcher.stdout is not None
            first = ""
            while "actions now" not in first:  # the first block, shown before the rollback
                line = await asyncio.wait_for(watcher.stdout.readline(), 60)
                assert line, first
                first += line.decode()
            response = await client.post(f"/switch/operations/{operation_id}/rollback",
                                         json={"reason": "watched"})
            assert response.status_code == 200, response.text
            out, err = await asyncio.wait_for(watcher.communicate(), 60)
        finally:
            if watcher.returncode is None:
                watcher.kill()
                await watcher.wait()
    text = first + out.decode()
    assert watcher.returncode == 3, (text, err.decode())
    assert "\x1b" not in text
    assert re.search(r"v1 #+-+\s+20\.0%\s+target", text), text
    assert "ended: rolled_back" in text and "(exit code 3)" in text


async def test_operations_watch_and_engines_tables(plane: ControlPlane,
                                                  terminal: Terminal) -> None:
    await terminal.start(plane, "operations", "--model", MODEL_ID, "--watch",
                         "--interval", "0.3")
    await terminal.wait_for(r"switching operations")
    await terminal.wait_for(r"immediate\s+completed\s+-\s+-\s+promoted")
    operation_id = await start_switch(plane, "v1", SLOW_CANARY)
    # The new operation appears, with its phase and the target's share, without a restart.
    await terminal.wait_for(rf"{operation_id}.*running.*evaluating.*20%")
    assert terminal.process is not None
    terminal.process.send_signal(signal.SIGINT)
    assert await terminal.exit_code(30) == 0

    engines = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "turnout.client.cli", "engines", env=cli_env(plane),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(engines.communicate(), 60)
    text = out.decode()
    assert engines.returncode == 0, err.decode()
    assert "engine hosts" in text, text  # the plane's versions are external: no hosts
    # Both versions serve a share now (the canary's 20% on v1), each with its holder.
    assert re.search(rf"{MODEL_ID}\s*\|\s*v1\s*\|\s*external\s*\|\s*external\s*\|"
                     rf"\s*serving\s*\|\s*ready.*switch:{operation_id}", text), text
    assert re.search(rf"{MODEL_ID}\s*\|\s*v2\s*\|\s*external.*serving:{MODEL_ID}",
                     text), text
    async with plane.http() as client:
        response = await client.post(f"/switch/operations/{operation_id}/abort", json={})
        assert response.status_code == 200, response.text
