"""MoS, Mixture of Shards (Wang et al., ICLR 2025): LoRA whose rank vectors are drawn from shard pools that
all layers of a module type share.

Per module type (q_proj, ..., down_proj) with L adapted layers of shape [d_out, d_in], two pools hold the
parameters of LoRA at rank r_v, whatever r, r_p and c are: pool A is (L·r_v·c) × (d_in/c) and pool B is
(d_out/c) × (L·r_v·c), i.e. L·r_v·(d_in + d_out) parameters. Each layer reads r·c shards of each pool
through indices fixed at init (official ``modules/Tied_LoRA.py``):

- subset selection: the first (r − r_p)·c indices are ``randperm((r_v − r_p)·L·c)[:(r − r_p)·c]``, a
  random subset of the shared region (rows [0, (r_v − r_p)·L·c));
- shard privatization: the last r_p·c indices are the layer's own block of the private region, rows
  (r_v − r_p)·L·c + [l·r_p·c, (l+1)·r_p·c), identical for A and B;
- pair dissociation: A and B draw their shared subsets independently;
- vector sharding: rank vector j is the concatenation of the c shards at indices j·c … j·c + c − 1, so
  A_l = poolA[idx_A].reshape(r, d_in) and B_l = poolBᵀ[idx_B].reshape(r, d_out)ᵀ.

The layer adds (α/r)·B_l A_l dropout(x). Pool A starts as kaiming_uniform(a=√5) with fan d_in, i.e.
U(±1/√d_in) as LoRA's A; pool B starts at zero. One difference from the official code, on purpose: the
indices and the initialisation come from a generator seeded by ``seed`` (saved in the adapter config), not
from the global RNG, so a config alone determines its adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hooks import AdaptedLayer, Adapter, AdapterState, ParamError, Params, hookimpl, param


@dataclass(frozen=True)
class MoSParams(Params):
    r: int = param(8, range="[1, inf)", help="rank of each layer's factors A [r, d_in] and B [d_out, r]")
    r_v: int = param(4, range="[1, inf)", help="the budget: each module type's pools cost what LoRA at rank r_v "
                                               "costs")
    r_p: int = param(1, range="[0, inf)", help="private ranks per layer (shard privatization); the other r - r_p "
                                               "share")
    c: int = param(2, range="[1, inf)", help="shards per rank vector (vector sharding); d_in and d_out must "
                                             "divide by it")
    alpha: float = param(16.0, range="(0, inf)", help="scaling numerator: the layer adds (alpha / r)·B A x")
    dropout: float = param(0.1, range="[0, 1)", help="dropout on the adapter's input, as LoRA's")
    seed: int = param(0, range="[0, inf)", help="seed of the shard indices and the pool initialisation")
    init_weights: bool = param(True, help="True: pool B starts at zero (the model starts as the base); False: "
                                          "random (tests)")

    def validate(self) -> None:
        if self.r_p > self.r:
            raise ParamError(f"mos: r_p={self.r_p} private ranks cannot exceed the rank r={self.r}")
        if self.r_p > self.r_v:
            raise ParamError(f"mos: r_p={self.r_p} private ranks cannot exceed the budget r_v={self.r_v} "
                             "(the private region holds L·r_p·c of the pool's L·r_v·c shards)")
        if self.r_p == self.r_v and self.r != self.r_p:
            raise ParamError(f"mos: r_p = r_v = {self.r_v} leaves no shared region for the other "
                             f"{self.r - self.r_p} ranks; raise r_v above r_p")


def _groups(layers: list[AdaptedLayer]) -> dict[str, list[AdaptedLayer]]:
    groups: dict[str, list[AdaptedLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.group, []).append(layer)
    return {g: sorted(members, key=lambda m: m.index) for g, members in groups.items()}


def pool_shapes(d_in: int, d_out: int, layers: int, params: MoSParams) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of pool A and pool B of a module type with ``layers`` adapted layers."""
    rows = params.r_v * layers * params.c
    return (rows, d_in // params.c), (d_out // params.c, rows)


def _check_group(group: str, members: list[AdaptedLayer], params: MoSParams) -> tuple[int, int]:
    shapes = {(m.d_in, m.d_out) for m in members}
    if len(shapes) > 1:
        raise ParamError(f"mos: the {group} layers differ in shape ({sorted(shapes)}), but one pool serves them "
                         "all; target modules of one shape per module type")
    (d_in, d_out), c = shapes.pop(), params.c
    if d_in % c or d_out % c:
        raise ParamError(f"mos: c={c} shards per vector must divide d_in={d_in} and d_out={d_out} of {group}")
    layers, need = len(members), (params.r - params.r_p) * c
    shared = (params.r_v - params.r_p) * layers * c
    if need > shared:
        raise ParamError(
            f"mos: r_v={params.r_v} is too small for {group}: each of its {layers} layers draws (r - r_p)·c = "
            f"{need} distinct shared shards, but the shared region holds (r_v - r_p)·L·c = {shared}; raise r_v, "
            "or lower r_p or r")
    return d_in, d_out


class MoS(Adapter):
    name = "mos"
    title = "MoS"
    description = "Mixture of Shards: LoRA factors drawn from per-module-type shard pools shared across layers"
    params_cls = MoSParams

    def init_state(self, layers: list[AdaptedLayer], params: MoSParams) -> AdapterState:
        gen = torch.Generator().manual_seed(params.seed)
        r, r_p, c = params.r, params.r_p, params.c
        shared, fixed = {}, {}
        for group, members in _groups(layers).items():
            d_in, d_out = _check_group(group, members, params)
            shape_a, shape_b = pool_shapes(d_in, d_out, len(members), params)
            bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=√5) with fan d_in
            pool_a = torch.empty(shape_a).uniform_(-bound, bound, generator=gen)
            pool_b = torch.zeros(shape_b)
            if not params.init_weights:
                pool_b.uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=gen)
            shared[group] = {"A": pool_a, "B": pool_b}
            shared_rows = (params.r_v - r_p) * len(members) * c
            for position, member in enumerate(members):
                private = shared_rows + torch.arange(position * r_p * c, (position + 1) * r_p * c)
                draw = [torch.randperm(shared_rows, generator=gen)[:(r - r_p) * c] for _ in "AB"]
                fixed[member.name] = {"index_A": torch.cat([draw[0], private]),
                                      "index_B": torch.cat([draw[1], private])}
        return AdapterState(shared=shared, own={}, fixed=fixed)

    def factors(self, shared, own, fixed, params: MoSParams):
        a = shared["A"][fixed["index_A"]].reshape(params.r, -1)
        b = shared["B"].t()[fixed["index_B"]].reshape(params.r, -1).t()
        return a, b


@hookimpl
def llmgraft_register_adapters(register):
    register(MoS())
