"""The behavioural contract of each hook family, runnable on any method object.

Registration (:meth:`llmgraft.hooks.Family.check`) verifies that a method has every part of its family's
interface; these checks verify that it behaves as its family promises, on small generated inputs. The
project's contract test runs them over every registered method, built-in and third-party, so a new method
is tested by being registered. Plugin authors can run them in their own tests::

    from llmgraft.testing.contracts import check_method
    check_method("sampler", TopA())

Each check raises :class:`ContractError` naming the method and the broken promise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..hooks import FAMILIES, LLMGraftError, Params
from ..hooks.families import needs_of
from ..hooks.resources import ModelResources


class ContractError(AssertionError):
    """A method does not do what its family promises."""


def _require(condition: bool, method: Any, promise: str) -> None:
    if not condition:
        family = next((f.name for f in FAMILIES.values() if isinstance(method, f.base)), "method")
        raise ContractError(f"{family} {getattr(method, 'name', '?')!r} ({type(method).__name__}): {promise}")


def default_params(method: Any) -> Params:
    """The method's parameters at their defaults (every contract runs methods at their defaults)."""
    try:
        return method.params_cls()
    except Exception as exc:  # noqa: BLE001 - a required field, or invalid defaults
        raise ContractError(f"{method.name}: its parameters must all have valid defaults ({exc})") from None


def other_valid_value(params: Params, field: dataclasses.Field) -> Any:
    """A valid value of a per-row field other than its default (the middle of its range), or None."""
    spec, default = params.spec(field.name), getattr(params, field.name)
    if spec is None or spec.range is None or not all(map(math.isfinite, (spec.range.low, spec.range.high))):
        return None
    middle = (spec.range.low + spec.range.high) / 2
    middle = middle if isinstance(default, float) else round(middle)
    if middle == default or middle not in spec.range:
        return None
    try:
        dataclasses.replace(params, **{field.name: middle})
    except Exception:  # noqa: BLE001 - a cross-field rule forbids it
        return None
    return middle


# ---- sampler ----------------------------------------------------------------------------------------------


def _bad_rows(vocab: int, gen: torch.Generator) -> torch.Tensor:
    inf = float("inf")
    rows = torch.randn(5, vocab, generator=gen) * 3
    rows[0, 1::7] = float("nan")                # scattered NaN (never at the argmax: index 0 set below)
    rows[0, 0] = rows[0].nan_to_num(nan=-inf).max() + 1
    rows[1, [2, 5]] = inf                       # +inf tokens
    rows[2] = -inf                              # no finite logit
    rows[3] = float("nan")                      # all NaN
    rows[4, :] = -inf
    rows[4, 3] = 0.0                            # one finite token
    return rows


def _model_for(sampler: Any, vocab: int, width: int = 16) -> tuple:
    """What a host passes besides logits and params: a synthetic model of ``vocab`` tokens, if needed."""
    if not needs_of(sampler):
        return ()
    gen = torch.Generator().manual_seed(vocab)
    embeddings = torch.randn(vocab, width, generator=gen) * torch.rand(width, generator=gen) * 3
    return (ModelResources({"input_embeddings": lambda: embeddings}, where=f"a synthetic {vocab}-token model"),)


def check_sampler(sampler: Any) -> None:
    params = default_params(sampler)
    gen = torch.Generator().manual_seed(0)
    batch, vocab = 6, 257
    model = _model_for(sampler, vocab)
    x = torch.randn(batch, vocab, generator=gen) * 3
    x[1] = x[1] * 0.05                          # nearly flat
    x[2, 7] = x[2].max() + 25                   # peaked

    per_row = [f for f in dataclasses.fields(params) if f.name in params.per_row_fields()]
    rows = [params] * batch
    for f in per_row:  # alternate a per-row field between its default and another valid value
        if (value := other_valid_value(params, f)) is not None:
            rows = [r if i % 2 == 0 else dataclasses.replace(r, **{f.name: value}) for i, r in enumerate(rows)]
    out = sampler.apply(x.clone(), params.stack(rows), *model)
    _require(isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype, sampler,
             "apply returns logits of the input's shape and dtype")
    _require(not torch.isnan(out).any() and not torch.isposinf(out).any(), sampler, "no NaN or +inf out")
    finite = torch.isfinite(out)
    _require(bool(finite[torch.arange(batch), x.argmax(-1)].all()), sampler, "keeps each row's argmax token")
    single = torch.cat([sampler.apply(x[i:i + 1].clone(), params.stack([rows[i]]), *model) for i in range(batch)])
    _require(torch.equal(torch.isfinite(single), finite) and torch.equal(single[finite], out[finite]), sampler,
             "a batch with per-row parameters equals the rows one by one")

    bad = _bad_rows(vocab, gen)
    clean = x[:2]
    out = sampler.apply(torch.cat([bad, clean]).clone(), params.stack([params] * (len(bad) + 2)), *model)
    broken = [i for i, row in enumerate(out) if torch.isnan(row).any() or torch.isposinf(row).any()]
    _require(not broken, sampler, f"bad rows (NaN, +inf, all -inf) give no NaN or +inf (rows {broken} do: "
                                  "0 scattered NaN, 1 +inf, 2 all -inf, 3 all NaN, 4 one finite logit)")
    _require(bool(torch.isneginf(out[0][torch.isnan(bad[0])]).all()), sampler, "NaN logits count as -inf")
    _require(bool(torch.isfinite(out[0, 0])), sampler, "a row with NaN elsewhere keeps its argmax")
    _require(not torch.isfinite(out[2:4]).any(), sampler, "rows with no finite logit stay without one")
    _require(torch.isfinite(out[4]).nonzero().flatten().tolist() == [3], sampler,
             "a row with one finite logit keeps exactly it")
    _require(torch.isfinite(out[1]).nonzero().flatten().tolist() == [2, 5] and bool((out[1, [2, 5]] == 0).all()),
             sampler, f"a row with +inf logits keeps exactly those tokens, as logit 0 (kept "
                      f"{torch.isfinite(out[1]).nonzero().flatten().tolist()[:8]})")
    alone = sampler.apply(clean.clone(), params.stack([params] * 2), *model)
    _require(torch.equal(torch.isfinite(out[5:]), torch.isfinite(alone)), sampler,
             "bad rows do not change the other rows of their batch")

    one = sampler.apply(torch.zeros(1, 1), params.stack([params]), *_model_for(sampler, 1))
    _require(one.shape == (1, 1) and bool(torch.isfinite(one).all()), sampler, "a one-token vocabulary keeps it")
    low = sampler.apply(x.to(torch.bfloat16), params.stack(rows), *model)
    _require(low.dtype == torch.bfloat16 and not torch.isnan(low).any(), sampler,
             f"bfloat16 logits come back as bfloat16 without NaN (got {low.dtype})")
    if needs_of(sampler):
        try:
            sampler.apply(x.clone(), params.stack(rows), *_model_for(sampler, vocab + 1))
        except (ValueError, LLMGraftError):  # e.g. llmgraft.hooks.resources.check_vocab's ResourceError
            pass
        else:
            _require(False, sampler, "a model whose vocabulary differs from the logits' is a clear error")


# ---- the five families whose real methods come later (first-sketch operations) ------------------------------


def _merge_all(merger: Any, name: str, base, inputs, per_input, params) -> dict:
    """What a driver does for one tensor: whole-tensor statistics per input, then the merge."""
    from ..offline.merge import merge_whole

    return merge_whole(merger, name, base, inputs, per_input, params)


def check_merger(merger: Any) -> None:
    params = default_params(merger)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=gen)
    inputs = [base + 0.1 * torch.randn(6, 4, generator=gen) for _ in range(3)]
    per_input = [{key: 1.0 + 0.5 * i for key in merger.input_values} for i in range(len(inputs))]
    copies = [t.clone() for t in inputs]
    name = "model.layers.0.mlp.up_proj.weight"
    merger.check_inputs(per_input, params)
    expected = {"merged"} | {f"{o}/{i}" for o in merger.outputs for i in range(len(inputs))}
    _require(merger.merged_is in ("model", "task_vector"), merger, "merged_is is 'model' or 'task_vector'")

    out = _merge_all(merger, name, base, inputs, per_input, params)
    _require(isinstance(out, dict) and set(out) == expected, merger,
             f"merge returns exactly the outputs {sorted(expected)} (got {sorted(out) if isinstance(out, dict) else out})")
    merged = out["merged"]
    _require(isinstance(merged, torch.Tensor) and merged.shape == base.shape and merged.dtype == base.dtype, merger,
             "'merged' has the inputs' shape and dtype")
    _require(all(out[k].shape == base.shape for k in expected), merger, "every output has the inputs' shape")
    _require(bool(torch.isfinite(merged).all()), merger, "finite inputs merge to finite values")
    again = _merge_all(merger, name, base, inputs, per_input, params)
    _require(all(torch.equal(again[k], out[k]) for k in expected), merger, "merging is deterministic")
    _require(all(torch.equal(a, b) for a, b in zip(inputs, copies)), merger, "inputs are not modified")
    from ..kernels.merging import Rows

    for t in inputs:  # drivers may pass row readers instead of whole tensors
        _require(merger.tensor_stats(name, Rows(base), Rows(t), params) == merger.tensor_stats(name, base, t, params),
                 merger, "tensor_stats gives the same statistics from row readers (kernels.merging.Rows)")
    if not merger.needs_tensor_stats(params):
        _require(all(merger.tensor_stats(name, base, t, params) == {} for t in inputs), merger,
                 "tensor_stats computes nothing when needs_tensor_stats says so (drivers skip it)")
    if merger.elementwise:
        stats = [merger.tensor_stats(name, base, t, params) for t in inputs]
        rows = [{**v, **s} for v, s in zip(per_input, stats)]
        parts = [merger.merge(name, base[a:b], [t[a:b] for t in inputs], rows, params) for a, b in ((0, 2), (2, 6))]
        _require(all(torch.equal(torch.cat([p[k] for p in parts]), out[k]) for k in expected), merger,
                 "an elementwise merger merges row chunks to the chunks of the whole merge")
    if merger.needs_base:
        try:
            merger.merge(name, None, inputs, per_input, params)
        except (ValueError, LLMGraftError):
            pass
        else:
            _require(False, merger, "a merger that needs the base says so when it gets none")
    else:
        _require(_merge_all(merger, name, None, inputs, per_input, params)["merged"].shape == base.shape, merger,
                 "a merger that needs no base merges without one")
    if merger.linear:
        from ..offline.merge import linear_coefficients

        c0, cs = linear_coefficients(merger, params, per_input)
        combined = c0 * base.double() + sum(c * t.double() for c, t in zip(cs, inputs))
        _require(torch.allclose(merged.double(), combined, atol=1e-5), merger,
                 "a linear merger's result is c0 * base + sum c_i * input_i (coefficients from probes)")
    low = _merge_all(merger, name, base.bfloat16(), [t.bfloat16() for t in inputs], per_input, params)["merged"]
    _require(low.dtype == torch.bfloat16, merger, "bfloat16 inputs merge to bfloat16")


def check_attention(method: Any) -> None:
    """Scores are [B, T] floats, finite on valid positions, inputs untouched, grouped-query heads and bf16
    accepted, and each row's selection is the same alone as in a left-padded batch."""
    from ..kernels.retention import keep_counts, select_tokens

    gen = torch.Generator().manual_seed(0)
    params = default_params(method)
    queries = getattr(method, "queries", 1)
    lengths, width, heads, kv_heads, dim = (12, 7), 12, 4, 2, 8
    keys = torch.randn(2, kv_heads, width, dim, generator=gen)
    query = torch.randn(2, heads, queries, dim, generator=gen)
    valid = torch.arange(width)[None] >= torch.tensor([width - n for n in lengths])[:, None]
    before = (query.clone(), keys.clone(), valid.clone())
    scores = method.score(query, keys, valid, params)
    _require(isinstance(scores, torch.Tensor) and scores.shape == valid.shape and scores.is_floating_point(),
             method, f"score returns float scores of shape [B, T] = {tuple(valid.shape)}")
    _require(bool(torch.isfinite(scores[valid]).all()), method, "scores are finite on valid positions")
    _require(all(torch.equal(a, b) for a, b in zip(before, (query, keys, valid))), method,
             "score does not modify its inputs")
    last = getattr(method, "keeps_last", True)
    picked, _ = select_tokens(scores, valid, keep_counts(valid, 3, last), last)
    for row, n in enumerate(lengths):
        alone_scores = method.score(query[row:row + 1], keys[row:row + 1, :, width - n:], valid[row:row + 1, width - n:],
                                    params)
        alone_valid = valid[row:row + 1, width - n:]
        alone, _ = select_tokens(alone_scores, alone_valid, keep_counts(alone_valid, 3, last), last)
        got = picked[row][valid[row, picked[row]]] - (width - n)
        _require(torch.equal(got, alone[0]), method, "a row selects the same tokens alone as in a left-padded batch "
                 "(scores of valid positions must not depend on padding)")
    low = method.score(query.bfloat16(), keys.bfloat16(), valid, params)
    _require(low.shape == valid.shape and bool(torch.isfinite(low[valid].float()).all()), method,
             "bfloat16 queries and keys score too")


def check_kv_manager(method: Any) -> None:
    """``truncated_layers`` gives sorted, unique layers among 0..(the stage's layer)."""
    params = default_params(method)
    for stages, total in (((0,), 4), ((3,), 12), ((2, 5, 10), 12)):
        for stage, layer in enumerate(stages):
            layers = tuple(method.truncated_layers(stages, stage, total, params))
            _require(all(isinstance(i, int) and not isinstance(i, bool) for i in layers), method,
                     "truncated_layers returns ints")
            _require(list(layers) == sorted(set(layers)) and all(0 <= i <= layer for i in layers), method,
                     f"truncated layers are sorted, unique and lie in 0..{layer} (the stage's layer)")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def check_optimizer(method: Any, host: Any = None, params: dict[str, dict[str, Any]] | None = None) -> None:
    """``host``: the ``ModelHost`` the pass runs with (``TransformersHost()`` for transformers models);
    ``params``: per method name, parameters that fit the contract's tiny model (hidden size 64)."""
    from .models import build_tiny_mixtral

    if host is None:
        raise ContractError(f"optimizer {method.name!r}: pass host=... (a ModelHost, e.g. "
                            "llmgraft.integrations.transformers.host.TransformersHost()) to check it")

    with tempfile.TemporaryDirectory() as scratch:
        src = build_tiny_mixtral(Path(scratch) / "src")
        before = _digest(src)
        dst = Path(scratch) / "out"
        values = (params or {}).get(method.name)
        chosen = method.params_cls.from_mapping(values) if values else default_params(method)
        report = method.run(src, dst, chosen, host)
        _require(isinstance(report, dict), method, "run returns a report dict")
        _require(_digest(src) == before, method, "the source checkpoint is left untouched")
        files = {p.name for p in dst.iterdir()} if dst.is_dir() else set()
        _require("config.json" in files and any(f.endswith(".safetensors") for f in files), method,
                 "the output is a checkpoint directory with config.json and safetensors weights")
        _require(not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files), method,
                 "the output holds no pickled weights")
        _require(not [p for p in Path(scratch).iterdir() if p.name.startswith(".")], method,
                 "no temporary directory is left beside the output")


def _adapted_layers(method: Any) -> list:
    """Eight layers of two module types (q_proj [16, 16], up_proj [32, 16]), grouped by the method."""
    from ..hooks import AdaptedLayer

    layers, seen = [], {}
    for i in range(8):
        for kind, (d_out, d_in) in (("q_proj", (16, 16)), ("up_proj", (32, 16))):
            name = f"model.layers.{i}.{kind}"
            group = method.group(name)
            layers.append(AdaptedLayer(name, group, seen.get(group, 0), d_in, d_out))
            seen[group] = seen.get(group, 0) + 1
    return layers


def _state_tensors(state: Any) -> list[torch.Tensor]:
    return [t for part in (state.shared, state.own, state.fixed) for d in part.values() for t in d.values()]


def check_adapter(method: Any) -> None:
    from ..hooks import AdapterState

    params, layers = default_params(method), _adapted_layers(method)
    state = method.init_state(layers, params)
    _require(isinstance(state, AdapterState) and all(isinstance(t, torch.Tensor) for t in _state_tensors(state)),
             method, "init_state returns an AdapterState of tensors")
    _require(set(state.shared) <= {layer.group for layer in layers}, method, "shared state is keyed by group")
    _require(set(state.own) | set(state.fixed) == {layer.name for layer in layers}, method,
             "every layer has own or fixed tensors (a saved adapter names its layers), and no other key does")
    again = method.init_state(layers, params)
    _require(all(torch.equal(a, b) for a, b in zip(_state_tensors(state), _state_tensors(again))), method,
             "init_state is deterministic for given params")

    def parts(st, layer):
        return st.shared.get(layer.group, {}), st.own.get(layer.name, {}), st.fixed.get(layer.name, {})

    for layer in layers:
        a, b = method.factors(*parts(state, layer), params)
        _require(a.dim() == b.dim() == 2 and a.shape == (b.shape[1], layer.d_in) and b.shape[0] == layer.d_out,
                 method, f"factors of {layer.name} are A [r, {layer.d_in}] and B [{layer.d_out}, r]")
        delta = method.delta_weight(*parts(state, layer), params)
        _require(tuple(delta.shape) == (layer.d_out, layer.d_in) and bool(torch.isfinite(delta).all()), method,
                 "delta_weight has the layer's shape and is finite")
        expected = method.scaling(params) * (b.double() @ a.double())
        _require(torch.allclose(delta.double(), expected, rtol=1e-5, atol=1e-6), method,
                 "delta_weight is scaling · B @ A")
        _require(not bool(delta.any()), method, "with init_weights=True every ΔW starts at zero")

    noisy = dataclasses.replace(params, init_weights=False)
    state = method.init_state(layers, noisy)
    trainable = [t.requires_grad_() for part in (state.shared, state.own) for d in part.values()
                 for t in d.values()]
    loss = sum(method.delta_weight(*parts(state, layer), noisy).square().sum() for layer in layers)
    _require(bool(loss > 0), method, "with init_weights=False some ΔW is non-zero")
    loss.backward()
    _require(all(t.grad is not None and bool(t.grad.any()) for t in trainable), method,
             "every trainable tensor gets a gradient through delta_weight")


def check_quant_scheme(method: Any) -> None:
    """Stored tensors as ``packed_shapes`` says; rows and whole ``per`` column blocks quantize on their own
    (so hosts can shard either dimension); the dequantized weight is close to the original; ``matmul``
    after ``prepare`` (and on the stored tensors) equals ``x @ dequantize(stored).T``; bfloat16 weights
    quantize alike; the inputs are left untouched."""
    params = default_params(method)
    group = getattr(params, "group", 128)
    rows, cols = 48, 4 * max(group, 32)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    original = weight.clone()
    stored = method.quantize(weight, params)
    _require(torch.equal(weight, original), method, "quantize does not modify the weight")
    shapes = method.packed_shapes(rows, cols, params)
    _require(set(stored) == set(shapes), method, f"quantize stores exactly {sorted(shapes)}")
    for name, packed in shapes.items():
        _require(tuple(stored[name].shape) == tuple(packed.shape) and stored[name].dtype == packed.dtype, method,
                 f"stored {name!r} has the shape and dtype packed_shapes gives ({tuple(packed.shape)}, {packed.dtype})")
    top = method.quantize(weight[:16], params)
    _require(all(torch.equal(top[n], stored[n][:16]) for n in shapes), method,
             "the first rows quantize to the first rows of every stored tensor (output-dimension sharding)")
    half = cols // 2
    left = method.quantize(weight[:, :half], params)
    _require(all(torch.equal(left[n], stored[n][:, : half // p.per]) for n, p in shapes.items()), method,
             "the first input columns quantize to the first columns / per of every stored tensor "
             "(input-dimension sharding)")
    dense = method.dequantize(stored, params)
    _require(dense.shape == weight.shape and dense.dtype == torch.float32, method,
             "dequantize returns the float32 weight")
    error = float((dense - weight).norm() / weight.norm())
    _require(error < 0.6, method, f"the dequantized weight is close to the original (relative error {error:.2f})")
    x = torch.randn(3, 5, cols, generator=gen)
    want = x @ dense.T
    for state, label in ((method.prepare(stored, params), "prepared"), (stored, "stored")):
        got = method.matmul(x, state, params)
        close = torch.allclose(got.float(), want, rtol=3e-2, atol=3e-2 * float(want.abs().mean()))
        _require(got.shape == want.shape and close, method, f"matmul on the {label} tensors is x @ dequantize(stored).T")
    low = method.quantize(weight.bfloat16(), params)
    _require(set(low) == set(shapes), method, "bfloat16 weights quantize too")


CONTRACTS: dict[str, Callable[[Any], None]] = {
    "sampler": check_sampler,
    "merger": check_merger,
    "attention": check_attention,
    "kv_manager": check_kv_manager,
    "optimizer": check_optimizer,
    "adapter": check_adapter,
    "quant_scheme": check_quant_scheme,
}
assert set(CONTRACTS) == set(FAMILIES), "every family needs a contract"


def check_method(family: str, method: Any, **context: Any) -> None:
    """Registration checks plus the behavioural contract of ``family``; raises :class:`ContractError`.
    ``context`` is what a family's contract needs from the caller (optimizers: ``host``)."""
    try:
        FAMILIES[family].check(method)
    except TypeError as exc:
        raise ContractError(str(exc)) from None
    CONTRACTS[family](method, **context)
