"""Recording histories for the replay tests, from real runs (integration and e2e).

With RECORD_HISTORIES=1 a test keeps a workflow's history as
`tests/replay/histories/<name>-<WORKFLOW_VERSION>.json`; a committed file is never
overwritten: it is a promise that running workflows of that version still replay.
"""

from __future__ import annotations

import os
from pathlib import Path

from temporalio.client import Client

HISTORIES = Path(__file__).parent / "histories"
# Bump when a workflow changes in a way that needs a new patch, then record the histories
# of the tests that take the new path: old files stay.
WORKFLOW_VERSION = "v9"


def recording() -> bool:
    return os.environ.get("RECORD_HISTORIES") == "1"


async def save_history(client: Client, name: str, workflow_id: str,
                       run_id: str | None = None) -> None:
    """Keep a workflow's history (so far) under `name`, if recording and not kept yet."""
    if not recording():
        return
    path = HISTORIES / f"{name}-{WORKFLOW_VERSION}.json"
    if path.exists():
        return
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    path.write_text((await handle.fetch_history()).to_json())
