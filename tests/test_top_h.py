"""Top-H: each variant against an independent per-row replica, the installed HF warper, and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopHLogitsWarper

from llmgraft.hooks import get_registry
from llmgraft.kernels.top_h import top_h

# ---- independent replicas: plain numpy, float64, one row at a time --------------------------------------


def _softmax64(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


def _plogp(x: float) -> float:
    return x * math.log(x) if x > 0 else 0.0


def replica_official(row: np.ndarray, alpha: float, top_n: int = 100) -> set[int]:
    """The official loop's rule (logit_processor.py), without its IndexError at alpha = 1."""
    p = _softmax64(row)
    order = np.argsort(-p, kind="stable")[:top_n]
    tau = alpha * sum(-_plogp(p[i]) for i in order)
    kept, cumulative = [], 0.0
    for i in order:
        cumulative -= _plogp(p[i])
        if kept and (cumulative > tau or p[i] == 0):
            break
        kept.append(int(i))
    return set(kept)


def replica_paper(row: np.ndarray, alpha: float, top_n: int = 100) -> set[int]:
    """Greedy: add tokens by descending p while H(q_S) <= alpha * H(p); stop at the first violation."""
    p = _softmax64(row)
    bound = alpha * -sum(_plogp(x) for x in p)
    order = np.argsort(-p, kind="stable")[:top_n]
    kept = [int(order[0])]
    for i in order[1:]:
        if p[i] == 0:
            break
        trial = kept + [int(i)]
        mass = sum(p[j] for j in trial)
        if -sum(_plogp(p[j] / mass) for j in trial) > bound + 1e-9 * max(1.0, bound):  # ties are kept
            break
        kept = trial
    return set(kept)


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in logits]


def random_logits(batch: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=gen) * scale


# ---- variants against replicas ----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [50, 1000, 4096])
@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0])
def test_reference_variant_matches_official_rule(vocab, scale):
    x = random_logits(8, vocab, scale, seed=vocab)
    alphas = torch.linspace(0.05, 1.0, 8)
    ours = kept(top_h(x.clone(), alphas, 100, "reference"))
    for row, a, got in zip(x.numpy(), alphas.tolist(), ours):
        assert got == replica_official(row, a)


@pytest.mark.parametrize("vocab", [50, 1000, 4096])
@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0])
def test_paper_variant_matches_greedy_bound(vocab, scale):
    x = random_logits(8, vocab, scale, seed=vocab + 1)
    alphas = torch.linspace(0.05, 1.0, 8)
    ours = kept(top_h(x.clone(), alphas, 100, "paper"))
    for row, a, got in zip(x.numpy(), alphas.tolist(), ours):
        assert got == replica_paper(row, a)


@pytest.mark.parametrize("vocab", [7, 100, 3000, 32000])
@pytest.mark.parametrize("alpha", [0.05, 0.4, 0.8, 1.0])
def test_hf_variant_equals_installed_warper_exactly(vocab, alpha):
    x = random_logits(16, vocab, 3.0, seed=vocab)
    expected = TopHLogitsWarper(top_h=alpha)(None, x.clone())
    assert torch.equal(top_h(x.clone(), alpha, 100, "hf"), expected)


def test_variants_differ_where_the_papers_differ():
    x = random_logits(32, 4096, 2.0, seed=3)
    sets = {v: kept(top_h(x.clone(), 0.4, 100, v)) for v in ("reference", "hf", "paper")}
    assert sets["reference"] != sets["hf"] and sets["hf"] != sets["paper"] and sets["paper"] != sets["reference"]


def test_per_row_alpha_equals_row_by_row():
    x = random_logits(6, 2000, 2.0, seed=5)
    alphas = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    batched = top_h(x.clone(), alphas)
    for i, a in enumerate(alphas.tolist()):
        assert torch.equal(batched[i:i + 1], top_h(x[i:i + 1].clone(), a))


def test_kept_set_grows_with_alpha_and_keeps_argmax():
    x = random_logits(16, 3000, 3.0, seed=9)
    previous = None
    for a in (0.05, 0.2, 0.5, 0.9, 1.0):
        out = top_h(x.clone(), a)
        assert torch.equal(out.argmax(-1), x.argmax(-1))
        count = torch.isfinite(out).sum(-1)
        if previous is not None:
            assert bool((count >= previous).all())
        previous = count


def test_kept_logits_are_unchanged():
    x = random_logits(4, 500, 2.0, seed=1)
    out = top_h(x.clone(), 0.6)
    mask = torch.isfinite(out)
    assert torch.equal(out[mask], x[mask])


# ---- edge cases --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["reference", "hf", "paper"])
def test_alpha_one_small_vocab_and_v1_never_fail(variant):
    for vocab in (1, 2, 99, 100, 101):
        x = random_logits(3, vocab, 2.0, seed=vocab)
        out = top_h(x.clone(), 1.0, 100, variant)
        assert not torch.isnan(out).any()
        assert (torch.isfinite(out).sum(-1) >= 1).all()
        if variant == "reference":
            assert (torch.isfinite(out).sum(-1) == min(vocab, 100)).all()
    assert torch.equal(top_h(torch.tensor([[3.0]]), 0.4), torch.tensor([[3.0]]))


@pytest.mark.parametrize("variant", ["reference", "hf", "paper"])
def test_bad_logits_policy(variant):
    inf = float("inf")
    x = random_logits(6, 300, 2.0, seed=2)
    x[0, 5] = float("nan")                      # NaN → -inf
    x[1, [3, 7]] = inf                          # +inf row keeps exactly its +inf tokens
    x[2] = -inf                                 # no finite logit → all -inf
    x[3] = float("nan")                         # all NaN → all -inf
    x[4, :] = -inf
    x[4, 11] = 0.0                              # one finite token
    x[5, 0] = 1000.0                            # everything else underflows to p = 0
    out = top_h(x.clone(), 0.5, 100, variant)
    assert not torch.isnan(out).any()
    clean = x[0].clone()
    clean[5] = -inf
    assert torch.equal(out[0], top_h(clean.unsqueeze(0), 0.5, 100, variant)[0])
    assert kept(out[1:2]) == [{3, 7}] and torch.equal(out[1, [3, 7]], torch.zeros(2))
    assert torch.isneginf(out[2]).all() and torch.isneginf(out[3]).all()
    assert kept(out[4:6]) == [{11}, {0}]


def test_low_precision_inputs():
    x = random_logits(4, 1000, 2.0, seed=4)
    for dtype in (torch.bfloat16, torch.float16):
        out = top_h(x.to(dtype), 0.4)
        assert out.dtype == dtype and not torch.isnan(out).any()
        assert (torch.isfinite(out).sum(-1) >= 1).all()


def test_plugin_apply_with_stacked_params():
    sampler = get_registry().get("sampler", "top_h")
    rows = [sampler.params_cls(alpha=a, variant="hf") for a in (0.2, 0.9)]
    x = random_logits(2, 800, 2.0, seed=6)
    out = sampler.apply(x.clone(), sampler.params_cls.stack(rows))
    assert torch.equal(out[0], TopHLogitsWarper(0.2)(None, x[:1].clone())[0])
    assert torch.equal(out[1], TopHLogitsWarper(0.9)(None, x[1:].clone())[0])


@pytest.mark.parametrize("variant, replica", [("reference", replica_official), ("paper", replica_paper)])
def test_rows_masked_by_earlier_processors(variant, replica):
    """Grammar / bad-words masks leave -inf in most of the row; fewer finite tokens than N is common."""
    x = random_logits(8, 3000, 2.0, seed=11)
    gen = torch.Generator().manual_seed(12)
    for row, finite in enumerate((1, 2, 5, 40, 99, 100, 101, 2000)):
        keep = torch.randperm(3000, generator=gen)[:finite]
        masked = torch.full((3000,), float("-inf"))
        masked[keep] = x[row, keep]
        x[row] = masked
    alphas = torch.linspace(0.1, 1.0, 8)
    ours = kept(top_h(x.clone(), alphas, 100, variant))
    for row, a, got in zip(x.numpy(), alphas.tolist(), ours):
        assert got == replica(row, a)
    hf = TopHLogitsWarper(0.5)(None, x.clone())
    assert torch.equal(top_h(x.clone(), 0.5, 100, "hf"), hf)
