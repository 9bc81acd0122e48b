"""PEFT integration.

- Adapter types: importing this module registers every llmgraft adapter (built-in and third-party) as a PEFT
  method, so ``get_peft_model(base, MoSConfig(...))`` and ``PeftModel.from_pretrained`` work as for LoRA.
  ``config_class(name)`` gives any adapter's config class; ``export_lora`` writes a saved adapter as a plain
  LoRA adapter (dense per-layer A and B) that vLLM serves with ``--enable-lora``.
- Merging LoRA adapters with any registered merger: ``merge_adapters`` in a model, ``merge_adapter_dirs``
  for saved adapter directories, ``merge_adapters_into_base`` for a full model.
"""

from .export import export_lora
from .merge import is_adapter_dir, merge_adapter_dirs, merge_adapters, merge_adapters_into_base
from .tuner import config_class, extend_peft_type, register_all

MoSConfig = config_class("mos")
register_all()


def __getattr__(name: str):
    # ``<Title>Config`` of any adapter a third-party plugin registered.
    configs = register_all()
    if name.endswith("Config") and name[:-len("Config")] in configs:
        return configs[name[:-len("Config")]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MoSConfig", "config_class", "export_lora", "extend_peft_type", "is_adapter_dir", "merge_adapter_dirs",
           "merge_adapters", "merge_adapters_into_base", "register_all"]
