"""The llmgraft core: hook specs, the plugin registry, family protocols, parameters and errors."""

from .errors import CheckpointError, LLMGraftError, ParamError, PluginLoadError, UnknownPluginError
from .families import FAMILIES, Adapter, Attention, KVManager, Merger, Optimizer, Sampler
from .manager import ENTRY_POINT_GROUP, Registry, get_registry, reset_registry
from .params import Params, choice, per_row
from .specs import hookimpl, hookspec

__all__ = [
    "FAMILIES", "ENTRY_POINT_GROUP", "Adapter", "Attention", "CheckpointError", "KVManager", "LLMGraftError",
    "Merger", "Optimizer", "ParamError", "Params", "PluginLoadError", "Registry", "Sampler",
    "UnknownPluginError", "choice", "get_registry", "hookimpl", "hookspec", "per_row", "reset_registry",
]
