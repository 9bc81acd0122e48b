"""vLLM integration: entry points ``vllm.general_plugins`` (:func:`register`) and ``vllm.logits_processors``
(:class:`GraftSampling`).

vLLM imports this module in every engine of the environment and an import error there is fatal, so it
imports only what the logits-processor interface needs; samplers load lazily on first use.
"""

from .sampling import GraftSampling

#: Out-of-tree model classes with token retention, by the stock architecture each one extends; select one
#: with ``--hf-overrides '{"architectures": ["LlmgraftLlamaForCausalLM"]}'``.
RETENTION_ARCHITECTURES = {"LlmgraftLlamaForCausalLM": "LlamaForCausalLM",
                           "LlmgraftQwen2ForCausalLM": "Qwen2ForCausalLM",
                           "LlmgraftMistralForCausalLM": "MistralForCausalLM"}


def register_models() -> None:
    """Register the token-retention model classes with vLLM, lazily (by import path): the module that
    defines them imports vLLM's model code, which only an engine that selects one of them pays for."""
    from vllm import ModelRegistry

    for name in RETENTION_ARCHITECTURES:
        ModelRegistry.register_model(name, f"{__name__}.retention:{name}")


def register() -> None:
    """vLLM general-plugin hook, run in every vLLM process (front end and workers).

    Loads the llmgraft registry, so that a broken third-party plugin is reported (once, by the registry's
    warning) in each process's log at start-up rather than on the first request that names it.
    """
    import logging

    from ...hooks import get_registry
    from .startup import install

    install()
    register_models()
    registry = get_registry()
    logging.getLogger("llmgraft").info(
        "llmgraft plugins: %s", ", ".join(f"{e.family}:{e.name}" for e in registry.all_entries()))


__all__ = ["RETENTION_ARCHITECTURES", "GraftSampling", "register", "register_models"]
