"""Weight quantization: the W4A16 and Sherry-ternary formats (``quant_scheme``) and the offline pass that
writes a quantized checkpoint (``optimizer`` "quantize"). Formats and kernels: ``llmgraft.kernels.quant``."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..hooks import Optimizer, ParamError, Params, QuantScheme, choice, get_registry, hookimpl, param
from ..hooks.families import PackedTensor
from ..hooks.names import quant_method_name
from ..kernels import quant as kq


@dataclass(frozen=True)
class GroupParams(Params):
    owner = "quant_scheme"
    group: int = param(128, range="[32, inf)", help="input columns per scale (a multiple of 32; 128 by default)")

    def validate(self) -> None:
        if self.group % 32:
            raise ParamError(f"{self.owner}: group must be a multiple of 32, got {self.group}")


class _Scheme(QuantScheme):
    params_cls = GroupParams

    def prepare(self, stored, params):
        rows = next(iter(stored.values())).shape[0]
        cols = self.in_features(stored, params)
        device = next(iter(stored.values())).device
        if device.type == "cpu" and kq.int4pack_supported(rows, cols, params.group):
            return self._int4pack(stored, params.group)
        if device.type == "cuda" and os.environ.get("LLMGRAFT_TRITON_QUANT") == "1":
            # Opt-in until GPU figures are measured: the Triton kernel unpacks in registers.
            return {"triton": {name: t.contiguous() for name, t in stored.items()}}
        return {"dense": self.dequantize(stored, params)}

    def matmul(self, x, state, params):
        if "int4pack" in state:
            return kq.int4pack_matmul(x, state)
        if "triton" in state:
            return self._triton(x, state["triton"], params.group)
        if "dense" not in state:  # stored tensors, not prepared
            state = {"dense": self.dequantize(state, params)}
        return kq.dense_matmul(x, state["dense"])


class W4A16(_Scheme):
    name = "w4a16"
    description = "group-wise asymmetric int4 weights (scale and zero point per group), 16-bit activations"
    bits = 4.0

    def packed_shapes(self, out_features, in_features, params):
        kq.check_shape(out_features, in_features, params.group)
        groups = in_features // params.group
        return {"qweight": PackedTensor((out_features, in_features // 2), torch.uint8, per=2),
                "scales": PackedTensor((out_features, groups), torch.float16, per=params.group),
                "zeros": PackedTensor((out_features, groups), torch.uint8, per=params.group)}

    def in_features(self, stored, params):
        return stored["qweight"].shape[1] * 2

    def quantize(self, weight, params):
        return kq.quantize_w4(weight, params.group)

    def dequantize(self, stored, params):
        return kq.dequantize_w4(stored, params.group)

    def _int4pack(self, stored, group):
        return kq.w4_int4pack_state(stored, group)

    def _triton(self, x, stored, group):
        from ..kernels.quant_triton import w4_matmul

        return w4_matmul(x, stored, group)


class Ternary(_Scheme):
    name = "ternary"
    description = "Sherry 1.25-bit ternary: 3:4 sparse ±1 weights in 5-bit block codes, a scale per group"
    bits = 1.25

    def packed_shapes(self, out_features, in_features, params):
        kq.check_shape(out_features, in_features, params.group, multiple=32)
        return {"codes_lo": PackedTensor((out_features, in_features // 8), torch.uint8, per=8),
                "codes_hi": PackedTensor((out_features, in_features // 32), torch.uint8, per=32),
                "scales": PackedTensor((out_features, in_features // params.group), torch.float16,
                                       per=params.group)}

    def in_features(self, stored, params):
        return stored["codes_lo"].shape[1] * 8

    def quantize(self, weight, params):
        return kq.quantize_ternary(weight, params.group)

    def dequantize(self, stored, params):
        return kq.dequantize_ternary(stored, params.group)

    def _int4pack(self, stored, group):
        return kq.ternary_int4pack_state(stored, group)

    def _triton(self, x, stored, group):
        from ..kernels.quant_triton import ternary_matmul

        return ternary_matmul(x, stored, group)


#: Decoder linear layers by default: every ``*_proj`` weight inside ``layers.N`` (embeddings and the LM head
#: stay as they are).
DEFAULT_MODULES = r"(^|\.)layers\.\d+\..*_proj$"


@dataclass(frozen=True)
class QuantizeParams(Params):
    owner = "quantize"
    scheme: str = param("w4a16", help="a registered quant_scheme: w4a16, ternary, ...")
    group: int = param(128, range="[32, inf)", help="input columns per scale (a multiple of 32)")
    modules: str = param(DEFAULT_MODULES, help="regex over module names (weight name without '.weight') to "
                         "quantize")


class Quantize(Optimizer):
    name = "quantize"
    description = "write a checkpoint with its linear layers in a registered quant_scheme (streamed, atomic)"
    params_cls = QuantizeParams

    def run(self, src, dst, params, host=None, progress=None) -> dict[str, Any]:
        from ..offline.checkpoints import Checkpoint, write_checkpoint

        scheme = get_registry().get("quant_scheme", params.scheme)
        scheme_params = scheme.params_cls.from_mapping({"group": params.group})
        src, dst = Path(src), Path(dst)
        config = json.loads((src / "config.json").read_text())
        if "quantization_config" in config:
            raise ParamError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
        pattern = re.compile(params.modules)
        checkpoint = Checkpoint(src)
        try:
            plan, quantized, skipped = [], [], {}
            for name, info in checkpoint.tensors.items():
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                shapes = None
                if module is not None and len(info.shape) == 2 and pattern.search(module):
                    try:
                        shapes = scheme.packed_shapes(info.shape[0], info.shape[1], scheme_params)
                    except ValueError as exc:  # left in full precision, and reported
                        skipped[module] = str(exc)
                if shapes is None:
                    plan.append((name, info.dtype, tuple(info.shape)))
                    continue
                plan += [(f"{module}.{part}", packed.dtype, packed.shape) for part, packed in shapes.items()]
                quantized.append(module)
            if not quantized:
                why = f" ({next(iter(skipped.values()))})" if skipped else ""
                raise ParamError(f"no 2-D weight of {src} matching modules={params.modules!r} can be stored as "
                                 f"{scheme.name} with group {params.group}{why}")
            config["quantization_config"] = {"quant_method": quant_method_name(scheme.name), "scheme": scheme.name,
                                             "group_size": params.group, "modules": quantized}
            sizes = {"before": 0, "after": 0}

            def converted():
                for name in checkpoint.tensors:
                    tensor = checkpoint.read(name)
                    module = name[: -len(".weight")] if name.endswith(".weight") else None
                    if module not in quantized:
                        yield name, tensor
                        continue
                    sizes["before"] += tensor.numel() * tensor.element_size()
                    for part, value in scheme.quantize(tensor, scheme_params).items():
                        sizes["after"] += value.numel() * value.element_size()
                        yield f"{module}.{part}", value
                    if progress is not None:
                        progress(module)

            write_checkpoint(checkpoint, dst, plan, converted(), config)
        finally:
            checkpoint.close()
        return {"scheme": scheme.name, "group": params.group, "modules": len(quantized), "skipped": skipped,
                "bytes_before": sizes["before"], "bytes_after": sizes["after"]}


@hookimpl
def llmgraft_register_quant_schemes(register):
    register(W4A16())
    register(Ternary())


@hookimpl
def llmgraft_register_optimizers(register):
    register(Quantize())
