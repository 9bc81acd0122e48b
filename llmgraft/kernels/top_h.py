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

from .truncation import truncate_top_n

VARIANTS = ("reference", "hf", "paper")


def _reference_count(p: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    s = torch.special.xlogy(p, p).neg_().cumsum_(dim=-1)
    tau = alpha.double().unsqueeze(1) * s[:, -1:]
    return ((s <= tau) & (p > 0)).sum(dim=-1)


def _hf_count(top_logits: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    # Mirrors transformers: Categorical(logits=top).entropy() for tau and cumsum(-q * log q) for S.
    logq = top_logits.float() - top_logits.float().logsumexp(dim=-1, keepdim=True)
    q = logq.softmax(dim=-1)
    entropy = -(logq.clamp(min=torch.finfo(logq.dtype).min) * q).sum(dim=-1)
    tau = (entropy * alpha.float()).unsqueeze(1)
    s = torch.cumsum(-q * torch.log(q), dim=-1)
    return ((s <= tau) & (q > 0)).sum(dim=-1)


def _paper_count(p: torch.Tensor, entropy: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    s = torch.special.xlogy(p, p).neg_().cumsum_(dim=-1)
    mass = p.cumsum(dim=-1)
    # H(q_k) = S_k / Γ_k + log Γ_k for q_k = p / Γ_k over the first k tokens.
    h_prefix = s / mass + mass.log()
    bound = alpha.double().unsqueeze(1) * entropy.unsqueeze(1)
    # Slack of float32 rounding in H(p): at alpha = 1 a fully kept vocabulary (H(q) = H(p)) stays kept.
    ok = (h_prefix <= bound + 1e-6 * bound.abs().clamp(min=1.0)) & (p > 0)
    # Length of the leading run of True: index of the first violation (or N when there is none).
    return ok.long().cumprod(dim=-1).sum(dim=-1)


def top_h(logits: torch.Tensor, alpha: torch.Tensor | float, top_n: int = 100,
          variant: str = "reference") -> torch.Tensor:
    """Mask ``logits[B, V]`` (already divided by the temperature) to each row's Top-H set, in place.

    ``alpha`` is a float or a [B] tensor in (0, 1]. Returns ``logits``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"top_h variant must be one of {VARIANTS}, got {variant!r}")
    alpha_t = torch.as_tensor(alpha, dtype=torch.float32, device=logits.device).expand(logits.shape[0])
    if variant == "reference":
        return truncate_top_n(logits, top_n, lambda _top, p: _reference_count(p, alpha_t), "probs")
    if variant == "hf":
        return truncate_top_n(logits, top_n, lambda top: _hf_count(top, alpha_t))
    return truncate_top_n(logits, top_n, lambda _top, p, h: _paper_count(p, h, alpha_t), "probs+entropy")
