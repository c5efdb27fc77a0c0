"""The Grafana dashboard (deploy/grafana/dashboards/turnout.json) queries only what the
gateway exports: after real traffic through a real gateway during a canary (the `plane`
fixture), every metric name in every PromQL expression of the dashboard (panels,
annotations, variables) is in the gateway's `/metrics`. The names are read from the
gateway, never listed here, so a renamed metric fails this test.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.plane import ControlPlane, first_version_live

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/turnout.json"
ARCH, STAGE = "DashArch", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_MODIFIERS = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are neither functions
    nor aggregations (followed by `(`), label names or keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (regexes of label matchers)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(_MODIFIERS, "", expr)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group(0).lower() in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:  # label_values(metric, label)
        found = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"]["query"])
        assert found, variable
        queries.append(found.group(1))
    return queries


def test_the_promql_reader_finds_names_not_functions_or_labels() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (model_id, version, le) '
                        '(rate(a_seconds_bucket{model_id=~"$model"}[$__rate_interval])))') \
        == {"a_seconds_bucket"}
    assert metric_names("sum by (v) (rate(x_total[5m])) / sum by (v) (rate(y_total[5m]))") \
        == {"x_total", "y_total"}
    assert metric_names("changes((max by (m) (g{m=~\"a|b\"}))[2m:15s]) > 0") == {"g"}


@pytest.mark.asyncio(loop_scope="session")  # the plane fixture's loop
async def test_every_metric_the_dashboard_queries_is_exported(plane: ControlPlane) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    wanted = set().union(*(metric_names(q) for q in queries))
    assert wanted and all(name.startswith("turnout_gateway_") for name in wanted), wanted

    async with plane.http() as client:
        await first_version_live(plane, client, ARCH, STAGE)
        response = await client.post("/switch", json={
            "model_id": MODEL_ID, "target_version": "v2", "strategy": "canary",
            "strategy_config": {"initial_percentage": 50, "step_percentage": 50,
                                "evaluation_period_minutes": 60}})
        assert response.status_code == 202, response.text
        operation_id = response.json()["operation_id"]
        for _ in range(300):
            status = (await client.get(f"/switch/operations/{operation_id}")).json()
            if status["phase"] == "evaluating":
                break
            await asyncio.sleep(0.1)
        assert status["weights"] == {"v1": 50.0, "v2": 50.0}, status
        async with httpx.AsyncClient(base_url=plane.gateway_url, timeout=30) as gateway:
            for i in range(20):  # plain and streamed answers of both versions
                for stream in (False, True):
                    answer = await gateway.post("/v1/completions", json={
                        "model": MODEL_ID, "prompt": "hi", "stream": stream, "user": f"u{i}"})
                    assert answer.status_code == 200, answer.text
            refused = await gateway.post("/v1/completions", json={"model": "no-such"})
            assert refused.status_code == 404
            exported = (await gateway.get("/metrics")).text
        await client.post(f"/switch/operations/{operation_id}/abort", json={})

    samples = {s.name for family in text_string_to_metric_families(exported)
               for s in family.samples
               if s.labels.get("model_id", MODEL_ID) == MODEL_ID}
    missing = sorted(wanted - samples)
    assert not missing, f"the dashboard queries series the gateway does not export: {missing}"
