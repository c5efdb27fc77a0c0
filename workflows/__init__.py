"""Workflow definitions: deterministic, no I/O."""

from workflows.monitor import MonitorWorkflow
from workflows.preload import PreloadWorkflow
from workflows.shadow import ShadowWorkflow
from workflows.standby import StandbyWorkflow
from workflows.switch import SwitchWorkflow

WORKFLOWS = [SwitchWorkflow, MonitorWorkflow, ShadowWorkflow, StandbyWorkflow,
             PreloadWorkflow]

__all__ = ["WORKFLOWS", "MonitorWorkflow", "PreloadWorkflow", "ShadowWorkflow",
           "StandbyWorkflow", "SwitchWorkflow"]
