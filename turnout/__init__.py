"""turnout: durable, zero-downtime switches between LLM model versions.

The guide's names live here so that `from turnout import ModelSwitcher, ...` replaces the
guide's `from vllm_omni.model_executor.models import ...`.
"""

from turnout.config import ModelSwitchingConfig, get_model_switching_config
from turnout.domain import OmniModelConfig, SwitchingStrategyType
from turnout.sdk import DynamicModelRegistry, ModelSwitcher, SwitchResult, TurnoutAPIError

__all__ = [
    "DynamicModelRegistry",
    "ModelSwitcher",
    "ModelSwitchingConfig",
    "OmniModelConfig",
    "SwitchResult",
    "SwitchingStrategyType",
    "TurnoutAPIError",
    "get_model_switching_config",
]
