"""One minimal third-party method per family (attention, kv_manager, optimizer, merger, adapter,
quant_scheme), registered by a third-party plugin: fixtures for the contract test, not methods anyone should
use."""
import json
import shutil
from dataclasses import dataclass

import torch

from llmgraft import (Adapter, AdapterState, Attention, KVManager, Merger, Optimizer, PackedTensor, Params, QuantScheme,
                      hookimpl, param)
from llmgraft.io import atomic_directory


@dataclass(frozen=True)
class NoParams(Params):
    pass


@dataclass(frozen=True)
class Window(Params):
    owner = "window"
    k: int = param(1, range="[1, inf)", help="how many layers")


@dataclass(frozen=True)
class Stride(Params):
    owner = "strided"
    n: int = param(3, range="[1, inf)", help="the stride")


class MedianMerger(Merger):
    name, description, params_cls = "median", "entrywise median of the inputs", NoParams

    def merge(self, name, base, inputs, per_input, params):
        return {"merged": torch.stack(inputs).median(0).values}


class Strided(Attention):
    name, description, params_cls = "strided", "prefer every n-th prompt token counted from the end, recent first", Stride

    def score(self, query, keys, valid, params):
        distance = torch.arange(valid.shape[1] - 1, -1, -1, device=valid.device)
        # Ties broken toward recent tokens, so a row's choice does not depend on its padding.
        return ((distance % params.n == 0).float() - 1e-3 * distance).expand(valid.shape)


class FirstLayers(KVManager):
    name, description, params_cls = "first_layers", "cut the prompt KV of the first n layers", Window

    def truncated_layers(self, stage_layers, stage, num_layers, params):
        return tuple(range(min(params.k, stage_layers[stage] + 1)))


class Copy(Optimizer):
    name, description, params_cls = "copy", "copy a checkpoint unchanged (atomically)", NoParams

    def run(self, src, dst, params, host):
        with atomic_directory(dst) as tmp:
            for path in src.iterdir():
                shutil.copy2(path, tmp / path.name)
        return {"files": sorted(p.name for p in dst.iterdir()), "config": json.loads((dst / "config.json").read_text())["model_type"]}


@dataclass(frozen=True)
class LoRAParams(Params):
    owner = "plain_lora"
    r: int = param(4, range="[1, inf)", help="rank of each layer's A and B")
    alpha: float = param(8.0, range="(0, inf)", help="scaling numerator: ΔW = (alpha / r) B A")
    dropout: float = param(0.0, range="[0, 1)", help="dropout on the adapter's input")
    init_weights: bool = param(True, help="True: B starts at zero; False: random B")


class PlainLoRA(Adapter):
    """Per-layer LoRA with no shared state: a third-party adapter type that reaches PEFT through the hook."""

    name, title, params_cls = "plain_lora", "PlainLoRA", LoRAParams
    description = "per-layer LoRA (A, B on each layer), the third-party adapter fixture"

    def init_state(self, layers, params):
        gen = torch.Generator().manual_seed(0)
        own = {}
        for layer in layers:
            b = torch.zeros(layer.d_out, params.r)
            if not params.init_weights:
                b.normal_(generator=gen)
            own[layer.name] = {"A": torch.randn(params.r, layer.d_in, generator=gen) / layer.d_in ** 0.5, "B": b}
        return AdapterState(shared={}, own=own, fixed={})

    def factors(self, shared, own, fixed, params):
        return own["A"], own["B"]


@dataclass(frozen=True)
class Int8Groups(Params):
    owner = "int8_groups"
    group: int = param(32, range="[1, inf)", help="input columns per absmax scale")


class Int8GroupScheme(QuantScheme):
    """int8 codes with one float16 absmax scale per group of input columns (W8A16), dequantized to multiply."""

    name = "int8_groups"
    description = "int8 weights, one absmax scale per group of input columns (a contract fixture)"
    params_cls = Int8Groups
    bits = 8.0

    def packed_shapes(self, out_features, in_features, params):
        return {"codes": PackedTensor((out_features, in_features), torch.int8),
                "scales": PackedTensor((out_features, in_features // params.group), torch.float16, per=params.group)}

    def quantize(self, weight, params):
        grouped = weight.float().reshape(weight.shape[0], -1, params.group)
        scales = (grouped.abs().amax(-1) / 127).clamp(min=1e-8).half()
        codes = (grouped / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
        return {"codes": codes.reshape(weight.shape), "scales": scales}

    def dequantize(self, stored, params):
        codes, scales = stored["codes"], stored["scales"]
        grouped = codes.float().reshape(codes.shape[0], -1, params.group) * scales.float()[..., None]
        return grouped.reshape(codes.shape)

    def matmul(self, x, state, params):
        return (x.float() @ self.dequantize(state, params).T).to(x.dtype)


@hookimpl
def llmgraft_register_quant_schemes(register):
    register(Int8GroupScheme())


@hookimpl
def llmgraft_register_mergers(register):
    register(MedianMerger())


@hookimpl
def llmgraft_register_attention(register):
    register(Strided())


@hookimpl
def llmgraft_register_kv_managers(register):
    register(FirstLayers())


@hookimpl
def llmgraft_register_optimizers(register):
    register(Copy())


@hookimpl
def llmgraft_register_adapters(register):
    register(PlainLoRA())
