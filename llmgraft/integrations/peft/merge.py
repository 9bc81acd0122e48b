"""Merging PEFT LoRA adapters with any registered merger, on their exact deltas ΔW = B·A·scale.

* Methods whose merge is linear in its inputs (uniform, MWA, task arithmetic; ``Merger.linear``) stay exactly
  low-rank: the merged delta Σ c_i ΔW_i is the adapter with the inputs' ranks concatenated,
  A = [A_1; …; A_N] and B = [c_1 s_1 B_1, …, c_N s_N B_N], scale 1 (as ``add_weighted_adapter``'s "cat").
* Every method can instead give a rank-r adapter: the truncated SVD of the merged dense delta, with its
  relative error reported. Masked methods (TIES, TALL, Consensus) are full rank, so they need ``rank`` or
  :func:`merge_adapters_into_base`; nothing is truncated silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ...hooks import get_registry
from ...hooks.errors import CheckpointError, ParamError
from ...io import atomic_directory
from ...offline.merge import linear_coefficients, merge_whole


def _lora_layers(model, adapters: Sequence[str]) -> dict[str, Any]:
    """The LoRA layers of ``model`` by module name; every adapter must live in the same modules."""
    from peft.tuners.lora import LoraLayer

    configs = model.peft_config
    for name in adapters:
        if name not in configs:
            raise ParamError(f"no adapter named {name!r} in the model (adapters: {', '.join(configs)})")
        if getattr(configs[name].peft_type, "value", configs[name].peft_type) != "LORA":
            raise ParamError(f"adapter {name!r} is {configs[name].peft_type}, not LoRA")
    for name in adapters:  # what a merge of lora_A/lora_B alone would silently get wrong
        config = configs[name]
        unsupported = [label for label, present in (
            ("DoRA (use_dora)", getattr(config, "use_dora", False)),
            ("modules_to_save", bool(getattr(config, "modules_to_save", None))),
            ("layers_to_transform", getattr(config, "layers_to_transform", None) is not None),
            ("rank_pattern/alpha_pattern", bool(getattr(config, "rank_pattern", None))
             or bool(getattr(config, "alpha_pattern", None))),
        ) if present]
        if unsupported:
            raise ParamError(f"adapter {name!r} uses {', '.join(unsupported)}, which llmgraft's adapter merge does "
                             "not support yet (it merges plain LoRA deltas B·A·scale)")
    bases = {configs[n].base_model_name_or_path for n in adapters} - {None}  # add_adapter leaves it unset
    if len(bases) > 1:
        raise ParamError(f"adapters {list(adapters)} come from different base models: {sorted(map(str, bases))}")
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    embedded = [n for n, m in layers.items() if any(a in getattr(m, "lora_embedding_A", {}) for a in adapters)]
    if embedded:
        raise ParamError(f"the adapters adapt embedding layers ({embedded[0]}), which llmgraft's adapter merge does "
                         "not support yet")
    where = {a: {n for n, m in layers.items() if a in m.lora_A} for a in adapters}
    first = where[adapters[0]]
    for a in adapters[1:]:
        if where[a] != first:
            diff = sorted(first ^ where[a])[:3]
            raise ParamError(f"adapters {adapters[0]!r} and {a!r} target different modules (e.g. {diff})")
    return {n: layers[n] for n in sorted(first)}


def _delta(layer, adapter: str) -> torch.Tensor:
    """ΔW = scale·B·A of one adapter in one layer, float32 [out, in]."""
    a = layer.lora_A[adapter].weight.detach().float()
    b = layer.lora_B[adapter].weight.detach().float()
    return layer.scaling[adapter] * (b @ a)


def _dense_merge(merger, params, values, name: str, layer, adapters: Sequence[str]) -> torch.Tensor:
    """The merged dense delta of one layer: the merger over the adapters' ΔW, with a zero base (so task
    vectors are the deltas themselves)."""
    deltas = [_delta(layer, x) for x in adapters]
    return merge_whole(merger, name, torch.zeros_like(deltas[0]), deltas, values, params)["merged"]


def _method(method: str, params, per_input, adapters):
    """The merger, its parsed parameters and per-input values, checked for an adapter merge."""
    merger = get_registry().get("merger", method)
    if merger.merged_is != "model":
        raise ParamError(f"{method} produces a {merger.merged_is}, not merged weights: build its store from the "
                         "saved adapters with `llmgraft tall build --base BASE ADAPTER_DIR...`, which writes each "
                         "adapter into a full model first")
    parsed = merger.params_cls.from_mapping(params or {})
    values = [dict(v) for v in per_input] if per_input is not None else [{} for _ in adapters]
    if len(values) != len(adapters):
        raise ParamError(f"{len(values)} sets of per-input values for {len(adapters)} adapters")
    merger.check_inputs(values, parsed)
    return merger, parsed, values


def merge_adapters(model, adapters: Sequence[str], method: str, adapter_name: str = "merged", *,
                   params: Mapping[str, Any] | None = None, per_input: Sequence[Mapping[str, Any]] | None = None,
                   rank: int | None = None) -> dict[str, Any]:
    """Add ``adapter_name`` to the PEFT ``model``: the merge of its LoRA ``adapters`` with merger ``method``.

    Linear methods give the exact concatenated-rank adapter (unless ``rank`` asks for an SVD); others need
    ``rank``. Returns a report: the method, the rank, per-module and overall relative Frobenius error of the
    factorisation (0 when exact)."""
    from peft import LoraConfig

    merger, parsed, values = _method(method, params, per_input, adapters)
    if adapter_name in model.peft_config:
        raise ParamError(f"an adapter named {adapter_name!r} already exists")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ParamError(f"adapter name {adapter_name!r} must be a non-empty string without '.' (PEFT stores "
                         "adapters as submodules of that name)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ParamError(f"rank must be a positive integer, got {rank!r}")
    layers = _lora_layers(model, list(adapters))
    exact = merger.linear and rank is None
    if not merger.linear and rank is None:
        raise ParamError(f"{method} gives full-rank deltas: pass rank=r (CLI: --rank) to re-factorise them with an "
                         "SVD (the relative error is reported), or write a full merged model with "
                         "merge_adapters_into_base (CLI: --into-base)")
    factors, errors, total, residual = {}, {}, 0.0, 0.0
    if exact:
        c0, cs = linear_coefficients(merger, parsed, values)
        if abs(c0 + sum(cs) - 1.0) > 1e-5:  # float32 arithmetic inside the merger
            raise ParamError(f"{method}: coefficients {cs} (base {c0}) do not sum to 1, so the merge is not a "
                             "delta on the base")
        for name, layer in layers.items():
            a = torch.cat([layer.lora_A[x].weight.detach().float() for x in adapters], 0)
            b = torch.cat([c * layer.scaling[x] * layer.lora_B[x].weight.detach().float()
                           for c, x in zip(cs, adapters)], 1)
            factors[name] = (a, b)
            errors[name] = 0.0
        new_rank = factors[next(iter(factors))][0].shape[0]
    else:
        new_rank = rank
        for name, layer in layers.items():
            merged = _dense_merge(merger, parsed, values, name, layer, adapters)
            u, s, vh = torch.linalg.svd(merged.float(), full_matrices=False)
            r = min(rank, s.numel())
            b = (u[:, :r] * s[:r]).float()
            a = vh[:r].float()
            if r < rank:  # pad to the requested rank (all modules of one adapter share r)
                b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
                a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
            factors[name] = (a, b)
            norm = float(merged.double().norm())
            lost = float(s[r:].double().square().sum().sqrt())
            errors[name] = lost / norm if norm > 0 else 0.0
            total += norm ** 2
            residual += lost ** 2
    config = model.peft_config[adapters[0]]
    target = sorted({name.rsplit(".", 1)[-1] for name in layers})
    new = LoraConfig(r=new_rank, lora_alpha=new_rank, target_modules=target, lora_dropout=0.0,
                     bias=config.bias, task_type=config.task_type, init_lora_weights=False)
    model.add_adapter(adapter_name, new)
    with torch.no_grad():
        for name, layer in dict(model.named_modules()).items():
            if name in factors:
                a, b = factors[name]
                layer.lora_A[adapter_name].weight.copy_(a.to(layer.lora_A[adapter_name].weight.dtype))
                layer.lora_B[adapter_name].weight.copy_(b.to(layer.lora_B[adapter_name].weight.dtype))
                layer.scaling[adapter_name] = 1.0
    overall = (residual / total) ** 0.5 if total > 0 else 0.0
    return {"method": method, "adapter": adapter_name, "rank": new_rank, "exact": exact,
            "relative_error": overall, "module_errors": errors}


def merge_adapters_into_base(model, adapters: Sequence[str], method: str, out: str | Path, *,
                             params: Mapping[str, Any] | None = None,
                             per_input: Sequence[Mapping[str, Any]] | None = None, force: bool = False,
                             tokenizer=None) -> dict[str, Any]:
    """Write a full model directory: the base weights plus the merged dense delta of ``adapters``, for any
    method (masked methods' deltas are full rank). The PEFT model itself is left unchanged."""
    from ...offline.merge import check_output

    out = check_output(out, force, [])
    merger, parsed, values = _method(method, params, per_input, adapters)
    layers = _lora_layers(model, list(adapters))
    base_model = model.get_base_model()
    relative = {id(module): name for name, module in base_model.named_modules()}
    merged_deltas = {}
    for _, layer in layers.items():
        name = relative[id(layer)]  # the module's name inside the base model's state dict
        merged_deltas[name] = _dense_merge(merger, parsed, values, name, layer, adapters)
    with torch.no_grad():
        state = {}
        for key, value in base_model.state_dict().items():
            module = key.removesuffix(".base_layer.weight")
            if key.endswith(".base_layer.weight") and module in merged_deltas:
                value = (value.float() + merged_deltas[module]).to(value.dtype)
            if "lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value
    with atomic_directory(out) as tmp:
        clean = type(base_model)(base_model.config)
        loaded = clean.load_state_dict(state, strict=False)
        tied = {k for k in loaded.missing_keys if getattr(base_model.config, "tie_word_embeddings", False)
                and k.endswith("lm_head.weight")}
        if set(loaded.missing_keys) - tied or loaded.unexpected_keys:
            raise CheckpointError(f"the merged weights do not fit {type(base_model).__name__}: missing "
                                  f"{sorted(set(loaded.missing_keys) - tied)[:3]}, unexpected {loaded.unexpected_keys[:3]}")
        clean.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "llmgraft_merge.json").write_text(json.dumps(
            {"method": method, "params": parsed.to_dict(), "adapters": list(adapters), "per_input": values}, indent=2))
    return {"method": method, "out": str(out), "modules": len(merged_deltas)}


def is_adapter_dir(path: str | Path) -> bool:
    """A saved PEFT adapter (``adapter_config.json`` beside its weights), not a full model."""
    return (Path(path) / "adapter_config.json").is_file()


def merge_adapter_dirs(adapters: Sequence[str | Path], method: str, out: str | Path, *,
                       base: str | Path | None = None, params: Mapping[str, Any] | None = None,
                       per_input: Sequence[Mapping[str, Any]] | None = None, rank: int | None = None,
                       into_base: bool = False, force: bool = False) -> dict[str, Any]:
    """Merge saved LoRA adapter directories (e.g. the checkpoints of one PEFT run) into ``out``.

    Loads the base model they name (or ``base``) and every adapter, merges them with :func:`merge_adapters`
    and saves the result as an adapter directory (exact for linear methods; ``rank`` for an SVD), or with
    ``into_base`` as a full merged model (:func:`merge_adapters_into_base`). MWA's metrics come from each
    directory's ``trainer_state.json`` unless ``per_input`` gives them."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...offline.checkpoints import Checkpoint
    from ...offline.merge import check_output, trainer_metrics

    paths = [Path(p) for p in adapters]
    out = check_output(out, force, [*paths, base])
    if into_base and rank is not None:
        raise ParamError("rank applies to a merged adapter; a full merged model (into_base) has no rank")
    configs = []
    for path in paths:
        if not is_adapter_dir(path):
            raise CheckpointError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
        configs.append(PeftConfig.from_pretrained(str(path)))
        Checkpoint(path).close()  # safetensors weights, header and sizes intact: a clear error before any load
    bases = {c.base_model_name_or_path for c in configs}
    if base is None:
        if len(bases) != 1:
            raise ParamError(f"the adapters name different base models ({sorted(map(str, bases))}); pass --base")
        base = next(iter(bases))
    if base is None or not Path(base).is_dir():
        raise CheckpointError(f"base model {base!r} is not a local model directory; pass --base")
    values = [dict(v) for v in per_input] if per_input is not None else [{} for _ in paths]
    merger = get_registry().get("merger", method)
    for value, path in zip(values, paths):
        for key, metric in trainer_metrics(path).items():
            if key in merger.input_values:
                value.setdefault(key, metric)
    # The base's own dtype (a full merged model keeps it); adapters merge in float32 whatever it is.
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto" if into_base else torch.float32)
    names = [f"input{i}" for i in range(len(paths))]
    model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        model.load_adapter(str(path), adapter_name=name)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
    except Exception:  # noqa: BLE001 - a model directory without a tokenizer is fine
        pass
    if into_base:
        return merge_adapters_into_base(model, names, method, out, params=params, per_input=values, force=force,
                                        tokenizer=tokenizer)
    report = merge_adapters(model, names, method, "merged", params=params, per_input=values, rank=rank)
    model.peft_config["merged"].base_model_name_or_path = str(Path(base).resolve())
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["merged"])
        saved = tmp / "merged" if (tmp / "merged").is_dir() else tmp
        if saved != tmp:
            for item in saved.iterdir():
                item.rename(tmp / item.name)
            saved.rmdir()
        (tmp / "llmgraft_merge.json").write_text(json.dumps(
            {**{k: v for k, v in report.items() if k != "module_errors"}, "inputs": [str(p) for p in paths],
             "per_input": values, "params": dict(params or {})}, indent=2))
    return report
