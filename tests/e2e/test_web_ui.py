"""The Temporal Web UI as an operator sees it, in headless Chromium: a running canary's
page shows its pending timer's summary, the sentence saying where it stands and the
search attributes turnout sets.

The whole stack runs as `make run` runs it (`workers.stack.Stack`, the Web UI on), with
fake OpenAI servers as the versions' external endpoints: the Web UI's part does not need
a vLLM engine. Screenshots of every page looked at stay in the test's temporary
directory; a failure prints their paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.e2e.browser import Page, browser
from tests.integration.plane import wait_done
from tests.integration.upstream import FakeUpstream, register_fakes
from turnout.config import ModelSwitchingConfig
from turnout.store import Store
from workers.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

MODEL_ID = "WebUI_chat"
# Ports of this module only (below the ephemeral range, apart from the other modules').
PORTS = {"temporal": 19233, "ui": 19234, "api": 19001, "gateway": 19000, "admin": 19002,
         "devtools": 19222}
SLOW_CANARY = {"initial_percentage": 20, "step_percentage": 40, "evaluation_period_minutes": 60}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ui_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("web-ui-stack")
    settings = ModelSwitchingConfig.from_env(
        {}, state_dir=str(root), database_url=f"sqlite+aiosqlite:///{root}/turnout.db",
        allow_private_endpoints=True, temporal_address=f"127.0.0.1:{PORTS['temporal']}",
        api_port=PORTS["api"], gateway_port=PORTS["gateway"],
        gateway_admin_port=PORTS["admin"], engine_port_start=19100, engine_port_end=19109,
        engine_host="web-ui")
    stack = Stack(settings=settings, temporal_db=root / "temporal.db", log_dir=root / "logs",
                  temporal_ui_port=PORTS["ui"], headless=False)
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def upstreams() -> AsyncIterator[dict[str, FakeUpstream]]:
    started = {v: await FakeUpstream(v, f"served-{v}").start() for v in ("v1", "v2")}
    yield started
    for upstream in started.values():
        await upstream.stop()


async def wait_status(client: httpx.AsyncClient, operation_id: str,
                      done: Any) -> dict[str, Any]:
    for _ in range(600):
        status = (await client.get(f"/switch/operations/{operation_id}")).json()
        if done(status):
            return status
        assert status["status"] != "failed", status
        await asyncio.sleep(0.1)
    raise AssertionError(f"operation {operation_id}: {status}")


async def start_canary(stack: Stack, upstreams: dict[str, FakeUpstream]
                       ) -> tuple[dict[str, Any], str]:
    """v1 live, then a canary to v2 holding 20% in its hour-long evaluation: its status
    and the workflow run's id."""
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
        await register_fakes(client, upstreams, "WebUI", "chat")
        response = await client.post("/switch", json={"model_id": MODEL_ID,
                                                       "target_version": "v1"})
        assert response.status_code == 202, response.text
        done = await wait_done(client, response.json()["operation_id"])
        assert done["outcome"] == "promoted", done
        response = await client.post("/switch", json={
            "model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
            "strategy_config": SLOW_CANARY})
        assert response.status_code == 202, response.text
        operation_id = response.json()["operation_id"]
        status = await wait_status(client, operation_id,
                                   lambda s: s["phase"] == "evaluating")
    store = Store.from_url(stack.settings.database_url)
    try:
        record = await store.get_operation(operation_id)
    finally:
        await store.close()
    assert record.run_id, record
    return status, record.run_id


class Looks:
    """Each page looked at, with its screenshot, named on failure."""

    def __init__(self, page: Page, base_url: str, shots: Path) -> None:
        self.page, self.base_url, self.shots = page, base_url, shots
        self.taken: list[Path] = []

    async def expect(self, name: str, path: str, *wanted: str) -> str:
        await self.page.goto(f"{self.base_url}{path}")
        try:
            return await self.page.wait_for_text(*wanted, timeout_s=45)
        finally:
            self.taken.append(await self.page.screenshot(self.shots / f"{name}.png"))


async def test_a_running_canary_reads_in_the_web_ui(ui_stack: Stack,
                                                    upstreams: dict[str, FakeUpstream],
                                                    tmp_path: Path) -> None:
    status, run_id = await start_canary(ui_stack, upstreams)
    workflow = f"/namespaces/default/workflows/switch-{MODEL_ID}/{run_id}"
    async with browser(tmp_path / "chromium-profile", PORTS["devtools"]) as page:
        looks = Looks(page, f"http://127.0.0.1:{PORTS['ui']}", tmp_path)
        try:
            # The timeline: the canary's steps by their summaries, and the pending
            # evaluation timer by its own.
            await looks.expect("timeline", f"{workflow}/timeline", "RUNNING",
                               "set_traffic • shift traffic to 20%",
                               "evaluate canary at 20% for 1 h")
            # The sentence saying where the switch stands (set_current_details), as the
            # API's status says it, and the static summary it was started with.
            weights = ", ".join(f"{v} {w:g}%" for v, w in status["weights"].items())
            sentence = (f"canary switch of {MODEL_ID} to v2: {status['message']} "
                        f"(traffic: {weights})")
            assert "next check at" in status["message"], status
            await looks.expect("user-metadata", f"{workflow}/user-metadata",
                               "Current Details", sentence,
                               "canary switch of WebUI_chat to v2")
            # The search attributes an operator filters on.
            await looks.expect("search-attributes", f"{workflow}/search-attributes",
                               '"TurnoutModelId": "WebUI_chat"',
                               '"TurnoutTargetVersion": "v2"', '"TurnoutStrategy": "canary"',
                               '"TurnoutPhase": "evaluating"', '"TurnoutTrafficPercent": 20')
        except AssertionError as exc:
            shots = "\n".join(f"  {path}" for path in looks.taken)
            raise AssertionError(f"{exc}\nscreenshots:\n{shots}") from None
