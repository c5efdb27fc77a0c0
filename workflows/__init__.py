"""Workflow definitions: deterministic, no I/O."""

from workflows.monitor import MonitorWorkflow
from workflows.shadow import ShadowWorkflow
from workflows.switch import SwitchWorkflow

WORKFLOWS = [SwitchWorkflow, MonitorWorkflow, ShadowWorkflow]

__all__ = ["WORKFLOWS", "MonitorWorkflow", "ShadowWorkflow", "SwitchWorkflow"]
