"""Triton matmuls for the stored formats of ``kernels/quant.py``: the weight tile is unpacked in registers
(W4A16: a nibble, its group's scale and zero point; ternary: a 5-bit block code from two planes, and its
group's scale), so the weight is read once, in its packed size and never dequantized to global memory;
tiled, with the tile shape autotuned per problem size. For GPUs; on the CPU they run only under
``TRITON_INTERPRET=1`` (set before this module is imported), which the tests use on small shapes, with a
wall-clock timer standing in for the autotuner's CUDA one. Not yet the default on GPUs (``prepare`` picks
them only with ``LLMGRAFT_TRITON_QUANT=1``) until GPU figures are measured.
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

#: Tile shapes tried by the autotuner (decode-sized M first); keyed on the problem size.
CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
           for m, n, k, w in ((16, 64, 64, 4), (16, 128, 128, 4), (32, 128, 64, 4), (64, 128, 64, 8))]


def _cpu_bench(kernel_call, quantiles=None, **_):
    """The autotuner's timer under TRITON_INTERPRET=1 (its default needs CUDA events): wall time in ms."""
    start = time.perf_counter()
    kernel_call()
    elapsed = (time.perf_counter() - start) * 1e3
    return [elapsed] * len(quantiles) if quantiles else elapsed


def _autotuned(kernel):
    interpreted = not torch.cuda.is_available()
    return triton.autotune(configs=CONFIGS, key=["M", "N", "K"], do_bench=_cpu_bench if interpreted else None)(kernel)


@triton.jit
def _x_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk):
    """The activations' [BLOCK_M, BLOCK_K] tile, zero outside the matrix."""
    return tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                   mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_tile(out_ptr, acc, rm, rn, M, N, stride_om, stride_on):
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc,
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _w4_matmul(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, GROUP,
               stride_xm, stride_xk, stride_qn, stride_sn, stride_om, stride_on,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = _x_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk)
        tile = (rn < N)[None, :] & (rk < K)[:, None]                               # [BLOCK_K, BLOCK_N]
        byte = tl.load(qweight_ptr + rn[None, :] * stride_qn + (rk // 2)[:, None], mask=tile, other=0)
        q = ((byte.to(tl.int32) >> ((rk % 2) * 4)[:, None]) & 15).to(tl.float32)
        group = (rk // GROUP)[:, None]
        scale = tl.load(scales_ptr + rn[None, :] * stride_sn + group, mask=tile, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + rn[None, :] * stride_sn + group, mask=tile, other=0).to(tl.float32)
        weight = (q - zero) * scale
        acc += tl.dot(x, weight)
    _store_tile(out_ptr, acc, rm, rn, M, N, stride_om, stride_on)


@triton.jit
def _ternary_matmul(x_ptr, lo_ptr, hi_ptr, scales_ptr, out_ptr, M, N, K, GROUP,
                    stride_xm, stride_xk, stride_lo, stride_hi, stride_sn, stride_om, stride_on,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = _x_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk)
        tile = (rn < N)[None, :] & (rk < K)[:, None]
        block = rk // 4
        low = tl.load(lo_ptr + rn[None, :] * stride_lo + (block // 2)[:, None], mask=tile, other=0).to(tl.int32)
        high = tl.load(hi_ptr + rn[None, :] * stride_hi + (block // 8)[:, None], mask=tile, other=0).to(tl.int32)
        code = ((low >> ((block % 2) * 4)[:, None]) & 15) | (((high >> (block % 8)[:, None]) & 1) << 4)
        zero_at = code >> 3
        position = (rk % 4)[:, None]
        kept = position - (position > zero_at).to(tl.int32)                       # index among the kept three
        negative = ((code & 7) >> kept) & 1
        value = tl.where(position == zero_at, 0.0, 1.0 - 2.0 * negative.to(tl.float32))
        scale = tl.load(scales_ptr + rn[None, :] * stride_sn + (rk // GROUP)[:, None], mask=tile,
                        other=0.0).to(tl.float32)
        acc += tl.dot(x, value * scale)
    _store_tile(out_ptr, acc, rm, rn, M, N, stride_om, stride_on)


_TUNED = {}


def _launch(kernel, x: torch.Tensor, out_features: int, group: int, planes: list[torch.Tensor],
            strides: list[int], blocks: tuple[int, int, int] | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    rows, cols = flat.shape
    out = torch.empty(rows, out_features, dtype=torch.float32, device=x.device)
    args = (flat, *planes, out, rows, out_features, cols, group, flat.stride(0), flat.stride(1), *strides,
            out.stride(0), out.stride(1))
    if blocks is None:  # the autotuner picks the tile shape, once per problem size
        tuned = _TUNED.setdefault(kernel, _autotuned(kernel))
        tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"]))](*args)
    else:
        block_m, block_n, block_k = blocks
        grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
        kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.to(x.dtype).view(*x.shape[:-1], out_features)


def w4_matmul(x: torch.Tensor, stored: dict[str, torch.Tensor], group: int,
              blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x @ W.T`` for W4A16 tensors (``qweight``, ``scales``, ``zeros``, contiguous)."""
    qweight, scales, zeros = (stored[n].contiguous() for n in ("qweight", "scales", "zeros"))
    return _launch(_w4_matmul, x, qweight.shape[0], group, [qweight, scales, zeros],
                   [qweight.stride(0), scales.stride(0)], blocks)


def ternary_matmul(x: torch.Tensor, stored: dict[str, torch.Tensor], group: int,
                   blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x @ W.T`` for Sherry tensors (``codes_lo``, ``codes_hi``, ``scales``, contiguous)."""
    planes = [stored[n].contiguous() for n in ("codes_lo", "codes_hi", "scales")]
    return _launch(_ternary_matmul, x, planes[0].shape[0], group, planes, [p.stride(0) for p in planes], blocks)
