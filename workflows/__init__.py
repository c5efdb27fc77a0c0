"""Workflow definitions: deterministic, no I/O."""

from workflows.switch import SwitchWorkflow

WORKFLOWS = [SwitchWorkflow]

__all__ = ["WORKFLOWS", "SwitchWorkflow"]
