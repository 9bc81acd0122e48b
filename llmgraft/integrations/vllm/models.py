"""The token-retention model classes vLLM can load, by name; importing this module imports no vLLM model code."""

from __future__ import annotations

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
        ModelRegistry.register_model(name, f"{__package__}.retention:{name}")
