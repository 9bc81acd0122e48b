"""Every registered llmgraft ``quant_scheme`` as a transformers quantization method, ``llmgraft-<scheme>``:
``from_pretrained`` on a checkpoint written by ``llmgraft quantize`` swaps the quantized linear layers for
:class:`QuantLinear` before the weights load, so the stored tensors load as they are.

Call :func:`register_schemes` (``import llmgraft.integrations.transformers`` does) before
``from_pretrained``: transformers knows the method only once it is registered, and an unknown one fails.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config,
                                          register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ...hooks import get_registry
from ...hooks.names import quant_method_name


class QuantLinear(nn.Module):
    """A linear layer stored in a llmgraft scheme: the scheme's tensors as buffers, its ``matmul`` as the
    forward (prepared once, on the first call, for the device the buffers are on)."""

    def __init__(self, scheme: Any, params: Any, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.scheme, self.params = scheme, params
        self.in_features, self.out_features = in_features, out_features
        shapes = scheme.packed_shapes(out_features, in_features, params)
        for name, packed in shapes.items():
            self.register_buffer(name, torch.empty(packed.shape, dtype=packed.dtype))
        self.parts = tuple(shapes)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._state: Any = None
        self._state_key: tuple | None = None

    def check(self, name: str) -> None:
        """A clear error when a loaded tensor is not the shape or dtype the scheme stores (a corrupted file)."""
        for part, packed in self.scheme.packed_shapes(self.out_features, self.in_features, self.params).items():
            tensor = getattr(self, part)
            if tuple(tensor.shape) != tuple(packed.shape) or tensor.dtype != packed.dtype:
                raise ValueError(f"{name}.{part} is {tuple(tensor.shape)} {tensor.dtype}, but a {self.scheme.name} "
                                 f"[{self.out_features}, {self.in_features}] layer stores {tuple(packed.shape)} "
                                 f"{packed.dtype}: the checkpoint is corrupted or from another scheme/group size")

    def stored(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.parts}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = self.stored()
        key = tuple((t.data_ptr(), t.device) for t in stored.values())
        if key != self._state_key:  # first call, or the buffers moved or were reloaded
            self._state, self._state_key = self.scheme.prepare(stored, self.params), key
        out = self.scheme.matmul(x, self._state, self.params)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


class SchemeQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a llmgraft-quantized checkpoint: scheme, group size and quantized modules."""

    scheme_name = ""

    def __init__(self, scheme: str | None = None, group_size: int = 128, modules: list[str] | None = None,
                 **kwargs) -> None:
        self.scheme = scheme or self.scheme_name
        self.quant_method = quant_method_name(self.scheme)
        self.group_size = group_size
        self.modules = list(modules or [])


class SchemeQuantizer(HfQuantizer):
    """Loads pre-quantized checkpoints only (``llmgraft quantize`` writes them)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        config = self.quantization_config
        scheme = get_registry().get("quant_scheme", config.scheme)
        params = scheme.params_cls.from_mapping({"group": config.group_size})
        wanted = set(config.modules)
        for name, module in list(model.named_modules()):
            if name in wanted:
                if not isinstance(module, nn.Linear):
                    raise TypeError(f"{name} is a {type(module).__name__}, not a Linear layer to quantize")
                parent, _, leaf = name.rpartition(".")
                replacement = QuantLinear(scheme, params, module.in_features, module.out_features,
                                          module.bias is not None)
                setattr(model.get_submodule(parent) if parent else model, leaf, replacement)
                wanted.discard(name)
        if wanted:
            raise ValueError(f"the checkpoint quantized modules this model does not have: {sorted(wanted)[:3]}")

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                module.check(name)
        return model

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register_schemes() -> list[str]:
    """Register ``llmgraft-<scheme>`` with transformers for every registered scheme (idempotent)."""
    names = []
    for scheme in get_registry().names("quant_scheme"):
        method = quant_method_name(scheme)
        names.append(method)
        if method in AUTO_QUANTIZATION_CONFIG_MAPPING:
            continue
        title = "".join(part.title() for part in scheme.split("_"))
        config = type(f"Llmgraft{title}Config", (SchemeQuantizationConfig,), {"scheme_name": scheme})
        register_quantization_config(method)(config)
        register_quantizer(method)(type(f"Llmgraft{title}Quantizer", (SchemeQuantizer,), {}))
    return names
