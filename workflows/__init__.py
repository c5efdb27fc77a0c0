"""Workflow definitions: deterministic, no I/O."""

from workflows.model_monitor import MonitorWorkflow
from workflows.preload import PreloadWorkflow
from workflows.replace import ReplaceEngineWorkflow
from workflows.shadow import ShadowWorkflow
from workflows.standby import StandbyWorkflow
from workflows.switch import SwitchWorkflow

WORKFLOWS = [SwitchWorkflow, MonitorWorkflow, ShadowWorkflow, StandbyWorkflow,
             PreloadWorkflow, ReplaceEngineWorkflow]

__all__ = ["WORKFLOWS", "MonitorWorkflow", "PreloadWorkflow", "ReplaceEngineWorkflow",
           "ShadowWorkflow", "StandbyWorkflow", "SwitchWorkflow"]
