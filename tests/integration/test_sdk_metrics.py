"""`TEMPORAL_METRICS_PORT`: a process's Temporal client serves the SDK's Prometheus
metrics (what docker-compose's Prometheus scrapes from the workers), on a real dev server."""

from __future__ import annotations

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from tests.support import free_port
from turnout.config import ModelSwitchingConfig
from turnout.runtime import connect_temporal, installed_binary

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_sdk_metrics_are_served_when_asked() -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=installed_binary("temporal"))
    try:
        port = free_port()
        settings = ModelSwitchingConfig.from_env(
            {}, temporal_address=env.client.service_client.config.target_host,
            temporal_metrics_port=port)
        client = await connect_temporal(settings)
        await client.count_workflows()  # some requests to measure
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        assert "temporal_request" in text, text[:2000]
    finally:
        await env.shutdown()
