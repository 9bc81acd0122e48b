"""PEFT integration: merging LoRA adapters with any registered merger (``merge_adapters`` in a model,
``merge_adapter_dirs`` for saved adapter directories, ``merge_adapters_into_base`` for a full model)."""

from .merge import is_adapter_dir, merge_adapter_dirs, merge_adapters, merge_adapters_into_base

__all__ = ["is_adapter_dir", "merge_adapter_dirs", "merge_adapters", "merge_adapters_into_base"]
