"""llmgraft: recent LLM-efficiency methods grafted onto vLLM, PEFT and transformers as pluggy plugins.

Public API::

    from llmgraft import hookimpl, Params, per_row, get_registry
    get_registry().get("sampler", "top_h")
"""

from .hooks import (
    LLMGraftError,
    ParamError,
    Params,
    UnknownPluginError,
    choice,
    get_registry,
    hookimpl,
    per_row,
)

__version__ = "0.1.0"

__all__ = ["LLMGraftError", "ParamError", "Params", "UnknownPluginError", "__version__", "choice",
           "get_registry", "hookimpl", "per_row"]
