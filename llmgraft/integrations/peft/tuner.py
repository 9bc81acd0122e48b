"""Every registered llmgraft adapter as a PEFT method of its own.

For an :class:`llmgraft.Adapter` this module builds, once, the three classes PEFT's own methods have: a
``PeftConfig`` dataclass (``<title>Config``: the adapter's parameters plus ``target_modules`` and
``exclude_modules``), a ``BaseTunerLayer`` that wraps each target ``nn.Linear`` and a ``BaseTuner`` that owns
the state shared across layers (MoS's pools), and registers them with ``register_peft_method`` under
``peft_type`` ``<TITLE>``, adding that member to ``PeftType`` at run time. No method's math lives here: the
layer asks the adapter for its factors (A, B) and adds ``scaling · B(A(dropout(x)))``.

Saved adapters hold the shared tensors once, as ``base_model.<name>_shared.<group>__<key>``, each layer's own
tensors as ``<layer>.<name>_own.<key>`` and its fixed ones (indices) as ``<layer>.<name>_fixed.<key>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import warnings
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    check_adapters_to_merge,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, PeftType, register_peft_method
from torch import nn

from ...hooks import AdaptedLayer, Adapter, LLMGraftError, get_registry

_SEP = "__"  # between group and key in the shared store ("q_proj__A"): module names cannot hold dots


def extend_peft_type(name: str) -> PeftType:
    """``PeftType[name]``, added to the enum at run time when PEFT lacks it (idempotent)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def shared_key(group: str, key: str) -> str:
    """The shared store's key of tensor ``key`` of ``group``."""
    return f"{group}{_SEP}{key}"


def split_shared_key(name: str) -> tuple[str, str]:
    group, _, key = name.rpartition(_SEP)
    return group, key


def _linear(module: nn.Module, adapter: Adapter, key: str) -> nn.Linear:
    """The plain ``nn.Linear`` under ``module`` (a wrapped one's base layer), or a TypeError saying why not."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{adapter.title} adapts nn.Linear layers only; target {key!r} is a {type(base).__name__}")
    if not base.weight.dtype.is_floating_point or type(base).__module__.startswith("bitsandbytes"):
        raise TypeError(f"{adapter.title} cannot adapt the quantized layer {key!r} ({type(base).__name__}): "
                        "merging into packed weights is not supported; load the base model unquantized")
    return base


class AdapterLayer(nn.Module, BaseTunerLayer):
    """A target ``nn.Linear`` with llmgraft adapters on it (one subclass per adapter type)."""

    llmgraft_adapter: Adapter
    adapter_layer_names: tuple[str, ...]
    other_param_names: tuple[str, ...]

    def __init__(self, base_layer: nn.Module, store: nn.ModuleDict) -> None:
        super().__init__()
        base = _linear(base_layer, self.llmgraft_adapter, "this layer")
        self.base_layer = base_layer
        prefix = self.llmgraft_adapter.name
        setattr(self, f"{prefix}_own", nn.ModuleDict())
        setattr(self, f"{prefix}_fixed", nn.ModuleDict())
        setattr(self, f"{prefix}_dropout", nn.ModuleDict())
        setattr(self, f"{prefix}_params", {})
        setattr(self, f"{prefix}_group", {})
        self.__dict__["_shared_store"] = store  # the tuner owns it; a submodule here would save it per layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = base.in_features, base.out_features

    def _part(self, what: str) -> Any:
        return getattr(self, f"{self.llmgraft_adapter.name}_{what}")

    def update_layer(self, adapter_name: str, params, group: str, own: dict, fixed: dict,
                     inference_mode: bool = False) -> None:
        self._part("params")[adapter_name] = params
        self._part("group")[adapter_name] = group
        self._part("dropout")[adapter_name] = nn.Dropout(params.dropout) if params.dropout > 0 else nn.Identity()
        self._part("own")[adapter_name] = nn.ParameterDict({k: nn.Parameter(v) for k, v in own.items()})
        self._part("fixed")[adapter_name] = BufferDict(dict(fixed), persistent=True)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _state(self, adapter_name: str) -> tuple[dict, dict, dict]:
        group = self._part("group")[adapter_name]
        store = self._shared_store[adapter_name] if adapter_name in self._shared_store else {}
        device = self.get_base_layer().weight.device
        shared = {}
        for name, tensor in store.items():
            owner, key = split_shared_key(name)
            if owner == group:  # a model split over devices reads its pools where each layer is
                shared[key] = tensor if tensor.device == device or device.type == "meta" else tensor.to(device)
        return shared, dict(self._part("own")[adapter_name]), dict(self._part("fixed")[adapter_name])

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, d_in], B [d_out, r]) of one adapter on this layer."""
        return self.llmgraft_adapter.factors(*self._state(adapter_name), self._part("params")[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling · B A, in the base weight's dtype."""
        params = self._part("params")[adapter_name]
        delta = self.llmgraft_adapter.delta_weight(*self._state(adapter_name), params)
        return delta.to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self._part("params"):
                continue
            weight = self.get_base_layer().weight
            delta = self.get_delta_weight(name).to(weight.device)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                weight.data = merged
            else:
                weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._part("params"):
                weight = self.get_base_layer().weight
                weight.data -= self.get_delta_weight(name).to(weight.device)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self._part("params"):
                continue
            a, b = self.factors(name)
            scaling = self.llmgraft_adapter.scaling(self._part("params")[name])
            h = self._part("dropout")[name](self._cast_input_dtype(x, a.dtype))
            result = result + F.linear(F.linear(h, a), b).to(dtype) * scaling
        return result.to(dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return f"{self.llmgraft_adapter.name}." + super().__repr__()


class AdapterTuner(BaseTuner):
    """The tuner of one llmgraft adapter type: it plans all target layers at once (shared state needs the
    whole group), keeps the shared tensors in ``<name>_shared[adapter_name]`` and wires them to the layers."""

    uses_shared_state = True
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    llmgraft_adapter: Adapter
    tuner_layer_cls: type[AdapterLayer]

    @property
    def _store(self) -> nn.ModuleDict:
        name = f"{self.llmgraft_adapter.name}_shared"
        if name not in self._modules:
            self.add_module(name, nn.ModuleDict())
        return self._modules[name]

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        self._planned: dict[str, Any] = {}
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        finally:
            self._planned = {}

    def _plan(self, config, adapter_name: str):
        """Find every layer the (prepared) config targets, then create the adapter's state for all of them at
        once: shared state needs its whole group. Runs at the first ``_create_and_replace`` of an injection,
        with the config PEFT matches with (after its default targets, "all-linear" and model conversions)."""
        adapter = self.llmgraft_adapter
        layers, counts, wrapped = [], {}, ()
        for key, module in self.model.named_modules():
            if wrapped and key.startswith(wrapped):
                continue  # the insides of a layer an earlier adapter wrapped
            if isinstance(module, BaseTunerLayer):
                wrapped += (key + ".",)
            if not self._check_target_module_exists(config, key):
                continue
            base = _linear(module, adapter, key)
            group = adapter.group(key)
            layers.append(AdaptedLayer(key, group, counts.get(group, 0), base.in_features, base.out_features))
            counts[group] = counts.get(group, 0) + 1
        state = adapter.init_state(layers, config.llmgraft_params())
        first = _linear(self.model.get_submodule(layers[0].name), adapter, layers[0].name).weight
        dtype = first.dtype if first.dtype.is_floating_point else torch.float32
        self._store[adapter_name] = nn.ParameterDict({
            shared_key(group, key): nn.Parameter(tensor.to(first.device, dtype))
            for group, tensors in state.shared.items() for key, tensor in tensors.items()})
        return state

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        adapter = self.llmgraft_adapter
        if adapter_name not in self._planned:
            self._planned[adapter_name] = self._plan(config, adapter_name)
        state = self._planned[adapter_name]
        if current_key not in state.own and current_key not in state.fixed:
            raise LLMGraftError(f"{adapter.title}: PEFT targets {current_key!r}, which the plan did not find; "
                                "please report this with your model and config")
        parts = (config.llmgraft_params(), adapter.group(current_key), state.own.get(current_key, {}),
                 state.fixed.get(current_key, {}))
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, *parts, inference_mode=config.inference_mode)
            return
        layer = self.tuner_layer_cls(target, self._store)
        layer._active_adapter = adapter_name
        layer.update_layer(adapter_name, *parts, inference_mode=config.inference_mode)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, layer, target)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        if kwargs.get("adapter_names") is not None:
            raise ValueError(f"{self.llmgraft_adapter.title} does not support mixed-adapter batches "
                             "(adapter_names=...); export the adapters with `llmgraft export-lora` and use LoRA's")
        yield

    def _shared_requires_grad(self) -> None:
        """Shared tensors train only for active adapters outside inference mode, like the layers' own."""
        for name, tensors in self._store.items():
            trainable = name in self.active_adapters and not self.peft_config[name].inference_mode
            for tensor in tensors.values():
                tensor.requires_grad_(trainable)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._shared_requires_grad()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for name, tensors in self._store.items():
            for tensor in tensors.values():
                tensor.requires_grad_(name in self.active_adapters and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self._store:
            del self._store[adapter_name]
        self._shared_requires_grad()  # PEFT may have made another adapter active

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if autocast_adapter_dtype and adapter_name in self._store:
            tensors = self._store[adapter_name]
            for key, tensor in list(tensors.items()):
                if tensor.dtype in (torch.float16, torch.bfloat16):
                    tensors[key] = nn.Parameter(tensor.data.float(), requires_grad=tensor.requires_grad)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        title = self.llmgraft_adapter.title
        raise NotImplementedError(
            f"{title} has no add_weighted_adapter: a weighted sum of {title} deltas is not a {title} adapter. "
            "Export each with `llmgraft export-lora` and combine the LoRA adapters (LoRA's add_weighted_adapter "
            "with combination_type='cat', or `llmgraft merge`).")


def _config_post_init(self) -> None:
    PeftConfig.__post_init__(self)
    self.peft_type = extend_peft_type(self.llmgraft_adapter.title.upper())
    for field in ("target_modules", "exclude_modules"):
        if isinstance(getattr(self, field), list):
            setattr(self, field, set(getattr(self, field)))
    self.llmgraft_params()  # a ParamError (a ValueError) for invalid values, at construction


def _config_params(self):
    """The adapter's llmgraft parameters (validated) from this config."""
    names = self.llmgraft_adapter.params_cls.field_names()
    return self.llmgraft_adapter.params_cls.from_mapping({n: getattr(self, n) for n in names})


def _config_class(adapter: Adapter) -> type:
    fields: list[tuple] = []
    for field in dataclasses.fields(adapter.params_cls):
        spec = adapter.params_cls.spec(field.name)
        fields.append((field.name, field.type,
                       dataclasses.field(default=field.default, metadata={"help": spec.help if spec else ""})))
    fields += [
        ("target_modules", Optional[Union[list[str], str]], dataclasses.field(default=None, metadata={
            "help": "module names or suffixes to adapt (a regex when a str; 'all-linear'); None: the model "
                    "type's default, as LoRA's"})),
        ("exclude_modules", Optional[Union[list[str], str]], dataclasses.field(default=None, metadata={
            "help": "module names or suffixes not to adapt (a regex when a str)"})),
        ("layers_to_transform", Optional[Union[list[int], int]], dataclasses.field(default=None, metadata={
            "help": "adapt only these layer indices (as LoRA's)"})),
        ("layers_pattern", Optional[Union[list[str], str]], dataclasses.field(default=None, metadata={
            "help": "the name of the layer list, with layers_to_transform (as LoRA's)"})),
        ("modules_to_save", Optional[list[str]], dataclasses.field(default=None, metadata={
            "help": "modules trained in full and saved with the adapter (a classifier head)"})),
    ]
    doc = (f"PEFT config of {adapter.title} ({adapter.description}); its fields are the llmgraft parameters of "
           f"the `{adapter.name}` adapter plus PEFT's target_modules, exclude_modules, layers_to_transform, "
           "layers_pattern and modules_to_save.")
    cls = dataclasses.make_dataclass(f"{adapter.title}Config", fields, bases=(PeftConfig,), namespace={
        "__post_init__": _config_post_init, "llmgraft_params": _config_params, "llmgraft_adapter": adapter,
        "__doc__": doc})
    cls.__module__ = __name__
    return cls


@functools.lru_cache(maxsize=None)
def peft_classes(adapter_name: str) -> tuple[type, type]:
    """(config class, tuner class) of a registered adapter, built and registered with PEFT once."""
    adapter = get_registry().get("adapter", adapter_name)
    title = adapter.title
    layer_cls = type(f"{title}Linear", (AdapterLayer,), {  # "Linear": PEFT's all-linear finds wrapped layers so
        "llmgraft_adapter": adapter, "__module__": __name__,
        "adapter_layer_names": (f"{adapter.name}_own", f"{adapter.name}_fixed"),
        "other_param_names": (f"{adapter.name}_dropout", f"{adapter.name}_params", f"{adapter.name}_group")})
    tuner_cls = type(f"{title}Model", (AdapterTuner,), {
        "llmgraft_adapter": adapter, "prefix": f"{adapter.name}_", "tuner_layer_cls": layer_cls,
        "__module__": __name__})
    config_cls = _config_class(adapter)
    for cls in (layer_cls, tuner_cls, config_cls):
        setattr(sys.modules[__name__], cls.__name__, cls)  # importable by name, so picklable
    peft_type = extend_peft_type(title.upper())
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    existing = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if existing is not None and getattr(existing, "llmgraft_adapter", None) is None:
        raise LLMGraftError(f"adapter {adapter.name!r}: PEFT already has a method of type {peft_type.value} "
                            "that llmgraft did not register; give the adapter another `title`")
    if existing is None:
        register_peft_method(name=title.lower(), config_cls=config_cls, model_cls=tuner_cls,
                             prefix=f"{adapter.name}_")
    else:  # a registry reset rebuilt the adapter: point PEFT at the new classes
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type], PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = config_cls, tuner_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = f"{adapter.name}_"
    return config_cls, tuner_cls


def config_class(adapter_name: str) -> type:
    """The PEFT config class of a registered adapter (``config_class("mos")`` is ``MoSConfig``)."""
    return peft_classes(adapter_name)[0]


def register_all() -> dict[str, type]:
    """Register every loaded adapter with PEFT; their config classes by title."""
    registry = get_registry()
    return {registry.get("adapter", n).title: config_class(n) for n in registry.names("adapter")}

