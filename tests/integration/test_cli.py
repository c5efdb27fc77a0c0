"""The `turnout` commands the README shows that no other test runs, as an operator runs
them (a subprocess against the real `plane`): register and list, switch and wait, read a
status, acknowledge an alert (as the caller's key), apply the store's migrations; a bad
option is named and changes nothing."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from tests.integration.plane import ControlPlane, cli, register_upstreams
from turnout.domain import Alert, AlertSeverity

pytestmark = pytest.mark.asyncio(loop_scope="session")

ARCH, STAGE = "CliArch", "chat"
MODEL_ID = f"{ARCH}_{STAGE}"


async def test_register_then_models_lists_the_version_with_its_metadata(
        plane: ControlPlane) -> None:
    code, out, err = await cli(plane, "register", "--model", "org/cli-tiny", "--arch", ARCH,
                               "--stage", STAGE, "--version", "v9", "--metadata",
                               '{"team": "search"}', "--alias", "cli-candidate")
    assert code == 0, err
    assert out == {"model_id": MODEL_ID, "version": "v9"}
    code, models, err = await cli(plane, "models")
    assert code == 0, err
    [model] = [m for m in models if m["model_id"] == MODEL_ID]
    [version] = [v for v in model["versions"] if v["version"] == "v9"]
    assert version["metadata"] == {"team": "search"}
    assert version["config"]["model"] == "org/cli-tiny"
    assert "cli-candidate" in model["aliases"]


async def test_a_bad_json_option_is_named_and_registers_nothing(plane: ControlPlane) -> None:
    code, out, err = await cli(plane, "register", "--model", "org/cli-tiny", "--arch", ARCH,
                               "--stage", STAGE, "--version", "v10", "--metadata", "{team")
    assert code == 2 and out is None
    assert "argument --metadata: not JSON" in err and "Traceback" not in err, err
    code, models, _ = await cli(plane, "models")
    [model] = [m for m in models if m["model_id"] == MODEL_ID]
    assert "v10" not in [v["version"] for v in model["versions"]]


async def test_switch_wait_prints_the_end_and_status_reads_it(plane: ControlPlane) -> None:
    async with plane.http() as client:
        await register_upstreams(plane, client, ARCH, STAGE)
    code, result, err = await cli(plane, "switch", MODEL_ID, "v1", "--wait")
    assert code == 0, err
    assert result["success"] is True and result["operation_id"], result
    code, status, err = await cli(plane, "status", result["operation_id"])
    assert code == 0, err
    assert (status["status"], status["outcome"]) == ("completed", "promoted"), status
    assert status["target_version"] == "v1"
    # A switch that cannot start exits non-zero, saying why.
    code, refused, err = await cli(plane, "switch", MODEL_ID, "v404", "--wait")
    assert code != 0
    assert "v404" in (err + str(refused)), (err, refused)


async def test_alerts_acknowledge_marks_who_acknowledged(plane: ControlPlane) -> None:
    raised = await plane.store.raise_alert(Alert(
        model_id=MODEL_ID, version="v1", type="latency", severity=AlertSeverity.WARNING,
        title="p95 over the warning level"))
    code, firing, err = await cli(plane, "alerts", "--model", MODEL_ID)
    assert code == 0, err
    assert raised.id in [a["id"] for a in firing]
    code, acknowledged, err = await cli(plane, "alerts", "--acknowledge", str(raised.id))
    assert code == 0, err
    # Acknowledged by the caller's key name: with authentication off, "anonymous".
    assert acknowledged["id"] == raised.id and acknowledged["acknowledged_by"] == "anonymous"
    stored = [a for a in await plane.store.list_alerts(model_id=MODEL_ID)
              if a.id == raised.id]
    assert [a.acknowledged_by for a in stored] == ["anonymous"]
    code, _, err = await cli(plane, "alerts", "--acknowledge", "999999")
    assert code == 1 and "999999" in err and "Traceback" not in err, err


async def test_db_upgrade_creates_the_schema_of_a_new_store(tmp_path: Path) -> None:
    database = tmp_path / "fresh.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MODEL_SWITCHING_")}
    env["VLLM_MODEL_SWITCHING_DATABASE_URL"] = f"sqlite+aiosqlite:///{database}"
    for _ in range(2):  # and a second time, on a store already at head: nothing to do
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turnout.client.cli", "db-upgrade", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
    with sqlite3.connect(database) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        [(revision,)] = db.execute("SELECT version_num FROM alembic_version").fetchall()
    assert {"models", "versions", "routes", "engines", "operations", "alerts"} <= tables
    assert revision
