"""llmgraft: recent LLM-efficiency methods grafted onto vLLM, PEFT and transformers as pluggy plugins.

Public API for plugin authors::

    from llmgraft import Sampler, Params, param, per_row, choice, hookimpl, ParamError

and for users: ``get_registry().get("sampler", "top_h")``. Importing llmgraft loads no plugin and no host
framework: plugins load on the first :func:`get_registry` call.
"""

from .hooks import (
    Adapter,
    Attention,
    KVManager,
    LLMGraftError,
    Merger,
    Optimizer,
    ParamError,
    Params,
    PluginLoadError,
    Sampler,
    UnknownPluginError,
    choice,
    get_registry,
    hookimpl,
    param,
    per_row,
)

__version__ = "0.1.0"

__all__ = ["Adapter", "Attention", "KVManager", "LLMGraftError", "Merger", "Optimizer", "ParamError", "Params",
           "PluginLoadError", "Sampler", "UnknownPluginError", "__version__", "choice", "get_registry",
           "hookimpl", "param", "per_row"]
