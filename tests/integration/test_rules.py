"""Routing rules end to end: set through the API, applied by the gateway over real HTTP,
read by a standalone `TransitionManager` from the same store, and overruled by a rollback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.integration.plane import ControlPlane, register_upstreams, wait_done
from turnout.sdk import DynamicModelRegistry, TurnoutAPIError
from turnout.transitions import TransitionManager

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.both_stores]

ARCH, STAGE = "RulesArch", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"
BETA = {"name": "beta-testers", "match": {"header": {"name": "X-Beta", "equals": "yes"}},
        "version": "v2"}
LONG = {"name": "long-prompts", "match": {"prompt_tokens": {"min": 500}}, "version": "v2"}


async def served_by(plane: ControlPlane, n: int = 20, headers: dict[str, str] | None = None,
                    prompt: str = "hi") -> set[str]:
    seen = set()
    async with httpx.AsyncClient(base_url=plane.gateway_url, timeout=30) as gateway:
        for i in range(n):
            answer = await gateway.post("/v1/completions", headers=headers, json={
                "model": MODEL_ID, "prompt": prompt, "user": f"user-{i}"})
            assert answer.status_code == 200, answer.text
            seen.add(answer.headers["x-turnout-version"])
    return seen


async def eventually_served_by(plane: ControlPlane, expected: set[str], **kwargs: Any) -> None:
    """Gateways pick up rules within their one-second reconcile."""
    for _ in range(50):
        if await served_by(plane, **kwargs) == expected:
            return
        await asyncio.sleep(0.1)
    assert await served_by(plane, **kwargs) == expected


async def gateway_reads_the_store(plane: ControlPlane) -> None:
    """Have the plane's gateway read the model's route and rules now (what its one-second
    reconcile does) and answer when it has: what it serves next is decided on them."""
    async with httpx.AsyncClient(timeout=30) as admin:
        response = await admin.post(
            f"http://127.0.0.1:{plane.settings.gateway_admin_port}/admin/routes/refresh",
            params={"model_id": MODEL_ID})
    assert response.status_code == 200, response.text


async def test_setup_v1_live_and_a_slow_canary_to_v2(plane: ControlPlane) -> None:
    async with plane.http() as client:
        await register_upstreams(plane, client, ARCH, STAGE)
        first = await client.post("/switch", json={"model_id": MODEL_ID, "target_version": "v1"})
        assert (await wait_done(client, first.json()["operation_id"]))["status"] == "completed"
        assert (await client.get(f"/models/{MODEL_ID}/rules")).json()["rules"] == []


async def test_bad_rules_are_422_naming_the_field_and_change_nothing(
        plane: ControlPlane) -> None:
    async with plane.http() as client:
        ok = await client.put(f"/models/{MODEL_ID}/rules", json={"rules": [LONG]})
        assert ok.status_code == 200, ok.text
        for body, loc, says in [
            ({"rules": [BETA, {**LONG, "version": "v9"}]}, ["body", "rules", 1, "version"],
             "not registered"),
            ({"rules": [{**BETA, "match": {"header": {"name": "X-Beta", "regex": "("}}}]},
             ["body", "rules", 0, "match", "header", "regex"], "not valid RE2 syntax"),
            # Backtracking features RE2 does not have: refused, naming the regex field.
            ({"rules": [LONG, {**BETA, "match": {"header": {"name": "X-Beta",
                                                           "regex": "^(?!internal)"}}}]},
             ["body", "rules", 1, "match", "header", "regex"], "uses lookahead"),
            ({"rules": [{**BETA, "match": {"metadata": {"key": "k", "regex": r"(a)\1"}}}]},
             ["body", "rules", 0, "match", "metadata", "regex"], "uses a backreference"),
            ({"rules": [{**LONG, "match": {"prompt_chars": {"min": 9, "max": 1}}}]},
             ["body", "rules", 0, "match", "prompt_chars"], "impossible range"),
            ({"rules": "nope"}, ["body", "rules"], "valid list"),
        ]:
            response = await client.put(f"/models/{MODEL_ID}/rules", json=body)
            assert response.status_code == 422, response.text
            errors = {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}
            assert says in errors.get(tuple(loc), ""), response.json()
        unknown = await client.put("/models/Nope_nope/rules", json={"rules": [LONG]})
        assert unknown.status_code == 404
        assert (await client.get("/models/Nope_nope/rules")).status_code == 404
        kept = (await client.get(f"/models/{MODEL_ID}/rules")).json()
        assert [r["name"] for r in kept["rules"]] == ["long-prompts"]


async def test_rules_steer_within_a_rollout_and_a_rollback_overrules_them(
        plane: ControlPlane) -> None:
    async with plane.http() as client:
        put = await client.put(f"/models/{MODEL_ID}/rules",
                               json={"rules": [BETA, LONG], "requested_by": "alice"})
        assert put.status_code == 200, put.text
        # Authentication is off here: the actor is `anonymous` (`requested_by` is a note).
        assert (put.json()["updated_by"], len(put.json()["rules"])) == ("anonymous", 2)
        # v2 is not served yet: its rules are skipped, everything stays on v1 — asked once
        # the gateway has read these rules (before, v1 would answer anyway).
        await gateway_reads_the_store(plane)
        assert await served_by(plane, headers={"X-Beta": "yes"}) == {"v1"}
        assert await served_by(plane, prompt="word " * 500) == {"v1"}

        started = await client.post("/switch", json={
            "model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
            "strategy_config": {"initial_percentage": 10, "step_percentage": 10,
                                "evaluation_period_minutes": 60}})
        operation_id = started.json()["operation_id"]
        for _ in range(200):
            status = (await client.get(f"/switch/operations/{operation_id}")).json()
            if status["phase"] == "evaluating":
                break
            await asyncio.sleep(0.05)
        await eventually_served_by(plane, {"v2"}, headers={"X-Beta": "yes"})
        await eventually_served_by(plane, {"v2"}, prompt="word " * 500)
        assert await served_by(plane, 60) == {"v1", "v2"}  # everyone else: the 90/10 split

        # The standalone manager reads the same store and decides the same way.
        manager = TransitionManager(plane.settings)
        try:
            long = await asyncio.to_thread(manager.handle_request_routing, MODEL_ID, "r-1",
                                           {"prompt": "word " * 500})
            assert long == "v2"
            split = {manager.handle_request_routing(MODEL_ID, f"r-{i}") for i in range(300)}
            assert split == {"v1", "v2"}
            assert manager.handle_request_routing("Nope_nope", "r-1") is None

            rolled = await client.post(f"/switch/operations/{operation_id}/rollback")
            assert rolled.status_code == 200, rolled.text
            # v2 leaves the route: its rules no longer match anywhere.
            await eventually_served_by(plane, {"v1"}, headers={"X-Beta": "yes"})
            for _ in range(30):
                if manager.handle_request_routing(MODEL_ID, "r-1", {"prompt": "word " * 500}) \
                        is None:
                    break
                await asyncio.sleep(0.1)
            assert manager.handle_request_routing(MODEL_ID, "r-1",
                                                  {"prompt": "word " * 500}) is None
        finally:
            manager.close()

        audit = (await client.get("/audit", params={"model_id": MODEL_ID})).json()
        updates = [e for e in audit if e["action"] == "rules_updated"]
        assert any(e["actor"] == "anonymous" and e["details"]["requested_by"] == "alice"
                   for e in updates)
    # The SDK (synchronous: called from a thread, the API serves on this loop).
    registry = DynamicModelRegistry(api_url=plane.api_url)
    saved = await asyncio.to_thread(registry.set_routing_rules, MODEL_ID, [LONG],
                                    requested_by="sdk")
    assert ([r.name for r in saved.rules], saved.updated_by) == \
        (["long-prompts"], "anonymous")
    with pytest.raises(TurnoutAPIError) as refused:
        await asyncio.to_thread(registry.set_routing_rules, MODEL_ID, [{**LONG, "version": "v9"}])
    assert refused.value.status_code == 422
    cleared = await asyncio.to_thread(registry.set_routing_rules, MODEL_ID, [])
    assert cleared.rules == []
    assert (await asyncio.to_thread(registry.get_routing_rules, MODEL_ID)).rules == []
