"""Register two versions, switch immediately, serve through the gateway: all real parts.

One module-scoped stack; the tests run in order and build on each other, as an operator
would: first v1 goes live, then v2 replaces it under load, then bad versions are refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from turnout import (
    DynamicModelRegistry,
    ModelSwitcher,
    OmniModelConfig,
    SwitchingStrategyType,
)
from turnout.store import Store
from workers.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

ARCH, STAGE = "TinyLlama", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"


def api(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.api_url, timeout=30)


def gateway_client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused",
                              max_retries=0, timeout=60)


async def wait_for_operation(stack: Stack, operation_id: str,
                             timeout_s: float = 600) -> dict[str, Any]:
    """The guide's monitoring loop: poll until `completed` or `failed`."""
    deadline = time.monotonic() + timeout_s
    async with api(stack) as client:
        while True:
            response = await client.get(f"/switch/operations/{operation_id}")
            assert response.status_code == 200, response.text
            status = response.json()
            assert 0.0 <= status["progress"] <= 1.0
            if status["status"] in ("completed", "failed"):
                return status
            assert time.monotonic() < deadline, f"switch still {status} after {timeout_s}s"
            await asyncio.sleep(0.5)


async def switch(stack: Stack, version: str) -> str:
    async with api(stack) as client:
        response = await client.post("/switch", json={
            "model_id": MODEL_ID, "target_version": version, "strategy": "immediate",
            "strategy_config": {}})
    assert response.status_code == 202, response.text
    return response.json()["operation_id"]


async def served_version(client: openai.AsyncOpenAI, *, chat: bool = False,
                         stream: bool = False) -> str:
    """Send one request through the gateway; return the version that answered it."""
    if chat:
        call = client.chat.completions.with_streaming_response.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
            stream=stream)
    else:
        call = client.completions.with_streaming_response.create(
            model=MODEL_ID, prompt="Hello", max_tokens=4, stream=stream)
    async with call as response:
        body = await response.text()
        assert response.status_code == 200, body
        if stream:
            assert "data: [DONE]" in body
        else:
            assert json.loads(body)["choices"]
        return response.headers["x-turnout-version"]


async def engine_pids(stack: Stack, version: str) -> list[int]:
    store = Store.from_url(stack.settings.database_url)
    try:
        return [e.pid for e in await store.list_engines(model_id=MODEL_ID, version=version)
                if e.pid]
    finally:
        await store.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its entry is left until its parent reaps it.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


async def test_register_versions_as_the_guide_shows(stack: Stack,
                                                    tiny_models: dict[str, Path]) -> None:
    async with api(stack) as client:
        for version, path in (("v1", tiny_models["tiny-v1"]), ("v2", tiny_models["tiny-v2"])):
            response = await client.post("/models", json={
                "model": str(path), "model_arch": ARCH, "model_stage": STAGE,
                "version": version, "metadata": {"author": "team"}})
            assert response.status_code == 201, response.text
            assert response.json()["model_id"] == MODEL_ID
        listed = (await client.get("/models")).json()
        assert [m["model_id"] for m in listed] == [MODEL_ID]
        model = (await client.get(f"/models/{MODEL_ID}")).json()
        assert [v["version"] for v in model["versions"]] == ["v1", "v2"]
        assert model["versions"][0]["metadata"] == {"author": "team"}


async def test_first_switch_makes_v1_serve_every_kind_of_request(stack: Stack) -> None:
    operation_id = await switch(stack, "v1")
    status = await wait_for_operation(stack, operation_id)
    assert status["status"] == "completed", status
    assert status["progress"] == 1.0
    assert status["outcome"] == "promoted"

    client = gateway_client(stack)
    models = await client.models.list()
    assert MODEL_ID in [m.id for m in models.data]
    for chat in (False, True):
        for stream in (False, True):
            assert await served_version(client, chat=chat, stream=stream) == "v1"


async def test_switch_to_v2_under_load_drops_no_request(stack: Stack) -> None:
    v1_pids = await engine_pids(stack, "v1")
    assert v1_pids and all(alive(p) for p in v1_pids)
    client = gateway_client(stack)
    results: list[str | BaseException] = []
    done = asyncio.Event()

    async def keep_sending() -> None:
        """One client, no pause between requests, streamed and not in turn."""
        while not done.is_set():
            try:
                results.append(await served_version(client, stream=len(results) % 2 == 1))
            except BaseException as exc:  # every failure is a finding, whatever its kind
                results.append(exc)

    sender = asyncio.create_task(keep_sending())
    operation_id = await switch(stack, "v2")
    status = await wait_for_operation(stack, operation_id)
    done.set()
    await sender

    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:3]}"
    assert "v1" in results and "v2" in results, "the load did not span the switch"
    assert status["status"] == "completed" and status["progress"] == 1.0, status

    after = [await served_version(client, stream=i % 2 == 1) for i in range(10)]
    assert after == ["v2"] * 10
    assert not any(alive(p) for p in v1_pids), "v1's engine is still running"

    async with api(stack) as api_client:
        model = (await api_client.get(f"/models/{MODEL_ID}")).json()
        assert model["live_version"] == "v2"
        audit = (await api_client.get("/audit", params={"model_id": MODEL_ID})).json()
    completed = [e for e in audit if e["action"] == "switch_completed"]
    assert len(completed) == 2
    assert {e["details"]["target_version"] for e in completed} == {"v1", "v2"}


async def test_corrupt_version_fails_clearly_and_traffic_stays(
        stack: Stack, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    registry = DynamicModelRegistry(api_url=stack.api_url)
    config = OmniModelConfig(model=str(broken), model_arch=ARCH, model_stage=STAGE)
    assert registry.register_model(config, "v3-broken", {"author": "team"}) == MODEL_ID

    switcher = ModelSwitcher(registry)
    result = await switcher.switch_model(model_id=MODEL_ID, target_version="v3-broken",
                                         strategy_type=SwitchingStrategyType.IMMEDIATE)
    assert not result.success
    status = switcher.get_switch_status(result.operation_id)
    assert status["status"] == "failed"
    assert status["outcome"] == "load_failed"
    assert "config.json" in status["reason"]

    client = gateway_client(stack)
    assert [await served_version(client) for _ in range(5)] == ["v2"] * 5
    assert await engine_pids(stack, "v3-broken") == []


async def test_missing_model_directory_fails_clearly(stack: Stack, tmp_path: Path) -> None:
    registry = DynamicModelRegistry(api_url=stack.api_url)
    config = OmniModelConfig(model=str(tmp_path / "nowhere"), model_arch=ARCH,
                             model_stage=STAGE)
    registry.register_model(config, "v4-missing")
    result = await ModelSwitcher(registry).switch_model(MODEL_ID, "v4-missing")
    status = ModelSwitcher(registry).get_switch_status(result.operation_id)
    assert (status["status"], status["outcome"]) == ("failed", "load_failed")
    assert "nowhere" in status["reason"]
    assert await served_version(gateway_client(stack)) == "v2"


async def test_sdk_validation_names_what_is_wrong(stack: Stack) -> None:
    switcher = ModelSwitcher(api_url=stack.api_url)
    ok = switcher.validate_switch_request(MODEL_ID, "v1")
    assert ok == {"valid": True, "errors": [], "fields": []}
    unknown = switcher.validate_switch_request(MODEL_ID, "v9")
    assert unknown["valid"] is False
    assert any("target_version" in e for e in unknown["errors"])
    live = switcher.validate_switch_request(MODEL_ID, "v2")
    assert any("already live" in e for e in live["errors"])
    bad = switcher.validate_switch_request(MODEL_ID, "v1", SwitchingStrategyType.CANARY,
                                           {"initial_percentage": 500})
    assert any("initial_percentage" in e for e in bad["errors"])
