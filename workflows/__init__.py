"""Workflow definitions: deterministic, no I/O."""

from workflows.monitor import MonitorWorkflow
from workflows.switch import SwitchWorkflow

WORKFLOWS = [SwitchWorkflow, MonitorWorkflow]

__all__ = ["WORKFLOWS", "MonitorWorkflow", "SwitchWorkflow"]
