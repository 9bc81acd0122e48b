"""Every registered llmgraft ``quant_scheme`` as a vLLM quantization method, ``llmgraft-<scheme>``.

A checkpoint written by ``llmgraft quantize`` names its method in ``config.json``
(``quantization_config.quant_method = "llmgraft-w4a16"``), so vLLM picks it up with no flag (``-q
llmgraft-w4a16`` says the same). The linear method holds no format knowledge: its parameters are the
scheme's ``packed_shapes`` (sharded by vLLM's loaders along the output rows, and along the input columns
by the scheme's ``per``), and ``apply`` is the scheme's ``matmul`` on what ``prepare`` made of them after
loading. Registered by the general plugin in every vLLM process.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, UnquantizedLinearMethod,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import GroupQuantScaleParameter, ModelWeightParameter, PackedvLLMParameter

import logging

from ...hooks import get_registry
from ...hooks.names import quant_method_name

logger = logging.getLogger("llmgraft")

#: vLLM's fused linear layers, by the checkpoint modules they load.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class SchemeConfig(QuantizationConfig):
    """A llmgraft scheme as a vLLM ``QuantizationConfig`` (subclassed once per registered scheme)."""

    scheme_name: str = ""

    def __init__(self, group_size: int = 128, modules: list[str] | None = None, scheme: str | None = None,
                 online: bool = True) -> None:
        super().__init__()
        self.scheme = get_registry().get("quant_scheme", scheme or self.scheme_name)
        self.params = self.scheme.params_cls.from_mapping({"group": group_size})
        self.modules = set(modules) if modules is not None else None
        #: True for ``-q llmgraft-<scheme>`` on an unquantized checkpoint (vLLM then builds the config with
        #: no arguments): full-precision weights load and are quantized after loading.
        self.online = online

    def get_name(self) -> str:
        return quant_method_name(self.scheme_name)

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SchemeConfig:
        return cls(group_size=config.get("group_size", 128), modules=config.get("modules"),
                   scheme=config.get("scheme"), online=False)

    def quantized(self, prefix: str) -> bool:
        if self.modules is None:
            return True
        parent, _, leaf = prefix.rpartition(".")
        parts = [f"{parent}.{p}" for p in _FUSED.get(leaf, ())] or [prefix]
        hits = [p in self.modules for p in parts]
        if any(hits) and not all(hits):
            raise ValueError(f"{prefix} fuses {parts}, which the checkpoint quantized only in part")
        return all(hits)

    def get_quant_method(self, layer, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        return SchemeLinearMethod(self) if self.quantized(prefix) else UnquantizedLinearMethod()


@register_weight_loader_v2_supported_method
class SchemeLinearMethod(LinearMethodBase):
    """Parameters from the scheme's ``packed_shapes``; ``apply`` is its ``matmul``."""

    def __init__(self, config: SchemeConfig) -> None:
        self.config = config

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        scheme, params = self.config.scheme, self.config.params
        loader = extra_weight_attrs["weight_loader"]
        rows = sum(output_partition_sizes)
        if self.config.online:  # load the full-precision weight; quantized in process_weights_after_loading
            layer.register_parameter("weight", ModelWeightParameter(
                data=torch.empty(rows, input_size_per_partition, dtype=params_dtype), input_dim=1, output_dim=0,
                weight_loader=loader))
            layer.llmgraft_parts = None
            return
        shapes = scheme.packed_shapes(rows, input_size_per_partition, params)
        for name, packed in shapes.items():
            data = torch.empty(packed.shape, dtype=packed.dtype)
            if packed.per == 1:
                parameter = ModelWeightParameter(data=data, input_dim=1, output_dim=0, weight_loader=loader)
            elif packed.per == getattr(params, "group", None):
                parameter = GroupQuantScaleParameter(data=data, input_dim=1, output_dim=0, weight_loader=loader)
            else:
                parameter = PackedvLLMParameter(data=data, input_dim=1, output_dim=0, packed_dim=1,
                                                packed_factor=packed.per, weight_loader=loader)
            layer.register_parameter(name, parameter)
        layer.llmgraft_parts = tuple(shapes)

    def process_weights_after_loading(self, layer) -> None:
        scheme, params = self.config.scheme, self.config.params
        if layer.llmgraft_parts is None:
            weight = layer.weight.data
            try:
                stored = scheme.quantize(weight, params)
            except ValueError as exc:  # a shape the scheme cannot store: this layer stays in full precision
                logger.warning("llmgraft: %s left unquantized (%s)", type(layer).__name__, exc)
                layer.llmgraft_state = None
                return
            layer.llmgraft_state = scheme.prepare(stored, params)
            del layer.weight  # the full-precision copy is no longer needed
            return
        stored = {name: getattr(layer, name).data for name in layer.llmgraft_parts}
        layer.llmgraft_state = scheme.prepare(stored, params)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.llmgraft_state is None:  # left in full precision
            return torch.nn.functional.linear(x, layer.weight.to(x.dtype), bias)
        out = self.config.scheme.matmul(x, layer.llmgraft_state, self.config.params)
        return out + bias if bias is not None else out


def _config_classes() -> dict[str, type[SchemeConfig]]:
    """One ``SchemeConfig`` subclass per registered scheme, as attributes of this module: vLLM pickles the
    config into its engine processes, which find the class here by name when they import this module."""
    classes = {}
    for scheme in get_registry().names("quant_scheme"):
        title = "".join(part.title() for part in scheme.split("_"))
        name = f"Llmgraft{title}Config"
        cls = globals().get(name)
        if cls is None:
            cls = type(name, (SchemeConfig,), {"scheme_name": scheme, "__module__": __name__})
            globals()[name] = cls
        classes[quant_method_name(scheme)] = cls
    return classes


def register_schemes() -> list[str]:
    """Register ``llmgraft-<scheme>`` for every registered scheme; returns the method names."""
    classes = _config_classes()
    for method, cls in classes.items():
        register_quantization_config(method)(cls)
    return list(classes)


_config_classes()
