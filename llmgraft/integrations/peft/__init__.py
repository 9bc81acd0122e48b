"""PEFT integration: merging LoRA adapters with any registered merger (``merge_adapters``,
``merge_adapters_into_base``)."""

from .merge import merge_adapters, merge_adapters_into_base

__all__ = ["merge_adapters", "merge_adapters_into_base"]
