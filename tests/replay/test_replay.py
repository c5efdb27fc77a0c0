"""Replay every recorded history against today's workflow code.

Histories come from real runs; re-record new ones with
`RECORD_HISTORIES=1 pytest tests/integration/test_api.py tests/integration/test_controls.py
tests/integration/test_rollback_recovery.py
tests/integration/test_strategies.py tests/integration/test_monitoring.py
tests/integration/test_shadow.py`
and are never regenerated once committed: a change that breaks replay of a running
switch must go behind `workflow.patched`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows import WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_are_committed() -> None:
    assert HISTORIES, "no recorded histories under tests/replay/histories"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replays_cleanly(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter) \
        .replay_workflow(history)
