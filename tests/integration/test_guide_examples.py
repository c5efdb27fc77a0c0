"""The guide's examples, as written (with `turnout` imports), against a real control plane.

Sections: "Quick Start", "Custom Alert Handlers", "Health Monitoring Setup", "Best
Practices 4" and "Complete Switching Workflow". The examples' no-argument constructors
find the plane through `VLLM_MODEL_SWITCHING_API_URL`. Versions are the plane's fake
OpenAI servers registered as external endpoints: the config objects' `model` keeps the
guide's name and gains an `endpoint`.

Examples that call the SDK's synchronous methods from a coroutine (as the guide does) run
like a separate program, in their own thread and event loop: the plane serves from this
test's loop, which such a call would otherwise block.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from aiohttp import web

from tests.integration.plane import (
    ControlPlane,
    control_plane,
    register_upstreams,
    traffic,
    wait_done,
)
from turnout import *  # noqa: F403 - the guide's `from vllm_omni.model_executor.models import *`
from turnout import (
    AlertSystem,
    DynamicModelRegistry,
    HealthMonitor,
    ModelCache,
    ModelSwitcher,
    OmniModelConfig,
    SwitchingStrategyType,
    TransitionManager,
    get_model_switching_config,
)
from turnout.domain import Alert, AlertSeverity

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def guide_env(plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> ControlPlane:
    monkeypatch.setenv("VLLM_MODEL_SWITCHING_API_URL", plane.api_url)
    # `TransitionManager()` reads routes from the store named by the settings.
    monkeypatch.setenv("VLLM_MODEL_SWITCHING_DATABASE_URL", plane.settings.database_url)
    monkeypatch.setenv("VLLM_MODEL_SWITCHING_MONITORING_INTERVAL_S", "1")
    return plane


async def as_a_program(example: Coroutine[Any, Any, Any]) -> Any:
    """Run `example` in its own thread and event loop, as a user's program would."""
    return await asyncio.to_thread(asyncio.run, example)


def served(plane: ControlPlane, version: str) -> dict[str, str]:
    """What turns the guide's config into one the plane can serve: a fake engine's URL."""
    upstream = plane.upstreams[version]
    return {"endpoint": upstream.url, "served_model_name": upstream.served_model_name}


async def until(check: Any, timeout: float = 15) -> None:
    for _ in range(int(timeout / 0.1)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def test_quick_start(guide_env: ControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    plane = guide_env
    base_registry = None  # the guide's vLLM model registry; turnout's lives in the stack

    async def quick_start() -> dict[str, Any]:
        # 1. Initialize Components
        # Get configuration
        config = get_model_switching_config()

        # Initialize components
        registry = DynamicModelRegistry(base_registry, **config.__dict__)
        cache = ModelCache(max_cache_size=config.max_cache_size)
        transition_manager = TransitionManager()
        health_monitor = HealthMonitor()

        # Create switcher
        switcher = ModelSwitcher(registry, cache, transition_manager)

        # Start background tasks
        await registry.start_cleanup_task()
        await cache.start_background_tasks()
        await health_monitor.start_monitoring()

        # 2. Register Models
        # Register model versions
        config_v1 = OmniModelConfig(
            model="Qwen/Qwen2.5-Omni-7B",
            model_arch="Qwen2_5OmniForConditionalGeneration",
            model_stage="thinker",
            **served(plane, "v1"),
        )

        config_v2 = OmniModelConfig(
            model="Qwen/Qwen2.5-Omni-7B-v2",
            model_arch="Qwen2_5OmniForConditionalGeneration",
            model_stage="thinker",
            **served(plane, "v2"),
        )

        # Register versions
        model_id = registry.register_model(config_v1, "v1.0", {"author": "team"})
        registry.register_model(config_v2, "v2.0", {"author": "team", "improvements": "latency"})

        # 3. Switch Models
        # Immediate switch
        result = await switcher.switch_model(
            model_id="Qwen2_5OmniForConditionalGeneration_thinker",
            target_version="v2.0",
            strategy_type=SwitchingStrategyType.IMMEDIATE
        )

        print(f"Switch {'successful' if result.success else 'failed'}: {result.operation_id}")

        # Beyond the guide: what the components now see, then a clean stop.
        await cache.refresh()
        seen = {"model_id": model_id, "result": result, "loaded": cache.loaded(),
                "stats": cache.stats(), "api_reachable": registry.api_reachable,
                "monitoring": health_monitor.monitoring,
                "routing": transition_manager.handle_request_routing(model_id, "req-1")}
        await health_monitor.stop_monitoring()
        await cache.stop_background_tasks()
        await registry.stop_cleanup_task()
        transition_manager.close()
        return seen

    seen = await as_a_program(quick_start())
    result = seen["result"]
    assert seen["model_id"] == "Qwen2_5OmniForConditionalGeneration_thinker"
    assert result.success, result
    assert capsys.readouterr().out.startswith(f"Switch successful: {result.operation_id}")
    assert "Qwen2_5OmniForConditionalGeneration_thinker_v2.0" in seen["loaded"]
    assert seen["stats"]["max_cache_size"] == 5 and seen["stats"]["registered_versions"] == 2
    assert seen["api_reachable"] is True and seen["monitoring"] is True
    assert seen["routing"] is None  # one version serving: "use normal routing"


async def test_custom_alert_handlers(guide_env: ControlPlane,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The stack's stored alerts reach the guide's handler once per change."""
    store = guide_env.store

    def custom_alert_handler(alert):  # type: ignore[no-untyped-def]  # the guide's, as is
        # Send to Slack, PagerDuty, etc.
        print(f"Alert: {alert.title} - {alert.message}")

    alert_system = AlertSystem(alert_handlers=[custom_alert_handler])
    health_monitor = HealthMonitor(alert_system=alert_system)

    def printed() -> list[str]:
        return [line for line in capsys.readouterr().out.splitlines() if "guide_custom" in line]

    lines: list[str] = []
    await health_monitor.start_monitoring()
    try:
        await store.raise_alert(Alert(
            model_id="guide_custom", version="v1", type="error_rate",
            severity=AlertSeverity.WARNING, title="High error rate on guide_custom/v1",
            message="error_rate 9.0% over the warning level 5.0%"))
        await until(lambda: bool(lines.extend(printed()) or lines))
        assert lines == ["Alert: High error rate on guide_custom/v1 - "
                         "error_rate 9.0% over the warning level 5.0%"]

        await asyncio.sleep(2.5)  # two more polls: an unchanged alert is not sent again
        lines.extend(printed())
        assert len(lines) == 1

        await store.raise_alert(Alert(
            model_id="guide_custom", version="v1", type="error_rate",
            severity=AlertSeverity.CRITICAL, title="High error rate on guide_custom/v1",
            message="error_rate 31.0% over the critical level 25.0%"))
        await until(lambda: bool(lines.extend(printed()) or len(lines) == 2))
        assert "31.0%" in lines[1]

        await store.resolve_alert("guide_custom", "v1", "error_rate")
        await until(lambda: bool(lines.extend(printed()) or len(lines) == 3))
        await asyncio.sleep(2.5)
        lines.extend(printed())
        assert len(lines) == 3  # the resolution, once
    finally:
        await health_monitor.stop_monitoring()


@contextlib.asynccontextmanager
async def slack_receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP server standing in for a Slack incoming webhook."""
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/services/T000/B000/secret", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/services/T000/B000/secret", got
    finally:
        await runner.cleanup()


async def test_health_monitoring_setup(guide_env: ControlPlane) -> None:
    async with slack_receiver() as (SLACK_WEBHOOK, slack):  # noqa: N806 - the guide's name

        def alert_to_slack(alert):  # type: ignore[no-untyped-def]  # the guide's, as is
            # Send to Slack webhook
            requests.post(SLACK_WEBHOOK, json={
                "text": f"Model Alert: {alert.title}\n{alert.message}"
            })

        alert_system = AlertSystem([alert_to_slack])
        health_monitor = HealthMonitor(alert_system)

        # Monitor specific metrics
        health_monitor.record_request("model_v1.0", latency_ms=150, error=False)

        # Beyond the guide: a burst of failures becomes one alert in Slack.
        for _ in range(30):
            health_monitor.record_request("model_v1.0", latency_ms=150, error=True)
        changed = await health_monitor.check_once()
        assert [(a.model_id, a.type, a.severity) for a in changed] == [
            ("model_v1.0", "error_rate", AlertSeverity.CRITICAL)]
        await until(lambda: bool(slack))
        assert slack[0]["text"].startswith("Model Alert: High error rate on model_v1.0: ")
        assert "error_rate 96.8% over the critical level 25.0%" in slack[0]["text"]
        # The stack's view is there too (`GET /health/models`).
        health = await health_monitor.aget_model_health()
        assert isinstance(health, list)


async def test_best_practice_set_up_monitoring(guide_env: ControlPlane) -> None:
    """`update_thresholds` is synchronous in the guide: it runs as a sync program would."""
    health_monitor = HealthMonitor()

    def configure() -> None:
        # Configure alerts
        health_monitor.update_thresholds({
            "error_rate_warning": 0.03,
            "latency_p95_warning": 3000
        })

    await asyncio.to_thread(configure)
    assert (health_monitor.thresholds.error_rate_warning,
            health_monitor.thresholds.latency_p95_warning) == (0.03, 3000)
    async with guide_env.http() as client:
        applied = (await client.get("/health/thresholds")).json()
    assert (applied["error_rate_warning"], applied["latency_p95_warning"]) == (0.03, 3000)

    with pytest.raises(ValueError, match="latency_p95_warnin"):
        await asyncio.to_thread(health_monitor.update_thresholds, {"latency_p95_warnin": 1})
    with pytest.raises(ValueError, match="error_rate_warning"):
        await asyncio.to_thread(health_monitor.update_thresholds, {"error_rate_warning": -1})
    async with guide_env.http() as client:
        assert (await client.get("/health/thresholds")).json() == applied


async def test_complete_switching_workflow(guide_env: ControlPlane,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The guide's example, on a model that already serves a version (v0.9): a rollout
    shifts traffic away from something. (On a model with nothing live yet, see
    `test_first_gradual_switch_of_a_new_model`.)"""
    plane = guide_env
    # The guide's `my_model`: the model id is `{model_arch}_{model_stage}`.
    config_v1 = OmniModelConfig(model="my-org/my-model", model_arch="my", model_stage="model",
                                **served(plane, "v1"))
    config_v2 = OmniModelConfig(model="my-org/my-model-v2", model_arch="my",
                                model_stage="model", **served(plane, "v2"))
    async with plane.http() as client:
        await go_live(client, {**config_v1.model_dump(), "version": "v0.9"})

    async def switching_workflow() -> SwitchResult:  # noqa: F405
        # Initialize
        registry = DynamicModelRegistry()
        switcher = ModelSwitcher(registry)  # the guide's `ModelSwitcher(...)`

        # Register models
        registry.register_model(config_v1, "v1.0")
        registry.register_model(config_v2, "v2.0")

        # Gradual rollout (the guide's 10 minutes shortened to 6 s; 2 steps so that each
        # step sees enough requests to be judged)
        result = await switcher.switch_model(
            "my_model", "v2.0",
            SwitchingStrategyType.GRADUAL,
            {"duration_minutes": 0.1, "steps": 2}
        )

        # Monitor progress
        while True:
            status = switcher.get_switch_status(result.operation_id)
            print(f"Progress: {status['progress']:.1%}")
            if status['status'] in ['completed', 'failed']:
                break
            await asyncio.sleep(0.5)  # the guide polls every 30 s

        print(f"Switch completed: {result.success}")
        return result

    async with traffic(plane.gateway_url, "my_model") as seen:
        result = await as_a_program(switching_workflow())
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "Switch completed: True"
    assert out[-2] == "Progress: 100.0%"
    assert len(out) >= 3
    async with plane.http() as client:
        status = (await client.get(f"/switch/operations/{result.operation_id}")).json()
        model = (await client.get("/models/my_model")).json()
    assert (status["status"], status["outcome"]) == ("completed", "promoted"), status
    assert model["live_version"] == "v2.0"
    assert seen.served.get("v2.0", 0) > 0


async def go_live(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    """Register a version and make it live with an immediate switch."""
    response = await client.post("/models", json=body)
    assert response.status_code == 201, response.text
    model_id = response.json()["model_id"]
    accepted = await client.post("/switch", json={"model_id": model_id,
                                                  "target_version": body["version"]})
    assert accepted.status_code == 202, accepted.text
    assert (await wait_done(client, accepted.json()["operation_id"]))["status"] == "completed"


async def test_a_rollout_needs_a_live_version_to_shift_from(guide_env: ControlPlane) -> None:
    """A gradual switch of a model that serves nothing yet has no stable side: it is
    refused up front (409 naming the strategy), and nothing starts."""
    plane = guide_env
    async with plane.http() as client:
        for version in ("v1.0", "v2.0"):
            response = await client.post("/models", json={
                "model": "my-org/fresh", "model_arch": "fresh", "model_stage": "model",
                "version": version, **served(plane, "v1")})
            assert response.status_code == 201, response.text
        refused = await client.post("/switch", json={
            "model_id": "fresh_model", "target_version": "v2.0", "strategy": "gradual",
            "strategy_config": {"duration_minutes": 0.1, "steps": 2}})
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"].startswith("strategy:")
        assert "no live version" in refused.json()["detail"]
        operations = (await client.get("/switch/operations",
                                       params={"model_id": "fresh_model"})).json()
        assert operations == []


async def test_slack_alerts_by_configuration_alone(tmp_path: Path) -> None:
    """The guide's Slack handler without code: the stack's own monitor posts its alerts to
    `VLLM_MODEL_SWITCHING_ALERT_WEBHOOK_URLS` (here a setting of a plane of its own)."""
    async with slack_receiver() as (url, slack), control_plane(
            tmp_path, alert_webhook_urls=[url], monitoring_interval_s=1) as plane:
        async with plane.http() as client:
            await register_upstreams(plane, client, "slack", "cfg")
            await go_live(client, {"model": "tiny/cfg", "model_arch": "slack",
                                   "model_stage": "cfg", "version": "v3",
                                   **served(plane, "v1")})
        plane.upstreams["v1"].fail_fraction = 0.5
        async with traffic(plane.gateway_url, "slack_cfg", may_fail=("v3",)):
            await until(lambda: any(b["alert"]["type"] == "error_rate" for b in slack),
                        timeout=60)
    body = next(b for b in slack if b["alert"]["type"] == "error_rate")
    assert body["text"].startswith("Model Alert: ") and "error_rate" in body["text"]
    assert body["alert"]["model_id"] == "slack_cfg" and body["alert"]["version"] == "v3"
