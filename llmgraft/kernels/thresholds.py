"""Whole-row threshold samplers, batched with per-row parameters. Torch reference kernels.

Both keep every token whose (temperature-scaled) logit reaches a per-row threshold, so they may keep any
number of tokens; both are one pass over the row for their statistics plus :func:`truncate_threshold`'s
maximum and masking passes.

* **top-nσ** (Tang et al., ACL 2025; official ``Tomorrowdawn/top_nsigma``): keep x_i ≥ max(x) − n·σ(x).
  σ is ``torch.std`` of the row, the unbiased estimate (``ddof=1``) as in the official code; ``ddof=0``
  gives llama.cpp's population σ. -inf entries are left out of σ (as llama.cpp does; the official code
  turns one -inf into a NaN σ and drops the whole row). The kept set does not depend on the temperature.
* **p-less** (Tan et al., ICLR 2026; official ``ryttry/p-less-sampling``): with p = softmax(x), keep
  p_i ≥ L = Σ p² (order 2); the order-k form keeps p_i ≥ (Σ p^k)^(1/(k−1)); ``p_less_norm`` keeps
  p_i ≥ (V·L − 1)/(V − 1) with V the row width (masked tokens included, as in the official code).
  In logit units, with t = x − max and S_k = Σ exp(k·t): t_i ≥ (log S_k − log S_1)/(k − 1).

The thresholds never exceed the row maximum in exact arithmetic; :func:`truncate_threshold` also clamps
them there, so float rounding can never drop the argmax.
"""

from __future__ import annotations

import numpy as np
import torch

from .truncation import _CHUNK_ELEMENTS, _buffer, truncate_threshold

P_LESS_VARIANTS = ("p_less", "p_less_norm")


def _as_column(values, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(values, (int, float)):
        return float(values)
    return values.to(device=like.device, dtype=like.dtype)


def _finite_std(x: torch.Tensor, ddof: int) -> torch.Tensor:
    """σ of each row over its finite entries (rows here have a finite maximum; NaN was made -inf).

    Two passes through the float32 workspace, in row chunks: the mean (accumulated in float64), then
    Σ(x − mean)² (no cancellation); 5-10x faster than ``torch.std`` on the CPU. Rows holding -inf come out
    non-finite and are redone over their finite entries only."""
    batch, vocab = x.shape
    if vocab <= ddof:
        return torch.zeros(batch, dtype=torch.float32, device=x.device)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    parts = []
    for i in range(0, batch, rows):
        chunk = x[i:i + rows].float()
        mean = (chunk.sum(-1, dtype=torch.float64) / vocab).float()
        deviation = torch.sub(chunk, mean.unsqueeze(1), out=_buffer(tuple(chunk.shape), x.device))
        parts.append(deviation.square_().sum(-1))
    std = (parts[0] if len(parts) == 1 else torch.cat(parts)).div_(vocab - ddof).sqrt_()
    masked = ~torch.isfinite(std)
    if bool(masked.any()):
        rows_ = x[masked].float()
        finite = torch.isfinite(rows_)
        count = finite.sum(-1)
        zero = torch.zeros((), dtype=rows_.dtype)
        mean = torch.where(finite, rows_, zero).sum(-1) / count
        square = torch.where(finite, (rows_ - mean.unsqueeze(1)) ** 2, zero).sum(-1)
        std[masked] = torch.where(count > ddof, square / (count - ddof).clamp(min=1), zero).sqrt()
    return std


def _finite_std_numpy(x: np.ndarray, ddof: int) -> np.ndarray:
    """:func:`_finite_std` for a small float32 array (numpy's std is two-pass, without cancellation)."""
    if x.shape[1] <= ddof:
        return np.zeros(x.shape[0], dtype=np.float32)
    std = x.std(axis=1, ddof=ddof)
    masked = ~np.isfinite(std)
    if masked.any():
        import warnings

        rows = np.where(np.isfinite(x[masked]), x[masked], np.nan)
        count = np.isfinite(rows).sum(1)
        with warnings.catch_warnings():  # rows with <= ddof finite logits: nanstd warns, and we use 0
            warnings.simplefilter("ignore", RuntimeWarning)
            spread = np.nanstd(rows, axis=1, ddof=ddof)
        std[masked] = np.where(count > ddof, spread, 0.0)
    return std


def top_nsigma(logits: torch.Tensor, n: torch.Tensor | float = 1.0, ddof: int = 1) -> torch.Tensor:
    """Mask ``logits[B, V]`` to each row's top-nσ set, in place: keep x ≥ max − n·σ. Returns ``logits``."""
    if ddof not in (0, 1):
        raise ValueError(f"top_nsigma ddof must be 0 or 1, got {ddof!r}")
    if logits.dtype != torch.float32:  # a bf16 threshold would round away the boundary: decide in float32
        return logits.copy_(top_nsigma(logits.float(), n, ddof))

    def threshold(x, row_max, xp):
        if xp is np:
            factor = n if isinstance(n, (int, float)) else n.detach().cpu().numpy()
            return row_max - factor * _finite_std_numpy(x, ddof)
        return row_max - _as_column(n, row_max) * _finite_std(x, ddof)

    return truncate_threshold(logits, threshold)


def _exp_sums(x: torch.Tensor, row_max: torch.Tensor, order: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S_1 = Σ exp(t) and S_k = Σ exp(k·t), t = x − max, per row (``x`` untouched).

    Through the shared float32 workspace, in row chunks of at most ``_CHUNK_ELEMENTS``, so that the memory
    it keeps is bounded whatever the batch and vocabulary."""
    rows = max(1, _CHUNK_ELEMENTS // x.shape[1])
    parts = []
    for i in range(0, x.shape[0], rows):
        chunk = x[i:i + rows]
        e = torch.sub(chunk, row_max[i:i + rows].unsqueeze(1), out=_buffer(tuple(chunk.shape), x.device)).exp_()
        s1 = e.sum(-1)
        parts.append((s1, e.square_().sum(-1) if order == 2.0 else e.pow_(order).sum(-1)))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


def p_less(logits: torch.Tensor, variant: str = "p_less", order: float = 2.0) -> torch.Tensor:
    """Mask ``logits[B, V]`` (temperature-scaled) to each row's p-less set, in place. Returns ``logits``."""
    if variant not in P_LESS_VARIANTS:
        raise ValueError(f"p_less variant must be one of {P_LESS_VARIANTS}, got {variant!r}")
    if not order > 1:
        raise ValueError(f"p_less order must be > 1, got {order!r}")
    if variant == "p_less_norm" and order != 2.0:
        raise ValueError("p_less_norm is defined for order 2 only")
    if logits.dtype != torch.float32:  # the workspace is float32; other dtypes go through a float32 copy
        return logits.copy_(p_less(logits.float(), variant, order))

    def threshold(x, row_max, xp):
        if xp is np:
            e = np.exp(x - row_max[:, None])
            s1, sk = e.sum(1), (np.einsum("ij,ij->i", e, e) if order == 2.0 else (e ** order).sum(1))
        else:
            s1, sk = _exp_sums(x, row_max, order)
        if variant == "p_less":
            return row_max + xp.log(sk / s1) / (order - 1.0)
        log_s1 = xp.log(s1)
        vocab = x.shape[1]
        if vocab == 1:
            return row_max
        # p ≥ (V·S_2/S_1² − 1)/(V − 1); a non-positive bound (a uniform row) keeps every finite token.
        bound = (vocab * sk / (s1 * s1) - 1.0) / (vocab - 1)
        return xp.where(bound > 0, row_max + xp.log(bound) + log_s1, -np.inf)

    return truncate_threshold(logits, threshold)
