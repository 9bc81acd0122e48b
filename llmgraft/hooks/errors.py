"""The one error hierarchy of llmgraft.

Parameter errors subclass ``ValueError`` so hosts that map ``ValueError`` to a client error (vLLM's
``validate_params`` → HTTP 400) do so without special-casing llmgraft.
"""


class LLMGraftError(Exception):
    """Base of every error llmgraft raises on purpose."""


class ParamError(LLMGraftError, ValueError):
    """A method parameter is missing, unknown, of the wrong type or out of range."""


class UnknownPluginError(LLMGraftError, ValueError):
    """A name was asked for that no loaded plugin registered in that family."""


class PluginLoadError(LLMGraftError):
    """A third-party plugin failed to import, validate or register (it is skipped, the rest keep working)."""


class CheckpointError(LLMGraftError):
    """A checkpoint is missing, malformed, or not in the safetensors format."""
