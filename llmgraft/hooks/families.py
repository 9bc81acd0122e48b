"""The hook families: one small base class per family, and the checks a registered method must pass.

A method is an object with a ``name`` (a Python identifier, unique within its family), a one-line
``description``, a ``params_cls`` (a :class:`Params` subclass whose fields carry help texts), the
family's own attributes, and the family's operations. Method authors subclass the family's base class
(``class TopA(Sampler)``), which documents the contract; the registry checks every part of it when a
plugin registers the method, so a method missing any part is skipped at load time with an error naming
it, never at request time. (Duck-typed objects that are not subclasses pass the same checks.)

Tensors are torch tensors; no host framework (vLLM, PEFT, transformers) appears in any signature. Each
family is shaped by the real methods it holds (docs/design-decisions.md), with its base class, checks and
one contract test (``llmgraft.testing.contracts``) together.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

from .params import Params
from .resources import RESOURCES

if TYPE_CHECKING:
    import torch


class Method:
    """Base of every method: what the registry and ``llmgraft plugins`` need to know about it."""

    #: Unique within the family; a Python identifier (it is also the request-field prefix of samplers).
    name: ClassVar[str]
    #: One line, shown by ``llmgraft plugins``.
    description: ClassVar[str]
    #: The method's parameters.
    params_cls: ClassVar[type[Params]]

    @staticmethod
    def check_declaration(obj: Any) -> None:
        """The family's own rules about a method's declared parts, beyond their presence (a TypeError)."""


class Sampler(Method):
    """Logits → truncated/reshaped logits for a batch.

    ``apply(logits[B, V], params)`` receives logits already divided by the temperature and ``params`` from
    :meth:`Params.stack` (per-row fields are tensors of shape [B]). It may modify ``logits`` in place and
    returns the result. It must keep each row's argmax token (hosts treat samplers as argmax-invariant),
    keep at least one token per row, and follow the bad-logit policy: NaN counts as -inf, and it never
    returns NaN or +inf.
    """

    #: The parameter that the shorthand request field ``{name: value}`` sets, or None for no shorthand.
    primary: ClassVar[str | None]
    #: Tensors of the served model the sampler needs (names from ``llmgraft.hooks.resources.RESOURCES``).
    #: When not empty, hosts call ``apply(logits, params, model)`` with a ``ModelResources`` as ``model``.
    needs: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def check_declaration(obj: Any) -> None:
        fields = obj.params_cls.field_names()
        if obj.primary is not None and obj.primary not in fields:
            raise TypeError(f"sampler {obj.name!r}: `primary` {obj.primary!r} is not one of its parameters "
                            f"({', '.join(fields)})")
        needs = needs_of(obj)
        if not isinstance(needs, tuple) or any(n not in RESOURCES for n in needs):
            raise TypeError(f"sampler {obj.name!r}: `needs` must be a tuple of resource names from "
                            f"{sorted(RESOURCES)}, got {needs!r}")
        if needs:
            try:
                inspect.signature(obj.apply).bind("logits", "params", "model")
            except TypeError:
                raise TypeError(f"sampler {obj.name!r} needs {', '.join(needs)}, so `apply` must accept "
                                "(logits, params, model)") from None

    def apply(self, logits: torch.Tensor, params: SimpleNamespace) -> torch.Tensor:
        raise NotImplementedError


def needs_of(sampler: Any) -> tuple[str, ...]:
    """The model resources a sampler needs (``Sampler.needs``; duck-typed samplers may leave it out)."""
    return getattr(sampler, "needs", ())


class Merger(Method):
    """Merge one named tensor across N input checkpoints or adapters.

    ``merge(name, base, inputs, per_input, params)`` receives the tensor's ``name`` (so a method may treat
    embeddings or norms apart), the base model's tensor ``base`` (None when there is none), the N inputs'
    tensors (same shape), and ``per_input``: one mapping per input of the values the method declared in
    ``input_values`` (MWA: a checkpoint's loss or step) plus what ``tensor_stats`` returned for that input.
    It returns ``{"merged": tensor}`` (the inputs' shape and dtype) plus, for each name in ``outputs``, one
    tensor per input as ``"<output>/<i>"`` (TALL: its masks). Pure: inputs are not modified.

    Drivers (full checkpoints, PEFT adapters) know no method: they call ``check_inputs`` once, then, per
    tensor, ``tensor_stats`` on each whole input, then ``merge`` on the whole tensor or, for ``elementwise``
    methods, on row chunks of it (so memory stays bounded for any N).
    """

    #: True when the method needs the base (task vectors); drivers then refuse to run without one.
    needs_base: ClassVar[bool] = False
    #: True when merging row chunks gives the chunks of the merge (given ``tensor_stats`` of whole tensors).
    elementwise: ClassVar[bool] = True
    #: Per-input values the method reads, with what they mean (shown by ``llmgraft plugins``).
    input_values: ClassVar[dict[str, str]] = {}
    #: Extra per-input outputs besides "merged" (TALL: ("mask",)); booleans are stored bit-packed.
    outputs: ClassVar[tuple[str, ...]] = ()
    #: What "merged" is: "model" (weights to load) or "task_vector" (to add to the base: TALL's τ_MTL).
    merged_is: ClassVar[str] = "model"
    #: True when "merged" is c₀·base + Σ c_i·input_i with coefficients independent of the tensors' values
    #: (averages, task arithmetic): LoRA adapters then merge exactly at concatenated rank.
    linear: ClassVar[bool] = False

    @staticmethod
    def check_declaration(obj: Any) -> None:
        if not isinstance(obj, Merger):
            raise TypeError(f"merger {obj.name!r}: subclass llmgraft.Merger (drivers read its optional parts, "
                            "which have their defaults there)")
        if obj.merged_is not in ("model", "task_vector"):
            raise TypeError(f"merger {obj.name!r}: merged_is must be 'model' or 'task_vector', got {obj.merged_is!r}")

    def check_inputs(self, per_input: list[dict[str, Any]], params: Params) -> None:
        """Raise ``ParamError`` when the per-input values cannot drive this merge (missing, non-positive)."""

    def needs_tensor_stats(self, params: Params) -> bool:
        """Whether ``tensor_stats`` computes anything with these parameters (drivers skip the whole-tensor
        reads it costs when not)."""
        return False

    def tensor_stats(self, name: str, base: Any, tensor: Any, params: Params) -> dict[str, float]:
        """Statistics of one whole input tensor that row chunks need (TIES: its trim threshold). ``tensor``
        and ``base`` may be tensors or row readers (``llmgraft.kernels.merging.Rows``: ``shape`` and
        ``read(a, b)``), so that a large tensor need not be held whole."""
        return {}

    def merge(self, name: str, base: torch.Tensor | None, inputs: list[torch.Tensor],
              per_input: list[dict[str, Any]], params: Params) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Attention(Method):
    """Token retention: score the prompt tokens at one layer, so that later layers keep only the best.

    ``score(query[B, H, Q, D], keys[B, Hkv, T, D], valid[B, T], params) -> scores[B, T]``: ``query`` holds
    the RoPE'd queries of each row's last ``queries`` prompt tokens at the selection layer, ``keys`` that
    layer's RoPE'd keys for the T tokens the layer sees (grouped-query heads: query head h reads key head
    h // (H // Hkv)), ``valid`` marks the positions that hold tokens (False on left padding). Higher scores
    are kept; scores at invalid positions are ignored, and a valid position's score must not depend on how
    much padding its row has. Methods only score: the shared machinery (``llmgraft.kernels.retention``)
    keeps each row's top-k valid tokens (plus its last one when ``keeps_last``) in their original order, and
    the host integration slices the model's state.
    """

    #: How the kept tokens go on: "continue" (the layers after the selection layer process only them:
    #: PromptDistill) or "restart" (the model reruns from layer 0 on them as a new, shorter prompt: GemFilter).
    mode: ClassVar[str] = "continue"
    #: How many of the last prompt tokens' queries ``score`` reads.
    queries: ClassVar[int] = 1
    #: True: the last prompt token is always kept and k counts the others (PromptDistill); False: k counts
    #: every kept token and the last competes like the rest (GemFilter).
    keeps_last: ClassVar[bool] = True

    @staticmethod
    def check_declaration(obj: Any) -> None:
        mode, queries = getattr(obj, "mode", "continue"), getattr(obj, "queries", 1)
        if mode not in ("continue", "restart"):
            raise TypeError(f"attention {obj.name!r}: mode must be 'continue' or 'restart', got {mode!r}")
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise TypeError(f"attention {obj.name!r}: queries must be a positive int, got {queries!r}")
        if mode == "continue" and not getattr(obj, "keeps_last", True):
            raise TypeError(f"attention {obj.name!r}: a 'continue' method must keep the last prompt token "
                            "(keeps_last = True): the next token is predicted from its state")

    def score(self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, params: Params) -> torch.Tensor:
        raise NotImplementedError


class KVManager(Method):
    """What happens to the cached prompt KV of the layers up to a retention stage once it has selected.

    ``truncated_layers(stage_layers, stage, num_layers, params) -> tuple[int, ...]``: given every stage's
    selection layer, the layers among 0..``stage_layers[stage]`` whose cached prompt keys and values are cut
    to stage ``stage``'s kept tokens after the prefill (layers after a stage only ever see its kept tokens).
    An empty tuple keeps their prompt KV whole. Decode-time eviction methods will add an operation here.
    """

    def truncated_layers(self, stage_layers: tuple[int, ...], stage: int, num_layers: int,
                         params: Params) -> tuple[int, ...]:
        raise NotImplementedError


class Optimizer(Method):
    """A model pass over a checkpoint directory (slimming, quantization).

    ``run(src, dst, params, host)`` reads ``src``, writes a loadable safetensors checkpoint to ``dst``
    atomically, leaves ``src`` untouched, and returns a report dict of what it did. ``host`` (a
    ``llmgraft.hooks.hosts.ModelHost``) runs models for passes that need gradients or training; passes
    that only rewrite tensors ignore it.
    """

    def run(self, src: Path, dst: Path, params: Params, host: Any) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class PackedTensor:
    """One stored tensor of a quantized [N, K] weight: its shape and dtype, and how it shards. ``per`` input
    columns share one stored element along the input dimension (2 for two int4 codes per byte, the group
    size for per-group scales), so a host slicing the input dimension (row-parallel layers) slices it by
    ``per``; slicing the output dimension (column-parallel, merged q/k/v) takes the same rows."""

    shape: tuple[int, int]
    dtype: Any
    per: int = 1


class QuantScheme(Method):
    """The runtime half of a weight-quantization format: how a weight [N, K] is stored, and the matmul.

    * ``packed_shapes(out_features, in_features, params) -> {name: PackedTensor}``: what is stored, with
      rows = output features (dimension 0) and columns along the input features (dimension 1);
    * ``quantize(weight[N, K], params) -> {name: tensor}``: the stored tensors, as ``packed_shapes`` says;
    * ``dequantize(stored, params) -> [N, K]`` float32: the weight the stored tensors stand for;
    * ``prepare(stored, params) -> state``: once after loading, a layout for fast matmuls (may be ``stored``);
    * ``matmul(x[..., K], state, params) -> [..., N]``: ``x @ dequantize(stored).T`` in ``x``'s dtype.

    Stored tensors are plain, device-independent safetensors content; ``prepare`` may pick a per-device path
    (torch's int4 CPU kernels, a Triton kernel on a GPU). Offline passes write them, and the vLLM and
    transformers integrations load and multiply through these five operations alone.
    """

    #: Bits per weight of the stored codes, scales excluded (4 for W4A16, 1.25 for Sherry).
    bits: ClassVar[float]

    def packed_shapes(self, out_features: int, in_features: int, params: Params) -> dict[str, PackedTensor]:
        raise NotImplementedError

    def quantize(self, weight: torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, stored: dict[str, torch.Tensor], params: Params) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, stored: dict[str, torch.Tensor], params: Params) -> Any:
        return stored

    def matmul(self, x: torch.Tensor, state: Any, params: Params) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class AdaptedLayer:
    """One linear layer an adapter adapts: its module name in the model, its group (the layers that share
    state: MoS's module type), its position within the group in model order, and its shape."""

    name: str
    group: str
    index: int
    d_in: int
    d_out: int


@dataclass
class AdapterState:
    """The tensors of one adapter on one model, as ``Adapter.init_state`` creates them.

    ``shared[group]``: trainable tensors every layer of the group reads (MoS's shard pools), owned by the
    model and saved once. ``own[layer]``: trainable tensors of one layer (LoRA's A and B). ``fixed[layer]``:
    non-trainable tensors of one layer saved with the adapter (MoS's shard indices). Every layer has at least
    one ``own`` or ``fixed`` tensor, so a saved adapter names the layers it adapts.
    """

    shared: dict[str, dict[str, torch.Tensor]]
    own: dict[str, dict[str, torch.Tensor]]
    fixed: dict[str, dict[str, torch.Tensor]]


class Adapter(Method):
    """A low-rank adapter type: each adapted linear layer l gains ΔW_l = scaling · B_l A_l, with factors
    A_l [r, d_in] and B_l [d_out, r] built from trainable state that layers may share.

    ``init_state(layers, params)`` creates the state of every adapted layer at once (shared state needs to
    know all the layers of its group), deterministically for given params. ``factors(shared, own, fixed,
    params)`` builds (A_l, B_l) of one layer from its group's ``shared`` tensors and its ``own`` and
    ``fixed`` ones, differentiably. Hosts add ``scaling · B_l(A_l(dropout(x)))`` to the layer's output,
    merge ``delta_weight`` into the weight, and export (A_l, B_l) as plain LoRA. The parameters must have
    ``dropout`` (a probability) and ``init_weights`` (True: ΔW starts at 0; False: a random non-zero ΔW).
    """

    #: Display name: the PEFT config class is ``<title>Config`` and its peft_type ``title.upper()``.
    title: ClassVar[str]

    @staticmethod
    def check_declaration(obj: Any) -> None:
        if not isinstance(obj, Adapter):
            raise TypeError(f"adapter {obj.name!r}: subclass llmgraft.Adapter (hosts use its `group`, `scaling` "
                            "and `delta_weight`, which have their defaults there)")
        fields = obj.params_cls.field_names()
        missing = [f for f in ("dropout", "init_weights") if f not in fields]
        if type(obj).scaling is Adapter.scaling:
            missing += [f for f in ("r", "alpha") if f not in fields]
        if missing:
            raise TypeError(f"adapter {obj.name!r}: its parameters need the field(s) {', '.join(missing)} (r and "
                            "alpha for the default scaling alpha / r, unless it overrides `scaling`)")
        if not isinstance(obj.title, str) or not obj.title.isidentifier():
            raise TypeError(f"adapter {obj.name!r}: `title` must be an identifier, got {obj.title!r}")

    def group(self, layer_name: str) -> str:
        """The group a layer's shared state belongs to; by default its module type (``q_proj``)."""
        return layer_name.rsplit(".", 1)[-1]

    def scaling(self, params: Params) -> float:
        """The factor on B_l A_l; by default α/r."""
        return params.alpha / params.r

    def init_state(self, layers: list[AdaptedLayer], params: Params) -> AdapterState:
        raise NotImplementedError

    def factors(self, shared: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                fixed: dict[str, torch.Tensor], params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def delta_weight(self, shared: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                     fixed: dict[str, torch.Tensor], params: Params) -> torch.Tensor:
        """ΔW_l = scaling · B_l A_l [d_out, d_in], computed in float32 at least (CPU half matmuls are slow
        and lossy); the caller casts it to the weight's dtype."""
        import torch

        a, b = self.factors(shared, own, fixed, params)
        dtype = torch.promote_types(a.dtype, torch.float32)
        return (b.to(dtype) @ a.to(dtype)) * self.scaling(params)


@dataclass(frozen=True)
class Family:
    """A hook family: its registration hook, its base class, and what a method of it must provide."""

    name: str
    hook: str
    base: type[Method]
    operations: tuple[str, ...]

    def check(self, obj: Any) -> str:
        """The method's name if ``obj`` provides every part of this family's contract; else TypeError."""
        if isinstance(obj, type):
            raise TypeError(f"register an instance of {obj.__name__} (`register({obj.__name__}())`), not the class")
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"a {self.name} needs a `name` that is a Python identifier, got {name!r}")
        where = f"{self.name} {name!r}"
        description = getattr(obj, "description", None)
        if not isinstance(description, str) or not description.strip() or "\n" in description.strip():
            raise TypeError(f"{where}: `description` must be a one-line string, got {description!r}")
        params_cls = getattr(obj, "params_cls", None)
        if not (isinstance(params_cls, type) and issubclass(params_cls, Params)):
            raise TypeError(f"{where}: `params_cls` must be a llmgraft Params subclass, got {params_cls!r}")
        try:
            params_cls.check_class()
        except TypeError as exc:
            raise TypeError(f"{where}: {exc}") from None
        for attribute in self.attributes():
            if not hasattr(obj, attribute):
                raise TypeError(f"{where}: missing attribute `{attribute}` (see llmgraft.{self.base.__name__})")
        self.base.check_declaration(obj)
        for operation in self.operations:
            method = getattr(obj, operation, None)
            if not callable(method) or getattr(type(obj), operation, None) is getattr(self.base, operation):
                raise TypeError(f"{where}: missing method `{operation}`")
            expected = list(inspect.signature(getattr(self.base, operation)).parameters)[1:]  # without self
            try:
                inspect.signature(method).bind(*expected)
            except TypeError:
                raise TypeError(f"{where}: `{operation}` must accept ({', '.join(expected)})") from None
        return name

    def attributes(self) -> tuple[str, ...]:
        """Class-level attributes the base class declares without a default (its own and :class:`Method`'s);
        those with a default (``Sampler.needs``) are optional, read with ``getattr(obj, name, default)``."""
        names: list[str] = []
        for cls in reversed(self.base.__mro__):
            names += [n for n in getattr(cls, "__annotations__", {}) if n not in names and not hasattr(self.base, n)]
        return tuple(names)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sampler", "llmgraft_register_samplers", Sampler, ("apply",)),
    Family("merger", "llmgraft_register_mergers", Merger, ("merge",)),
    Family("attention", "llmgraft_register_attention", Attention, ("score",)),
    Family("kv_manager", "llmgraft_register_kv_managers", KVManager, ("truncated_layers",)),
    Family("optimizer", "llmgraft_register_optimizers", Optimizer, ("run",)),
    Family("adapter", "llmgraft_register_adapters", Adapter, ("init_state", "factors")),
    Family("quant_scheme", "llmgraft_register_quant_schemes", QuantScheme,
           ("packed_shapes", "quantize", "dequantize", "matmul")),
)}
