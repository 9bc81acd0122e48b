"""Merging as pure tensor functions (no I/O, no host framework): task vectors, TIES, TALL masks, Consensus,
metric-weighted averaging, and the bit packing of masks. Every function computes in float32 (float64 for
weights) and leaves its inputs untouched.

Definitions (θ₀ the base, θ_i the inputs, τ_i = θ_i − θ₀ their task vectors):

* task arithmetic: θ = θ₀ + λ·Σ_i w_i τ_i;
* TIES (Yadav et al., 2023; official ``ties-merging/src/utils/merge_utils.py``): trim each τ_i to its largest
  magnitudes (as the official ``topk_values_mask``: drop the d − ⌊d·density⌋ smallest, so ⌊d·density⌋ + 1
  entries stay, plus ties), elect each entry's sign as the sign of Σ_i (trimmed τ_i), average the trimmed
  entries that agree with it (disjoint mean; Consensus and TALL use the disjoint sum, as ``tall_masks``),
  θ = θ₀ + λ·τ. The official code trims over the whole model's flattened task vector; here, as in mergekit,
  per tensor, so a merge streams tensor by tensor. Where the trimmed entries cancel exactly (Σ = 0 with
  nonzero terms), the official code elects the sign of the sum of all elected signs of the model; that is
  not a per-entry rule, so chunks could not be merged on their own: here such entries elect +1;
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


class Rows:
    """A tensor read in row ranges: ``shape``, and ``read(a, b)`` giving rows [a, b) of the first dimension.
    Wraps an in-memory tensor here; the checkpoint driver passes readers of files, so statistics over a
    whole tensor never hold it whole."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor.reshape(self.shape[0], -1)[start:stop] if self.shape else self.tensor.reshape(1, 1)


def _as_rows(value) -> Rows | None:
    return value if value is None or hasattr(value, "read") else Rows(value)


def magnitude_threshold(tensor, density: float, base=None) -> float:
    """The magnitude at or above which TIES keeps entries of τ = tensor − base (or of ``tensor`` itself):
    the (d − ⌊d·density⌋)-th smallest |τ| (so ⌊d·density⌋ + 1 entries stay, plus ties), as the official
    ``topk_values_mask``; 0 at density 1.

    ``tensor`` and ``base`` are tensors or :class:`Rows` readers. |τ| fills one float32 array in row
    slices, then an in-place selection finds the threshold: one copy of the tensor in memory, never the
    inputs whole nor the several copies a sort would take."""
    tensor, base = _as_rows(tensor), _as_rows(base)
    count = math.prod(tensor.shape) if tensor.shape else 1
    drop = count - int(count * density)
    if density >= 1.0 or drop <= 0:
        return 0.0
    rows = tensor.shape[0] if tensor.shape else 1
    per_row = max(1, count // rows)
    step = max(1, (1 << 22) // per_row)
    magnitudes = np.empty(count, dtype=np.float32)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        part = tensor.read(a, b).float().reshape(-1)
        if base is not None:
            part = part - base.read(a, b).float().reshape(-1)
        magnitudes[a * per_row: b * per_row] = part.abs_().numpy()
    magnitudes.partition(drop - 1)
    return float(magnitudes[drop - 1])


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """``tau`` with the entries of magnitude below ``threshold`` set to zero."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype))


def ties_vector(trimmed: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                aggregate: str = "mean") -> torch.Tensor:
    """Elect signs by total (weighted) mass and combine the trimmed entries that agree: their mean (TIES) or
    sum (the "dis-sum" that TALL and Consensus use). Entries whose total is exactly 0 elect +1 (see the
    module docstring), so the result is entrywise and row chunks merge on their own."""
    weights = [1.0] * len(trimmed) if weights is None else weights
    stacked = torch.stack([w * t for w, t in zip(weights, trimmed)])
    agree = torch.where(stacked.sum(0) >= 0, stacked > 0, stacked < 0)
    total = torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype)).sum(0)
    if aggregate == "sum":
        return total
    return total / (agree & (stacked != 0)).sum(0).clamp(min=1)


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
