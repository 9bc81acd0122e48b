"""A saved llmgraft adapter (MoS, or any adapter type) as a plain PEFT LoRA adapter: each layer's factors
(A_l, B_l), computed from the saved tensors alone (no base model), written as ``lora_A``/``lora_B`` with
``lora_alpha = scaling · r``, so the LoRA adds exactly the same ΔW. vLLM serves the result with
``--enable-lora``; PEFT, transformers and every LoRA tool load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...hooks import CheckpointError, get_registry
from ...io import atomic_directory
from .tuner import split_shared_key

_WEIGHTS = "adapter_model.safetensors"


def adapter_of(peft_type: str):
    """The llmgraft adapter whose PEFT type is ``peft_type`` (``"MOS"``), or None."""
    registry = get_registry()
    for name in registry.names("adapter"):
        if registry.get("adapter", name).title.upper() == str(peft_type).upper():
            return registry.get("adapter", name)
    return None


def read_adapter_dir(path: str | Path) -> tuple[Any, Any, dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """(adapter, params, state) of a saved llmgraft adapter: ``state`` has "shared" (by group), "own" and
    "fixed" (by layer name, as in the model), read from the safetensors file alone."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PEFT adapter directory ({exc})") from None
    adapter = adapter_of(config.get("peft_type", ""))
    if adapter is None:
        known = sorted(get_registry().get("adapter", n).title.upper() for n in get_registry().names("adapter"))
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not an llmgraft adapter type "
                              f"({', '.join(known)})" + ("; it is a LoRA already" if config.get("peft_type") ==
                                                         "LORA" else ""))
    if not (path / _WEIGHTS).is_file():
        raise CheckpointError(f"{path}: no {_WEIGHTS} (llmgraft reads safetensors only, never pickles)")
    params = adapter.params_cls.from_mapping({f: config[f] for f in adapter.params_cls.field_names() if f in config})
    state: dict[str, dict[str, dict[str, torch.Tensor]]] = {"shared": {}, "own": {}, "fixed": {}}
    marks = {part: f".{adapter.name}_{part}." for part in state}
    for key, tensor in load_file(str(path / _WEIGHTS)).items():
        for part, mark in marks.items():
            if mark in key:
                owner, name = key.split(mark, 1)
                if part == "shared":
                    owner, name = split_shared_key(name)
                else:
                    owner = owner.removeprefix("base_model.model.")
                state[part].setdefault(owner, {})[name] = tensor
                break
    if not state["own"] and not state["fixed"]:
        raise CheckpointError(f"{path}: the weights hold no {adapter.title} layer tensors")
    return adapter, params, state


def export_lora(adapter_dir: str | Path, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write the saved llmgraft adapter at ``adapter_dir`` as a plain LoRA adapter at ``out`` (atomically).

    Each layer's LoRA is its exact (A_l, B_l) at rank r with ``lora_alpha = scaling · r``, so PEFT, vLLM and
    every LoRA tool add the same ΔW. ``target_modules`` lists the adapted layers by full name. Returns a report
    (``target_modules`` there: the adapted module types)."""
    from peft import LoraConfig

    from ...offline.merge import check_output

    adapter_dir = Path(adapter_dir)
    out = check_output(out, force, [adapter_dir])
    adapter, params, state = read_adapter_dir(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights, ranks = {}, set()
    for layer in sorted(set(state["own"]) | set(state["fixed"])):
        shared = state["shared"].get(adapter.group(layer), {})
        a, b = adapter.factors(shared, state["own"].get(layer, {}), state["fixed"].get(layer, {}), params)
        weights[f"base_model.model.{layer}.lora_A.weight"] = a.contiguous()
        weights[f"base_model.model.{layer}.lora_B.weight"] = b.contiguous()
        ranks.add(a.shape[0])
    if len(ranks) != 1:
        raise CheckpointError(f"{adapter_dir}: layers of ranks {sorted(ranks)}; a LoRA adapter needs one rank")
    rank = ranks.pop()
    layers = sorted(set(state["own"]) | set(state["fixed"]))
    modules = sorted({layer.rsplit(".", 1)[-1] for layer in layers})
    # Exactly the adapted layers (PEFT matches a full name exactly), so that excluded layers stay excluded.
    lora = LoraConfig(r=rank, lora_alpha=adapter.scaling(params) * rank, target_modules=layers, lora_dropout=0.0,
                      base_model_name_or_path=config.get("base_model_name_or_path"),
                      task_type=config.get("task_type"), inference_mode=True)
    from safetensors.torch import save_file

    with atomic_directory(out) as tmp:
        lora.save_pretrained(str(tmp))
        save_file(weights, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        (tmp / "llmgraft_export.json").write_text(json.dumps(
            {"from": str(adapter_dir.resolve()), "peft_type": config.get("peft_type"), "rank": rank,
             "layers": len(weights) // 2, "params": params.to_dict()}, indent=2) + "\n")
    return {"rank": rank, "layers": len(weights) // 2, "lora_alpha": lora.lora_alpha, "target_modules": modules,
            "out": str(out)}
