"""Quantized weight formats in pure torch (the reference every fast path is tested against), and the CPU
fast path through torch's int4 kernels.

**W4A16** (group-wise asymmetric int4): each group of ``g`` consecutive input columns of a row has a scale
``s`` and an integer zero point ``z`` in 0..15, and ``w = (q - z) * s`` with ``q`` in 0..15. From the
group's min and max: ``s = (max - min) / 15``, ``z = round(-min / s)``, ``q = clamp(round(w / s) + z)``.
Stored: ``qweight`` uint8 [N, K/2] (column 2j in the low nibble of byte j, 2j+1 in the high one),
``scales`` float16 [N, K/g], ``zeros`` uint8 [N, K/g].

**Sherry ternary, 1.25 bits** (3:4 sparse): along the input dimension, every block of 4 weights has exactly
one zero (the smallest |w|; the first on ties) and three ±1, times the scale of its group of ``g`` columns,
``s = Σ|w| over the group's kept weights / (3g/4)`` (the official code's, which is also the L2-optimal
scale for that sign pattern). A block is one 5-bit code: ``code = 8 * p + b`` with ``p`` the zero's
position (0..3) and bit i of ``b`` set when the i-th kept weight (in order) is negative. Stored:
``codes_lo`` uint8 [N, K/8] (the low 4 bits of block 2j's code in the low nibble of byte j, block 2j+1's in
the high one), ``codes_hi`` uint8 [N, K/32] (bit i of byte j: the 5th bit of block 8j + i), ``scales``
float16 [N, K/g]: 4 + 1 bits per 4 weights.

**CPU fast path**: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` computes ``x @ ((q - 8) * s + z')^T``
with a per-group scale and offset, fast for bfloat16 activations. W4A16 maps to it with ``z' = (8 - z) s``,
and ternary exactly with ``q = t + 8``, ``z' = 0``. It needs ``g`` in {32, 64, 128, 256}, K % g == 0 and
N % 16 == 0; other shapes multiply the dequantized weight.
"""

from __future__ import annotations

from typing import Any

import torch

INT4PACK_GROUPS = (32, 64, 128, 256)


def check_shape(out_features: int, in_features: int, group: int, multiple: int = 2) -> None:
    """A clear error when a [N, K] weight cannot be stored in groups of ``group`` columns."""
    if in_features % group or group % multiple:
        raise ValueError(f"in_features {in_features} must be a multiple of the group size {group} (itself a "
                         f"multiple of {multiple})")


# --------------------------------------------------------------------------------------------- W4A16
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in 0..15 → uint8 [N, K/2], column 2j in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] → uint8 [N, K] codes in 0..15 (the inverse of :func:`pack_nibbles`)."""
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


def quantize_w4(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """W4A16 storage of a [N, K] weight: ``qweight``, ``scales`` (float16) and ``zeros`` (uint8)."""
    rows, cols = weight.shape
    check_shape(rows, cols, group)
    w = weight.detach().float().view(rows, cols // group, group)
    low = w.amin(-1).clamp(max=0.0)
    high = w.amax(-1).clamp(min=0.0)  # the range holds 0, so 0 is exact and z lies in 0..15
    scale = ((high - low) / 15).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, 15)
    q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return {"qweight": pack_nibbles(q.view(rows, cols)), "scales": scale.to(torch.float16),
            "zeros": zero.to(torch.uint8)}


def dequantize_w4(stored: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    q = unpack_nibbles(stored["qweight"]).float()
    rows, cols = q.shape
    scale = stored["scales"].float().repeat_interleave(group, 1)
    zero = stored["zeros"].float().repeat_interleave(group, 1)
    return (q - zero) * scale


# ------------------------------------------------------------------------------------------- ternary
def _kept_positions() -> torch.Tensor:
    """[4, 3]: for each zero position p, the positions of the three kept weights, in order."""
    return torch.tensor([[j for j in range(4) if j != p] for p in range(4)])


def quantize_ternary(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Sherry storage of a [N, K] weight: ``codes_lo``, ``codes_hi`` and ``scales`` (float16)."""
    rows, cols = weight.shape
    check_shape(rows, cols, group, multiple=32)
    blocks = weight.detach().float().view(rows, cols // 4, 4)
    zero_at = blocks.abs().argmin(-1)                                    # first minimum on ties
    kept = blocks.gather(-1, _kept_positions()[zero_at])                 # [N, K/4, 3]
    magnitude = kept.abs().view(rows, cols // group, group // 4 * 3)
    scale = (magnitude.sum(-1) / (group // 4 * 3)).to(torch.float16)
    negative = (kept < 0).to(torch.uint8)                                # sign(0) counts as +1
    code = zero_at.to(torch.uint8) * 8 + negative[..., 0] + 2 * negative[..., 1] + 4 * negative[..., 2]
    low, high = code & 15, code >> 4
    codes_hi = torch.zeros(rows, cols // 32, dtype=torch.uint8)
    for bit in range(8):
        codes_hi |= high[:, bit::8] << bit
    return {"codes_lo": pack_nibbles(low), "codes_hi": codes_hi, "scales": scale}


def ternary_codes(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 [N, K/4] block codes from the two stored planes."""
    low = unpack_nibbles(stored["codes_lo"])
    high = stored["codes_hi"]
    bits = torch.stack([(high >> bit) & 1 for bit in range(8)], -1).flatten(-2)
    return low | (bits << 4)


def ternary_values(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """int8 [N, K] in {-1, 0, +1}."""
    code = ternary_codes(stored).long()
    rows, blocks = code.shape
    zero_at, negative = code >> 3, code & 7
    signs = 1 - 2 * torch.stack([(negative >> i) & 1 for i in range(3)], -1)   # [N, K/4, 3]
    values = torch.zeros(rows, blocks, 4, dtype=torch.long)
    values.scatter_(-1, _kept_positions()[zero_at], signs)
    return values.view(rows, blocks * 4).to(torch.int8)


def dequantize_ternary(stored: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    return ternary_values(stored).float() * stored["scales"].float().repeat_interleave(group, 1)


# --------------------------------------------------------------------------------------- CPU matmul
def int4pack_supported(out_features: int, in_features: int, group: int) -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and group in INT4PACK_GROUPS
            and in_features % group == 0 and out_features % 16 == 0)


def int4pack_state(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> dict[str, Any]:
    """torch's CPU int4 layout for ``w = (q - 8) * scale + offset`` (q [N, K] in 0..15; scale, offset
    [N, K/g])."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scale.float(), offset.float()], -1).transpose(0, 1).contiguous()
    return {"int4pack": packed, "scales_and_zeros": scales_and_zeros.to(torch.bfloat16), "group": group,
            "out_features": q.shape[0]}


def int4pack_matmul(x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    """``x @ W.T`` through torch's CPU int4 kernel (bfloat16 inside), returned in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, state["int4pack"], state["group"],
                                                     state["scales_and_zeros"])
    return out.to(x.dtype).view(*x.shape[:-1], state["out_features"])


def w4_int4pack_state(stored: dict[str, torch.Tensor], group: int) -> dict[str, Any]:
    scale = stored["scales"].float()
    return int4pack_state(unpack_nibbles(stored["qweight"]), scale, (8 - stored["zeros"].float()) * scale, group)


def ternary_int4pack_state(stored: dict[str, torch.Tensor], group: int) -> dict[str, Any]:
    scale = stored["scales"].float()
    return int4pack_state(ternary_values(stored).long() + 8, scale, torch.zeros_like(scale), group)


def dense_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with the weight in ``x``'s dtype (the fallback and the reference)."""
    return x @ weight.to(x.dtype).T
