"""llmgraft: recent LLM-efficiency methods grafted onto vLLM, PEFT and transformers as pluggy plugins.

Public API for plugin authors::

    from llmgraft import Sampler, Params, param, per_row, choice, hookimpl, ParamError, sanitize_logits_

and for users: ``get_registry().get("sampler", "top_h")``. Importing llmgraft loads no plugin and no host
framework: plugins load on the first :func:`get_registry` call.
"""

from .hooks import (
    AdaptedLayer,
    Adapter,
    AdapterState,
    Attention,
    KVManager,
    LLMGraftError,
    Merger,
    Optimizer,
    PackedTensor,
    QuantScheme,
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


def __getattr__(name: str):
    # Loaded on first use, so that ``import llmgraft`` stays free of torch.
    if name == "sanitize_logits_":
        from .kernels.truncation import sanitize_logits_

        return sanitize_logits_
    if name == "prompt_distill":  # imports transformers, which vLLM engines need not pay for
        from .integrations.transformers.retention import prompt_distill

        return prompt_distill
    raise AttributeError(f"module 'llmgraft' has no attribute {name!r}")


__all__ = ["AdaptedLayer", "Adapter", "AdapterState", "Attention", "KVManager", "LLMGraftError", "Merger", "Optimizer", "PackedTensor", "ParamError", "Params", "QuantScheme",
           "PluginLoadError", "Sampler", "UnknownPluginError", "__version__", "choice", "get_registry",
           "hookimpl", "param", "per_row", "prompt_distill", "sanitize_logits_"]
