"""Every registered method of every family, built-in and third-party, against its family's contract.

A new method is tested by being registered: nothing here names one. The second half proves that each
contract fails a method that breaks one of its promises.
"""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import pytest
import torch

from llmgraft.hooks import FAMILIES, Registry
from llmgraft.integrations.transformers.host import TransformersHost
from llmgraft.testing.contracts import ContractError, check_method

#: What each family's contract needs from its caller.
CONTEXT = {"optimizer": {"host": TransformersHost(), "params": {"quantize": {"group": 32}}}}


@pytest.fixture(scope="module")
def registry(plugin_site, examples_site) -> Registry:
    return Registry()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_registered_method_keeps_its_family_contract(registry, family):
    entries = registry.entries[family]
    assert entries, f"no {family} is registered, so this contract would test nothing"
    for entry in entries.values():
        check_method(family, entry.obj, **CONTEXT.get(family, {}))


def _like(registry: Registry, family: str, name: str, **methods) -> object:
    """A copy of a registered method with some operations replaced (a broken variant of a good one)."""
    original = registry.get(family, name)
    attributes = {k: getattr(original, k) for k in ("name", "description", "params_cls")}
    if family == "sampler":
        attributes["primary"], attributes["needs"] = original.primary, original.needs
    bases: tuple = ()
    if family == "merger":  # mergers must subclass Merger
        bases = (FAMILIES["merger"].base,)
        for attribute in ("needs_base", "elementwise", "input_values", "outputs", "merged_is", "linear"):
            attributes[attribute] = getattr(original, attribute)
        attributes["check_inputs"] = lambda self, *a: original.check_inputs(*a)
        attributes["tensor_stats"] = lambda self, *a: original.tensor_stats(*a)
        attributes["needs_tensor_stats"] = lambda self, *a: original.needs_tensor_stats(*a)
    if family == "adapter":  # adapters must subclass Adapter
        bases, attributes["title"] = (FAMILIES["adapter"].base,), original.title
        attributes["group"] = lambda self, *a: original.group(*a)
        attributes["scaling"] = lambda self, *a: original.scaling(*a)
    if family == "attention":
        for attribute in ("mode", "queries", "keeps_last"):
            attributes[attribute] = getattr(original, attribute)
    if family == "quant_scheme":
        attributes["bits"] = original.bits
    for op in ("apply", "merge", "score", "truncated_layers", "run", "init_state", "factors", "packed_shapes",
               "quantize", "dequantize", "prepare", "matmul"):
        if hasattr(original, op):
            attributes[op] = (lambda f: lambda self, *a: f(*a))(methods.get(op, getattr(original, op)))
    return type("Broken", bases, attributes)()


def _drop_argmax(logits, params):
    out = logits.clone()
    out[torch.arange(len(out)), logits.argmax(-1)] = float("-inf")
    return out


def _first_row_params(top_a):
    return lambda logits, params: top_a.apply(logits, SimpleNamespace(a=params.a[:1].expand(len(params.a))))


def _merge_chunk_blind(ties):
    """TIES that ignores the whole-tensor statistics: its trim then depends on the chunk (not elementwise)."""
    return lambda name, base, inputs, per_input, params: ties.merge(
        name, base, inputs, [{k: v for k, v in d.items() if k != "threshold"} for d in per_input], params)


def _unseeded_init(mos):
    """MoS drawing its shard indices from the global RNG, so two inits of one config differ."""
    def init_state(layers, params):
        return mos.init_state(layers, dataclasses.replace(params, seed=int(torch.randint(0, 2**31, ()))))
    return init_state


def _every_other_of_padded_tensor(query, keys, valid, params):
    # A "keep every other token" rule that counts from the padded tensor's start instead of each row's first
    # valid token: a row padded by an odd amount then keeps the other half.
    return (query[:, :, -1:] @ keys.repeat_interleave(query.shape[1] // keys.shape[1], 1).transpose(-1, -2)
            ).mean(1)[:, 0] + 100.0 * (torch.arange(valid.shape[1]) % 2 == 0)


def _transposed_scales(scheme):
    # Scales computed per column group across rows: every row's scale depends on the other rows.
    def quantize(weight, params):
        stored = scheme.quantize(weight, params)
        stored["scales"] = stored["scales"].float().mean(0, keepdim=True).expand_as(stored["scales"]).half()
        return stored
    return quantize


def _write_pickle(optimizer):
    def run(src, dst, params, host):
        report = optimizer.run(src, dst, params, host)
        shutil.copy(dst / "model.safetensors", dst / "pytorch_model.bin")
        return report
    return run


BROKEN = [
    ("sampler", "top_h", lambda r: {"apply": _drop_argmax}, "keeps each row's argmax"),
    ("sampler", "top_h", lambda r: {"apply": lambda logits, params: logits}, "no NaN or \\+inf"),
    ("sampler", "top_a", lambda r: {"apply": _first_row_params(r.get("sampler", "top_a"))}, "rows one by one"),
    ("merger", "uniform", lambda r: {"merge": lambda name, base, ts, per, p: {"merged": ts[0].mul_(2)}},
     "inputs are not modified"),
    ("merger", "ties", lambda r: {"merge": _merge_chunk_blind(r.get("merger", "ties"))}, "row chunks"),
    ("attention", "prompt_distill", lambda r: {"score": _every_other_of_padded_tensor}, "left-padded batch"),
    ("attention", "last_k", lambda r: {"score": lambda q, k, v, p: torch.zeros(v.shape[0], v.shape[1] - 1)},
     "shape"),
    ("kv_manager", "truncate_kv", lambda r: {"truncated_layers": lambda ls, s, n, p: (ls[s] + 1,)}, "lie in 0"),
    ("optimizer", "copy", lambda r: {"run": _write_pickle(r.get("optimizer", "copy"))}, "no pickled weights"),
    ("quant_scheme", "w4a16", lambda r: {"matmul": lambda x, state, p: x @ torch.zeros(x.shape[-1], 48)},
     "matmul on the prepared"),
    ("quant_scheme", "ternary", lambda r: {"quantize": _transposed_scales(r.get("quant_scheme", "ternary"))},
     "first rows quantize"),
    ("adapter", "plain_lora", lambda r: {"factors": lambda s, o, f, p: (o["A"], o["B"].T)}, "factors of"),
    ("adapter", "mos", lambda r: {"init_state": _unseeded_init(r.get("adapter", "mos"))}, "deterministic"),
]


@pytest.mark.parametrize("family, name, broken, promise", BROKEN, ids=[f"{b[0]}-{b[3][:24]}" for b in BROKEN])
def test_contracts_catch_broken_methods(registry, family, name, broken, promise):
    with pytest.raises(ContractError, match=promise):
        check_method(family, _like(registry, family, name, **broken(registry)), **CONTEXT.get(family, {}))


def test_registration_part_of_the_contract(registry):
    incomplete = _like(registry, "sampler", "top_h")
    del type(incomplete).primary
    with pytest.raises(ContractError, match="missing attribute `primary`"):
        check_method("sampler", incomplete)
