"""Top-H truncation (arXiv 2509.02510), batched over rows with a per-row alpha. Torch reference kernel.

All variants look at the N most likely tokens in descending order and keep a prefix of length k ≥ 1.
With p the full-vocabulary probabilities and S_k = -Σ_{i≤k} p_i log p_i:

* ``reference`` (the official ``logit_processor.py``): τ = α·S_N, k = #{k : S_k ≤ τ}. p is NOT
  renormalised over the top N.
* ``hf`` (transformers' ``TopHLogitsWarper``): the same rule on q = softmax over the top N only, with
  τ = α·H(q); computed in float32 exactly as transformers does, so the kept sets agree bit for bit.
* ``paper`` (the bound the paper states): grow the prefix while H(q_k) ≤ α·H(p), where q_k is p
  renormalised over the prefix and H(p) the full-vocabulary entropy; stop at the first violation.

In every variant tokens of zero probability are never kept (beyond the first) and k ≥ 1, so α = 1,
V = 1, V < N and underflowing tails never fail (the official code raises IndexError at α = 1).
"""

from __future__ import annotations

import torch

from .truncation import TopN, truncate_top_n

VARIANTS = ("reference", "hf", "paper")
#: Relative slack on every bound: absorbs float64 rounding (different summation orders agree to ~1e-15),
#: far below the 1e-5 at which two sets are called a tie.
_SLACK = 1e-9


def _prefix_sums(top: TopN):
    """Over k = 2..N: C_k = Σ_{2≤i≤k} e_i (so Z_k = 1 + C_k keeps its small part exact) and
    W_k = Σ_{i≤k} e_i t_i ≤ 0 (the first token adds exactly 1 to Z and 0 to W). The first token is kept
    by every rule, so the rules count the tokens they keep beyond it."""
    e, t = top.weight[:, 1:], top.shifted[:, 1:]
    return e.cumsum(-1), (e * t).cumsum(-1)


def _reference_count(top: TopN, alpha):
    # s·S_k = Z_k log s - W_k: both terms >= 0, so peaked rows keep their digits.
    c, w = _prefix_sums(top)
    log_s = top.xp.log1p(c[:, -1:] + top.tail_mass)
    scaled = (c + 1.0) * log_s - w
    tau = scaled[:, -1:] * (top.column(alpha) * (1.0 + _SLACK))
    return 1 + ((scaled <= tau) & (top.weight[:, 1:] > 0)).sum(-1)


def _hf_count(top: TopN, alpha):
    # Mirrors transformers: Categorical(logits=top).entropy() for tau and cumsum(-q * log q) for S.
    top_logits = top.logits.float()
    logq = top_logits - top_logits.logsumexp(dim=-1, keepdim=True)
    q = logq.softmax(dim=-1)
    entropy = -(logq.clamp(min=torch.finfo(logq.dtype).min) * q).sum(dim=-1)
    tau = (entropy * torch.as_tensor(alpha, dtype=torch.float32, device=q.device)).unsqueeze(-1)
    s = torch.cumsum(-q * torch.log(q), dim=-1)
    return ((s <= tau) & (q > 0)).sum(dim=-1)


def _paper_count(top: TopN, alpha):
    # H(q_k) = log Z_k - W_k / Z_k and H(p) = log s - W / s: each a sum of two terms >= 0.
    xp = top.xp
    c, w = _prefix_sums(top)
    z = c + 1.0
    h_prefix = xp.log1p(c) - w / z
    tail_mass, tail_weighted = top.tail_mass, top.tail_weighted
    h_full = xp.log1p(c[:, -1:] + tail_mass) - (w[:, -1:] + tail_weighted) / (z[:, -1:] + tail_mass)
    ok = (h_prefix <= h_full * (top.column(alpha) * (1.0 + _SLACK))) & (top.weight[:, 1:] > 0)
    # 1 + the length of the leading run of True: the first violation stops the greedy growth.
    return 1 + ok.cumprod(-1).sum(-1)


def top_h(logits: torch.Tensor, alpha: torch.Tensor | float, top_n: int = 100,
          variant: str = "reference") -> torch.Tensor:
    """Mask ``logits[B, V]`` (already divided by the temperature) to each row's Top-H set, in place.

    ``alpha`` is a float or a [B] tensor in (0, 1]. Returns ``logits``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"top_h variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "reference":
        return truncate_top_n(logits, top_n, lambda top: _reference_count(top, alpha), "mass")
    if variant == "hf":
        return truncate_top_n(logits, top_n, lambda top: _hf_count(top, alpha), torch_ties=True)
    return truncate_top_n(logits, top_n, lambda top: _paper_count(top, alpha), "mass+entropy")
