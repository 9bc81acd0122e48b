"""The llmgraft core: hook specs, the plugin registry, family base classes, parameters and errors."""

from .errors import CheckpointError, LLMGraftError, ParamError, PluginLoadError, UnknownPluginError
from .families import (FAMILIES, AdaptedLayer, Adapter, AdapterState, Attention, Family, KVManager, Merger, Method,
                       Optimizer, PackedTensor, QuantScheme, Sampler)
from .manager import ENTRY_POINT_GROUP, Registry, get_registry, reset_registry
from .params import Params, choice, param, per_row
from .specs import hookimpl, hookspec

__all__ = [
    "FAMILIES", "ENTRY_POINT_GROUP", "AdaptedLayer", "Adapter", "AdapterState", "Attention", "CheckpointError", "Family", "KVManager",
    "LLMGraftError", "Merger", "Method", "Optimizer", "PackedTensor", "ParamError", "Params", "PluginLoadError",
    "QuantScheme", "Registry",
    "Sampler", "UnknownPluginError", "choice", "get_registry", "hookimpl", "hookspec", "param", "per_row",
    "reset_registry",
]
