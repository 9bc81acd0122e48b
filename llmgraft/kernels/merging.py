"""Merging as pure tensor functions (no I/O, no host framework): task vectors, TIES, TALL masks, Consensus,
metric-weighted averaging, and the bit packing of masks. Every function computes in float32 (float64 for
weights) and leaves its inputs untouched.

Definitions (θ₀ the base, θ_i the inputs, τ_i = θ_i − θ₀ their task vectors):

* task arithmetic: θ = θ₀ + λ·Σ_i w_i τ_i;
* TIES (Yadav et al., 2023): trim each τ_i to its ``density`` largest magnitudes, elect each entry's sign as
  the sign of Σ_i (trimmed τ_i), average the trimmed entries that agree with it (disjoint mean), θ = θ₀ + λ·τ.
  The official code trims over the whole model's flattened task vector; here, as in mergekit, per tensor
  (so a merge streams tensor by tensor);
* TALL masks (Wang et al., ICML 2024, official ``tallmask_utils.py``): with τ_MTL = Σ_t τ_t,
  m_t = |τ_t| > λ_t·|τ_MTL − τ_t|; task t is rebuilt as θ_t = θ₀ + m_t ⊙ τ_MTL;
* Consensus: keep the entries present in at least k task masks, θ = θ₀ + α·(τ ⊙ [Σ_t m_t ≥ k]), with τ the
  task-arithmetic sum or the TIES vector;
* MWA (metrics-weighted averaging, arXiv 2504.18580; the paper's formula is not public, this is ours):
  θ = Σ_i w_i θ_i with w_i ∝ loss_i^(−p) (lower loss weighs more) or step_i^p (later weighs more), normalised;
  p = 0 is the uniform average and p → ∞ the single best checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def task_vectors(base: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """τ_i = θ_i − θ₀ in float32."""
    anchor = base.float()
    return [t.float() - anchor for t in inputs]


def magnitude_threshold(tau: torch.Tensor, density: float) -> float:
    """The magnitude at or above which the ``density`` largest entries of ``tau`` lie (ties kept)."""
    if density >= 1.0:
        return 0.0
    count = max(1, math.ceil(density * tau.numel()))
    return float(tau.abs().flatten().float().kthvalue(tau.numel() - count + 1).values)


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """``tau`` with the entries of magnitude below ``threshold`` set to zero."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype))


def ties_vector(trimmed: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Elect signs by total (weighted) mass and average the trimmed entries that agree (disjoint mean)."""
    weights = [1.0] * len(trimmed) if weights is None else weights
    stacked = torch.stack([w * t for w, t in zip(weights, trimmed)])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    total = torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype)).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros((), dtype=total.dtype))


def tall_masks(taus: Sequence[torch.Tensor], total: torch.Tensor, lams: Sequence[float]) -> list[torch.Tensor]:
    """m_t = |τ_t| > λ_t·|τ_MTL − τ_t| for each task t (``total`` is τ_MTL)."""
    return [tau.abs() > lam * (total - tau).abs() for tau, lam in zip(taus, lams)]


def consensus(masks: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Entries present in at least ``k`` of the masks."""
    return torch.stack(masks).sum(0) >= k


def metric_weights(values: Sequence[float], penalty: float, lower_is_better: bool) -> list[float]:
    """MWA weights: ∝ v^(−p) (lower is better, e.g. loss) or v^p (higher is better, e.g. step), summing to 1.

    Computed in log space relative to the best value, so a large p gives the best input weight 1 instead
    of overflowing."""
    logs = np.log(np.asarray(values, dtype=np.float64))
    scores = -penalty * logs if lower_is_better else penalty * logs
    weights = np.exp(scores - scores.max())
    return (weights / weights.sum()).tolist()


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 entries per byte, little-endian bit order (entry i is bit i % 8 of
    byte i // 8, in row-major order); the last byte is zero-padded."""
    flat = mask.detach().cpu().reshape(-1).numpy().astype(np.bool_)
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for a mask of ``shape``."""
    count = math.prod(shape)
    flat = np.unpackbits(packed.cpu().numpy().astype(np.uint8), bitorder="little", count=count)
    return torch.from_numpy(flat.astype(np.bool_)).reshape(tuple(shape))
