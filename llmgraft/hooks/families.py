"""One small Protocol per hook family: what a registered method object must provide.

Every method object has a ``name`` (unique within its family), a ``params_cls`` (a :class:`Params`
subclass) and a one-line ``description``, plus the family's own operation below. Tensors are torch
tensors; no host framework (vLLM, PEFT, transformers) appears in any signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from .params import Params

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Method(Protocol):
    name: str
    description: str
    params_cls: ClassVar[type[Params]]


@runtime_checkable
class Sampler(Method, Protocol):
    """Logits → truncated/reshaped logits for a batch.

    ``apply(logits[B, V], params)`` receives logits already divided by the temperature and ``params`` from
    :meth:`Params.stack` (per-row fields are tensors of shape [B]). It may modify ``logits`` in place and
    returns the result. It must keep each row's argmax token, so hosts may treat it as argmax-invariant.
    ``primary`` names the parameter that the shorthand request field ``{name: value}`` sets.
    """

    primary: ClassVar[str | None]

    def apply(self, logits: torch.Tensor, params: SimpleNamespace) -> torch.Tensor: ...


@runtime_checkable
class Merger(Method, Protocol):
    """Merge one tensor across checkpoints: ``merge(base, tensors, params) -> merged``.

    ``base`` is the pre-trained tensor (or None for plain averaging) and ``tensors`` the fine-tuned
    versions of that same tensor; drivers stream tensors name by name, so memory stays bounded.
    """

    def merge(self, base: torch.Tensor | None, tensors: list[torch.Tensor], params: Params) -> torch.Tensor: ...


@runtime_checkable
class Attention(Method, Protocol):
    """Select which prompt tokens later layers keep: ``select(query[H, D], keys[H, T, D], params)`` → indices."""

    def select(self, query: torch.Tensor, keys: torch.Tensor, params: Params) -> torch.Tensor: ...


@runtime_checkable
class KVManager(Method, Protocol):
    """Decide which cached positions to keep: ``keep(keys, values, params)`` → sorted position indices."""

    def keep(self, keys: torch.Tensor, values: torch.Tensor, params: Params) -> torch.Tensor: ...


@runtime_checkable
class Optimizer(Method, Protocol):
    """A model-optimization pass over a checkpoint directory (slimming, quantization).

    ``run(src, dst, params)`` reads ``src``, writes a loadable checkpoint to ``dst`` atomically, and returns
    a report dict of what it did.
    """

    def run(self, src: Path, dst: Path, params: Params) -> dict[str, Any]: ...


@runtime_checkable
class Adapter(Method, Protocol):
    """A parameter-efficient adapter type; integrations turn it into a PEFT tuner.

    ``init_state(shapes, params)`` creates the trainable tensors for a set of target modules and
    ``delta_weight(state, module, params)`` gives the dense ΔW of one module (for export and merging).
    """

    def init_state(self, shapes: dict[str, tuple[int, int]], params: Params) -> dict[str, torch.Tensor]: ...

    def delta_weight(self, state: dict[str, torch.Tensor], module: str, params: Params) -> torch.Tensor: ...


@dataclass(frozen=True)
class Family:
    name: str
    hook: str
    protocol: type
    operation: str


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sampler", "llmgraft_register_samplers", Sampler, "apply"),
    Family("merger", "llmgraft_register_mergers", Merger, "merge"),
    Family("attention", "llmgraft_register_attention", Attention, "select"),
    Family("kv_manager", "llmgraft_register_kv_managers", KVManager, "keep"),
    Family("optimizer", "llmgraft_register_optimizers", Optimizer, "run"),
    Family("adapter", "llmgraft_register_adapters", Adapter, "delta_weight"),
)}
