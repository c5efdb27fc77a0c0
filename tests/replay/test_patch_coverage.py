"""Every `workflow.patched` id in workflows/*.py is taken by some recorded history.

A patch whose new branch no history went through is only checked by replay for the old
branch: a change behind it that breaks determinism would pass `test_replay.py` and then fail
the running workflows of the next version. The ids are read from the workflow sources
(module-level `_PATCH_* = "..."` constants and the arguments of `workflow.patched` /
`workflow.deprecate_patch`), so a new patch is checked without editing this file; the
histories are read for the patch markers Temporal records (`core_patch`, the id in its
`patch-data`), per workflow type, since two workflows can use the same id.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from collections import defaultdict
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory

from tests.replay.recording import HISTORIES
from workflows import WORKFLOWS

WORKFLOW_SOURCES = Path(__file__).parents[2] / "workflows"
_PATCH_CALLS = {"patched", "deprecate_patch"}
# The marker the Python SDK's core records for `workflow.patched`; its details hold the id.
_PATCH_MARKER = "core_patch"


def patch_ids(source: str) -> set[str]:
    """The patch ids a workflow module uses: its `_PATCH_*` string constants and the
    literal or constant arguments of `workflow.patched(...)`; an argument this cannot
    resolve is an error, so a patch is never silently left unchecked."""
    tree = ast.parse(source)
    constants: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value.value
    ids = {value for name, value in constants.items() if name.startswith("_PATCH_")}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _PATCH_CALLS
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "workflow"):
            continue
        arg = node.args[0] if node.args else None
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            ids.add(arg.value)
        elif isinstance(arg, ast.Name) and arg.id in constants:
            ids.add(constants[arg.id])
        else:
            raise ValueError(f"line {node.lineno}: a patch id this check cannot read: "
                             f"{ast.unparse(node)}")
    return ids


def _workflow_types(module_name: str) -> set[str]:
    """The Temporal workflow type names a workflows module defines (none for a helper)."""
    module = importlib.import_module(module_name)
    return {workflow._Definition.must_from_class(cls).name for cls in WORKFLOWS
            if inspect.getmodule(cls) is module}


def used_patches() -> dict[tuple[str, str], set[str | None]]:
    """(module file, patch id) -> the workflow types that may record it; None stands for
    any type (a helper module without a workflow of its own)."""
    used: dict[tuple[str, str], set[str | None]] = {}
    for path in sorted(WORKFLOW_SOURCES.glob("*.py")):
        types: set[str | None] = set(_workflow_types(f"workflows.{path.stem}")) or {None}
        for patch_id in patch_ids(path.read_text()):
            used[(path.name, patch_id)] = types
    return used


def recorded_patches() -> dict[str, set[str]]:
    """Workflow type -> the patch ids its recorded histories carry markers for."""
    recorded: dict[str, set[str]] = defaultdict(set)
    for path in sorted(HISTORIES.glob("*.json")):
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        started = history.events[0].workflow_execution_started_event_attributes
        for event in history.events:
            if not event.HasField("marker_recorded_event_attributes"):
                continue
            marker = event.marker_recorded_event_attributes
            if marker.marker_name == _PATCH_MARKER:
                for payload in marker.details["patch-data"].payloads:
                    recorded[started.workflow_type.name].add(json.loads(payload.data)["id"])
    return recorded


def test_every_patch_is_recorded_by_some_history() -> None:
    used = used_patches()
    assert used, f"no workflow.patched ids found under {WORKFLOW_SOURCES}"
    recorded = recorded_patches()
    anywhere = set().union(*recorded.values())
    missing = sorted(
        f"{patch_id} ({module}, {' or '.join(sorted(t or 'any workflow' for t in types))})"
        for (module, patch_id), types in used.items()
        if not any(patch_id in (anywhere if t is None else recorded.get(t, set()))
                   for t in types))
    assert not missing, (
        "patch ids no recorded history under tests/replay/histories takes "
        f"(record one with RECORD_HISTORIES=1, see tests/replay/recording.py): {missing}")


def test_patch_ids_are_read_from_constants_and_calls() -> None:
    source = (
        '_PATCH_A = "a-constant"\n'
        '_OTHER = "b-via-name"\n'
        "def run():\n"
        "    workflow.patched(_OTHER)\n"
        '    workflow.patched("c-literal")\n'
        '    workflow.deprecate_patch("d-deprecated")\n')
    assert patch_ids(source) == {"a-constant", "b-via-name", "c-literal", "d-deprecated"}
    with pytest.raises(ValueError, match="cannot read"):
        patch_ids("def run(p):\n    workflow.patched(p)\n")
