"""turnout: durable, zero-downtime switches between LLM model versions.

The guide's names live here so that `from turnout import ModelSwitcher, ...` (or
`from turnout import *`, as in the guide's examples) replaces the guide's
`from vllm_omni.model_executor.models import ...`.
"""

from turnout.alerting import AlertSystem, WebhookHandler, handlers_from_settings, log_alert
from turnout.cache import ModelCache
from turnout.client.health_monitor import HealthMonitor
from turnout.config import ModelSwitchingConfig, get_model_switching_config
from turnout.domain import Alert, AlertSeverity, AlertState, OmniModelConfig, SwitchingStrategyType
from turnout.sdk import DynamicModelRegistry, ModelSwitcher, SwitchResult, TurnoutAPIError
from turnout.transitions import TransitionManager

__all__ = [
    "Alert",
    "AlertSeverity",
    "AlertState",
    "AlertSystem",
    "DynamicModelRegistry",
    "HealthMonitor",
    "ModelCache",
    "ModelSwitcher",
    "ModelSwitchingConfig",
    "OmniModelConfig",
    "SwitchResult",
    "SwitchingStrategyType",
    "TransitionManager",
    "TurnoutAPIError",
    "WebhookHandler",
    "get_model_switching_config",
    "handlers_from_settings",
    "log_alert",
]
