"""inference-pio: a plugin-based local inference system.

Importing this package is cheap: no torch, no transformers, no pydantic, no plugin modules.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# The decode loop runs on its own thread. With OpenMP's default active waiting, each thread's worker team
# spins after every parallel region and starves the other thread's team: on a 2-core machine a CPU decode
# step became 5-30x slower. Passive waiting must be chosen before torch loads OpenMP, so it is set here;
# a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from inference_pio.common.config_manager import ConfigManager
from inference_pio.common.interfaces import (
    PLUGIN_API_VERSION,
    GenerationResult,
    ModelPluginInterface,
    StreamChunk,
    TextModelPluginInterface,
    Usage,
)
from inference_pio.common.memory import MemoryPlan
from inference_pio.common.metadata import ModelPluginMetadata
from inference_pio.errors import (
    ConfigError,
    ContextLengthError,
    InferencePIOError,
    InsufficientMemoryError,
    InvalidRequestError,
    MetadataError,
    ModelLoadError,
    PathNotAllowedError,
    PluginConflictError,
    PluginDisabledError,
    PluginIncompatibleError,
    PluginLoadError,
    PluginNotActiveError,
    PluginNotFoundError,
    ResourceLimitExceeded,
)
from inference_pio.plugin_system.hookspecs import hookimpl
from inference_pio.plugin_system.manager import PluginManager, get_plugin_manager, reset_plugin_manager
from inference_pio.security.policy import ResourceLimits, TrustLevel

if TYPE_CHECKING:
    from inference_pio.common.schemas import GenerationParams as GenerationParams
else:

    def __getattr__(name: str) -> Any:
        """``GenerationParams`` (a pydantic model) loads on first use, keeping this import light."""
        if name == "GenerationParams":
            from inference_pio.common.schemas import GenerationParams

            return GenerationParams
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "PLUGIN_API_VERSION",
    "ConfigError",
    "ConfigManager",
    "ContextLengthError",
    "GenerationParams",
    "GenerationResult",
    "InferencePIOError",
    "InsufficientMemoryError",
    "InvalidRequestError",
    "MemoryPlan",
    "MetadataError",
    "ModelLoadError",
    "ModelPluginInterface",
    "ModelPluginMetadata",
    "PathNotAllowedError",
    "PluginConflictError",
    "PluginDisabledError",
    "PluginIncompatibleError",
    "PluginLoadError",
    "PluginManager",
    "PluginNotActiveError",
    "PluginNotFoundError",
    "ResourceLimitExceeded",
    "ResourceLimits",
    "StreamChunk",
    "TextModelPluginInterface",
    "TrustLevel",
    "Usage",
    "get_plugin_manager",
    "hookimpl",
    "reset_plugin_manager",
]
