"""Chaos on the orchestration side, real processes and real signals: a gateway replica
killed under streaming load, Temporal killed while `POST /switch` arrives, the API killed
between starting a switch's workflow and recording its operation, and the store stalling
the API's records of a switch and of an emergency rollback it has started.

Each asserts what a user relies on: no client request fails where another replica can
serve it, no step is applied twice (route generations), the switch ends as it would have
without the fault, and the fault is visible (an error answer, a status). One stack of its
own on a PostgreSQL server of its own; the versions are external endpoints (fake engines
made for the test), so no vLLM engine loads. The tests run in order, each switching the
model to its other version.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowExecutionStatus

from tests.e2e.client import (
    api,
    load,
    start,
    start_gateway_replica,
    status,
    wait_end,
    wait_phase,
)
from tests.e2e.conftest import e2e_stack, running
from tests.integration.upstream import FakeUpstream
from tests.postgres import PostgresServer, writes_blocked
from turnout.contracts import STATUS_QUERY
from turnout.domain import Route, SwitchStatus
from turnout.routing import pick_backend
from turnout.runtime import connect_temporal
from turnout.store import NotFound, Store
from workers.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

ARCH, STAGE = "ChaosOrch", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"
WORKFLOW_ID = f"switch-{MODEL_ID}"
REPLICA, REPLICA_ID = "gateway-b", "e2e-chaos-orch-b"
REPLICA_PORT, REPLICA_ADMIN_PORT = 24003, 24004
# The 503 of an outage comes within about this long (API_BACKEND_TIMEOUT_S, the default).
BACKEND_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def database_url(own_postgres: PostgresServer) -> str:
    return own_postgres.create_database("chaos_orch")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory,
                database_url: str) -> AsyncIterator[Stack]:
    # Ports below the kernel's ephemeral range and apart from the other modules' and
    # `make run`'s; the other settings are the defaults (a crashed gateway is waited for
    # GATEWAY_LIVE_AFTER_S, 15 s), but for replaced versions stopped at once.
    async with running(e2e_stack(
            tmp_path_factory.mktemp("chaos-orch"), ui_port=24234, database_url=database_url,
            temporal_address="127.0.0.1:24233", api_port=24001, gateway_port=24000,
            gateway_admin_port=24002, engine_port_start=24100, engine_port_end=24119,
            engine_host="e2e-chaos-orch", allow_private_endpoints=True,
            api_backend_timeout_s=BACKEND_TIMEOUT_S, standby_minutes=0)) as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def temporal(stack: Stack) -> Client:
    return await connect_temporal(stack.settings)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fakes(stack: Stack) -> AsyncIterator[dict[str, FakeUpstream]]:
    """v1 and v2, streaming 10 chunks 50 ms apart (a stream is in flight for ~0.5 s), with
    v1 live."""
    upstreams = {v: await FakeUpstream(v, v, chunks=10, chunk_delay_s=0.05).start()
                 for v in ("v1", "v2")}
    for version, upstream in upstreams.items():
        r = await api(stack, "POST", "/models", json={
            "model_arch": ARCH, "model_stage": STAGE, "version": version, "model": version,
            "endpoint": upstream.url, "served_model_name": upstream.served_model_name})
        assert r.status_code == 201, r.text
    s = await wait_end(stack, await start(stack, MODEL_ID, "v1", "immediate", {}))
    assert s["status"] == "completed", s
    yield upstreams
    for upstream in upstreams.values():
        await upstream.stop()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def other_version(store: Store) -> str:
    live = (await store.get_model(MODEL_ID)).live_version
    assert live in ("v1", "v2"), live
    return "v2" if live == "v1" else "v1"


async def route(store: Store) -> Route:
    found = await store.get_route(MODEL_ID)
    assert found is not None
    return found


async def operation_ids(stack: Stack) -> list[str]:
    r = await api(stack, "GET", "/switch/operations", params={"model_id": MODEL_ID})
    assert r.status_code == 200, r.text
    return [op["operation_id"] for op in r.json()]


async def audit_actions(stack: Stack, operation_id: str) -> list[str]:
    r = await api(stack, "GET", "/audit", params={"operation_id": operation_id})
    assert r.status_code == 200, r.text
    return [entry["action"] for entry in r.json()]


async def replica_generation(stack: Stack, admin_port: int) -> int | None:
    """The generation of the model's route a gateway says it serves (its admin API)."""
    async with httpx.AsyncClient(timeout=5, headers={
            "Authorization": f"Bearer {stack.settings.gateway_admin_token}"}) as client:
        r = await client.get(f"http://127.0.0.1:{admin_port}/admin/state")
    assert r.status_code == 200, r.text
    generation = r.json()["generations"].get(MODEL_ID)
    return None if generation is None else int(generation)


async def wait_replica_at(stack: Stack, admin_port: int, generation: int) -> None:
    deadline = time.monotonic() + 30
    while (seen := await replica_generation(stack, admin_port)) != generation:
        assert seen is None or seen < generation, f"replica at {seen}, beyond {generation}"
        assert time.monotonic() < deadline, f"replica at {seen}, never at {generation}"
        await asyncio.sleep(0.1)


def version_for(split: Route, user: str) -> str:
    backend = pick_backend(split, user, 0.0)
    assert backend is not None, split
    return backend.version


async def answers_by_user(gateway_url: str, users: list[str]) -> dict[str, str]:
    """The version that answers each user (a user key is routed by a stable hash)."""
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        seen = {}
        for user in users:
            r = await client.post("/v1/completions", json={
                "model": MODEL_ID, "prompt": "Hello", "max_tokens": 2, "user": user})
            assert r.status_code == 200, r.text
            seen[user] = r.headers["x-turnout-version"]
    return seen


async def test_a_gateway_replica_killed_under_streaming_load(
        stack: Stack, store: Store, fakes: dict[str, FakeUpstream]) -> None:
    """Two gateway replicas stream answers; one is SIGKILLed. The other's clients see no
    failure; the next canary step completes while the killed one is down (the step waits
    for it until it stops heartbeating, GATEWAY_LIVE_AFTER_S); restarted, it reads the
    routes from the store and serves the current split, user by user as the survivor."""
    replica_url = await start_gateway_replica(
        stack, REPLICA, port=REPLICA_PORT, admin_port=REPLICA_ADMIN_PORT,
        gateway_id=REPLICA_ID)
    before = await route(store)
    target = await other_version(store)
    await wait_replica_at(stack, REPLICA_ADMIN_PORT, before.generation)
    async with load(stack.gateway_url, MODEL_ID, stream=True) as survivor:
        async with load(replica_url, MODEL_ID, stream=True) as doomed:
            await until(lambda: bool(survivor.served and doomed.served and
                                     survivor.in_flight and doomed.in_flight),
                        "streams in flight through both replicas")
            stack.kill_process(REPLICA, signal.SIGKILL)
            killed_at = time.monotonic()
            # The fault is visible to the killed replica's clients: their stream broke.
            await until(lambda: bool(doomed.failures), "a failure at the killed replica")
        operation_id = await start(stack, MODEL_ID, target, "canary", {
            "initial_percentage": 50, "step_percentage": 50,
            "evaluation_period_minutes": 30})
        evaluating = await wait_phase(stack, operation_id, "evaluating", timeout_s=120)
        print(f"first canary step applied {time.monotonic() - killed_at:.1f} s after the "
              "kill, the killed replica still down")
        half = await route(store)
        assert half.weights() == {"v1": 50.0, "v2": 50.0}, half
        assert half.generation == before.generation + 1  # the step applied once
        assert evaluating["weights"] == half.weights()
        await survivor.wait_served_by(target)
        served_before_restart = len(survivor.served)

        stack.start_process(REPLICA)
        await stack.wait_for_http(f"{replica_url}/health", REPLICA)
        await wait_replica_at(stack, REPLICA_ADMIN_PORT, half.generation)
        await until(lambda: len(survivor.served) > served_before_restart,
                    "a stream served by the survivor after the restart")
    assert survivor.failures == [], survivor.failures[:5]
    assert set(survivor.served) == {"v1", "v2"}

    # Both replicas serve the current split: each user the version the route gives it.
    users = [f"user-{i}" for i in range(40)]
    expected = {user: version_for(half, user) for user in users}
    assert set(expected.values()) == {"v1", "v2"}  # these users fall on both sides
    assert await answers_by_user(replica_url, users) == expected
    assert await answers_by_user(stack.gateway_url, users) == expected

    r = await api(stack, "POST", f"/switch/operations/{operation_id}/promote",
                  json={"reason": "chaos test", "requested_by": "e2e"})
    assert r.status_code == 200, r.text
    s = await wait_end(stack, operation_id, timeout_s=120)
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), s
    final = await route(store)
    assert final.weights() == {target: 100.0}
    assert final.generation == half.generation + 1
    # The promotion waited for the restarted replica: it serves the final route.
    assert await replica_generation(stack, REPLICA_ADMIN_PORT) == final.generation
    stack.kill_process(REPLICA, signal.SIGTERM)  # leaves the store's gateway table


async def test_temporal_down_when_a_switch_is_requested(
        stack: Stack, store: Store, fakes: dict[str, FakeUpstream]) -> None:
    """With Temporal SIGKILLed, `POST /switch` answers 503 naming Temporal within about
    API_BACKEND_TIMEOUT_S and creates nothing; once Temporal is back the same request is
    accepted and completes."""
    target = await other_version(store)
    body = {"model_id": MODEL_ID, "target_version": target, "strategy": "immediate",
            "requested_by": "chaos"}
    operations, before = await operation_ids(stack), await route(store)
    async with load(stack.gateway_url, MODEL_ID) as clients:
        await until(lambda: bool(clients.served), "a request served")
        stack.kill_process("temporal", signal.SIGKILL)
        try:
            served = len(clients.served)
            began = time.monotonic()
            async with httpx.AsyncClient(base_url=stack.api_url, timeout=15) as client:
                r = await client.post("/switch", json=body)
                elapsed = time.monotonic() - began
                ready = await client.get("/readyz")
            assert r.status_code == 503, r.text
            assert "Temporal" in r.json()["detail"], r.text
            assert elapsed < 2 * BACKEND_TIMEOUT_S, elapsed
            print(f"503 after {elapsed:.1f} s")
            assert ready.status_code == 503 and \
                ready.json()["checks"] == {"store": "ok", "temporal": "failed"}, ready.text
            # Nothing half-created: no operation, the route as it was; the gateway serves.
            assert await operation_ids(stack) == operations
            assert await route(store) == before
            assert len(clients.served) > served
        finally:
            stack.start_process("temporal")
        await stack.wait_for_port(stack.settings.temporal_address, "temporal")
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=15) as client:
            while (r := await client.post("/switch", json=body)).status_code == 503:
                assert time.monotonic() < deadline, f"still 503 a minute after: {r.text}"
                await asyncio.sleep(0.5)
        assert r.status_code == 202, r.text
        operation_id = r.json()["operation_id"]
        assert await operation_ids(stack) == [operation_id, *operations]
        s = await wait_end(stack, operation_id, timeout_s=120)
        await clients.wait_served_by(target)
    assert clients.failures == [], clients.failures[:5]
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), s
    after = await route(store)
    assert after.weights() == {target: 100.0} and after.generation == before.generation + 1


async def new_run(temporal: Client, previous: str | None) -> tuple[str, str]:
    """Wait for a run of the model's switch workflow other than `previous` to be running;
    its run id and operation id."""
    handle = temporal.get_workflow_handle(WORKFLOW_ID)
    deadline = time.monotonic() + 30
    while True:
        description = await handle.describe()
        if description.run_id != previous and \
                description.status is WorkflowExecutionStatus.RUNNING:
            break
        assert time.monotonic() < deadline, "the switch's workflow never started"
        await asyncio.sleep(0.05)
    status = await temporal.get_workflow_handle(WORKFLOW_ID, run_id=description.run_id).query(
        STATUS_QUERY, result_type=SwitchStatus)
    return description.run_id, status.operation_id


async def last_run(temporal: Client) -> str:
    return (await temporal.get_workflow_handle(WORKFLOW_ID).describe()).run_id


async def test_the_api_killed_between_starting_and_recording_a_switch(
        stack: Stack, store: Store, temporal: Client,
        fakes: dict[str, FakeUpstream]) -> None:
    """The operations table is locked, so the API that has started the workflow waits to
    record the operation; it is SIGKILLed there. After the lock is released and the API
    restarted, the operation is listed, its status readable, and it ends promoted."""
    target = await other_version(store)
    operations, before = await operation_ids(stack), await route(store)
    previous = await last_run(temporal)
    async with load(stack.gateway_url, MODEL_ID) as clients:
        async with writes_blocked(stack.settings.database_url):
            request = asyncio.create_task(api(stack, "POST", "/switch", json={
                "model_id": MODEL_ID, "target_version": target, "strategy": "immediate"}))
            _, operation_id = await new_run(temporal, previous)
            # In the window: the workflow runs, nothing is recorded, no answer yet.
            with pytest.raises(NotFound):
                await store.get_operation(operation_id)
            assert not request.done()
            stack.kill_process("api", signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):  # the fault is visible: no answer came
                await request
        stack.start_process("api")
        await stack.wait_for_http(f"{stack.api_url}/healthz", "api")
        s = await wait_end(stack, operation_id, timeout_s=120)
        await clients.wait_served_by(target)
    assert clients.failures == [], clients.failures[:5]
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), s
    assert await operation_ids(stack) == [operation_id, *operations]
    assert (await status(stack, operation_id))["target_version"] == target
    after = await route(store)
    assert after.weights() == {target: 100.0} and after.generation == before.generation + 1
    assert (await store.get_operation(operation_id)).workflow_id == WORKFLOW_ID


async def test_a_switch_under_way_is_accepted_when_the_store_stalls_its_record(
        stack: Stack, store: Store, temporal: Client,
        fakes: dict[str, FakeUpstream]) -> None:
    """The operations table is locked past API_BACKEND_TIMEOUT_S: the workflow has started,
    so `POST /switch` answers 202 with its operation id (not a 503 that a retry would
    meet as a 409). Once the store answers, the operation is recorded (by the switch and
    the API: its run and the switch_requested entry, once) and completes."""
    target = await other_version(store)
    operations, before = await operation_ids(stack), await route(store)
    previous = await last_run(temporal)
    async with load(stack.gateway_url, MODEL_ID) as clients:
        async with writes_blocked(stack.settings.database_url):
            began = time.monotonic()
            async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
                r = await client.post("/switch", json={
                    "model_id": MODEL_ID, "target_version": target,
                    "strategy": "immediate", "requested_by": "alice (on call)"})
            elapsed = time.monotonic() - began
            assert r.status_code == 202, r.text
            accepted = r.json()
            assert "the store did not answer" in accepted["message"], accepted
            # Once the API gave up waiting for the store, not once the lock ended.
            assert elapsed < 2 * BACKEND_TIMEOUT_S + 5, elapsed
            print(f"202 after {elapsed:.1f} s")
            run_id, operation_id = await new_run(temporal, previous)
            assert accepted["operation_id"] == operation_id
            with pytest.raises(NotFound):  # still not recorded: the lock held it
                await store.get_operation(operation_id)
        s = await wait_end(stack, operation_id, timeout_s=120)
        await clients.wait_served_by(target)
    assert clients.failures == [], clients.failures[:5]
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), s
    assert await operation_ids(stack) == [operation_id, *operations]
    after = await route(store)
    assert after.weights() == {target: 100.0} and after.generation == before.generation + 1
    # The API's own record follows in the background: the run id and the request's entry.
    deadline = time.monotonic() + 60
    while (record := await store.get_operation(operation_id)).run_id != run_id or \
            "switch_requested" not in await audit_actions(stack, operation_id):
        assert time.monotonic() < deadline, (record, await audit_actions(stack, operation_id))
        await asyncio.sleep(0.5)
    actions = await audit_actions(stack, operation_id)
    assert actions.count("switch_requested") == 1 and "switch_completed" in actions, actions
    entries = (await api(stack, "GET", "/audit", params={
        "operation_id": operation_id, "action": "switch_requested"})).json()
    assert entries[0]["details"]["requested_by"] == "alice (on call)"


async def test_an_emergency_rollback_is_accepted_when_the_store_stalls(
        stack: Stack, store: Store, temporal: Client,
        fakes: dict[str, FakeUpstream]) -> None:
    """Operations and audit log locked past API_BACKEND_TIMEOUT_S: `POST
    /models/{id}/rollback` starts the immediate switch back and answers 202 (not a 503
    after one more timeout for its audit entry); once the store answers, the rollback
    completes and its entries are written, each once."""
    model = await store.get_model(MODEL_ID)
    assert model.previous_version is not None
    operations, before = await operation_ids(stack), await route(store)
    previous = await last_run(temporal)
    async with load(stack.gateway_url, MODEL_ID) as clients:
        async with writes_blocked(stack.settings.database_url, "operations, audit_log"):
            began = time.monotonic()
            r = await api(stack, "POST", f"/models/{MODEL_ID}/rollback",
                          json={"reason": "chaos", "requested_by": "bob"})
            elapsed = time.monotonic() - began
            assert r.status_code == 202, r.text
            accepted = r.json()
            assert accepted["recorded"] is False, accepted
            # One wait for the store, not one per write.
            assert elapsed < 2 * BACKEND_TIMEOUT_S, elapsed
            print(f"rollback 202 after {elapsed:.1f} s")
            _, operation_id = await new_run(temporal, previous)
            assert accepted["operation_id"] == operation_id
        s = await wait_end(stack, operation_id, timeout_s=120)
        await clients.wait_served_by(model.previous_version)
    assert clients.failures == [], clients.failures[:5]
    assert (s["status"], s["outcome"]) == ("completed", "promoted"), s
    assert await operation_ids(stack) == [operation_id, *operations]
    after = await route(store)
    assert after.weights() == {model.previous_version: 100.0}
    assert after.generation == before.generation + 1
    deadline = time.monotonic() + 60
    while not {"switch_requested", "emergency_rollback", "switch_completed"} <= \
            set(actions := await audit_actions(stack, operation_id)):
        assert time.monotonic() < deadline, actions
        await asyncio.sleep(0.5)
    assert actions.count("switch_requested") == actions.count("emergency_rollback") == 1, \
        actions
