"""Headless Chromium driven over the Chrome DevTools protocol (a websocket, from Python):
open a page, wait until its text says what a person should read, take a screenshot.

Debian's `chromium` (`.ci/run` installs it where missing); nothing is downloaded. The flags
are the ones that work on these machines: no sandbox as root, no GPU, and no background
networking, component updates, sync or QUIC, whose connections a closed network refuses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import websockets

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic", "--disable-dev-shm-usage", "--window-size=1600,1400"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Chromium is not installed: `apt-get install chromium` "
                           "(.ci/run does it where it is missing)")
    return path


class ProtocolError(RuntimeError):
    """A DevTools command failed (e.g. a frame went away while the page re-rendered)."""


class Page:
    """One browser tab, spoken to with CDP commands."""

    def __init__(self, socket: websockets.ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        await self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:  # events arrive between answers: skip them
            message = json.loads(await self._socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise ProtocolError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def text(self) -> str:
        """What the page shows as text (`innerText`: rendered, visible text), with the text
        of every frame in it: the Web UI renders markdown (a workflow's summary and
        current details) in sandboxed iframes, which the page's own script cannot read
        but DevTools can, through an isolated world in each frame."""
        texts = []
        tree = (await self.call("Page.getFrameTree"))["frameTree"]
        frames = [tree]
        while frames:
            frame = frames.pop(0)
            frames.extend(frame.get("childFrames", []))
            try:
                world = await self.call("Page.createIsolatedWorld",
                                        frameId=frame["frame"]["id"])
                result = await self.call(
                    "Runtime.evaluate", contextId=world["executionContextId"],
                    expression="document.body ? document.body.innerText : ''",
                    returnByValue=True)
            except ProtocolError:  # the frame is gone (re-rendered): the next look sees it
                continue
            texts.append(result.get("result", {}).get("value") or "")
        return "\n".join(texts)

    async def click_text(self, text: str) -> bool:
        """Click the first button, link or tab whose text is `text`; False if none."""
        expression = f"""(() => {{
            const wanted = {json.dumps(text)};
            const nodes = [...document.querySelectorAll('button, a, [role=tab]')];
            const hit = nodes.find(n => n.innerText && n.innerText.trim() === wanted);
            if (!hit) return false;
            hit.click();
            return true;
        }})()"""
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True)
        return bool(result.get("result", {}).get("value"))

    async def wait_for_text(self, *wanted: str, timeout_s: float = 30) -> str:
        """Until the page's text holds every one of `wanted`; returns the text (raises
        AssertionError naming what is missing)."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = await self.text()
            missing = [w for w in wanted if w not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"not on the page after {timeout_s:g}s: {missing}\n"
                                     f"--- page text ---\n{text[:4000]}")
            await asyncio.sleep(0.5)

    async def screenshot(self, path: Path) -> Path:
        result = await self.call("Page.captureScreenshot", format="png",
                                 captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path


@contextlib.asynccontextmanager
async def browser(profile_dir: Path, debug_port: int) -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile; yields its first tab."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    with (profile_dir.parent / "chromium.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            chromium_path(), *FLAGS, f"--user-data-dir={profile_dir}",
            f"--remote-debugging-port={debug_port}", "--remote-allow-origins=*",
            "about:blank", stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        try:
            url = await _page_socket(debug_port, process)
            async with websockets.connect(url, max_size=64 * 2 ** 20) as socket:
                page = Page(socket)
                await page.call("Page.enable")
                yield page
        finally:
            if process.returncode is None:
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _page_socket(port: int, process: asyncio.subprocess.Process,
                       timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"chromium exited with code {process.returncode}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium's DevTools did not answer on :{port}")
            await asyncio.sleep(0.2)
