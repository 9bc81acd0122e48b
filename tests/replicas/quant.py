"""Independent float64 replicas of two weight fake-quantizers and of Sherry's 5-bit block code.

Written from a reading of the official code and the definitions below (not from llmgraft's
kernels/plugins), with explicit loops over rows, groups and blocks: slow, meant for small
test shapes such as 16 x 256.

Sherry (Tencent AngelSlim, "Sherry: Hardware-Efficient 1.25-Bit Ternary Quantization via
Fine-grained Sparsification", arXiv 2601.07892).  Official code: github.com/Tencent/AngelSlim,
branch ``sherry`` at commit efbee1bdd8bcf795f089b9e8fd4377d04e023a1c,
``Sherry/models/utils_quant.py`` (``NMQuant.forward``, used by ``Arenas``; defaults from
``Sherry/script/train_llama_1b.sh``: N=3, M=4, per_group, group_size 128), and the same
quantizer on ``main`` at commit 67394ce55f6b6cfae702575fbc3c7a05c13fdd74,
``angelslim/compressor/qat/modules/special_quantizer.py`` (``SherryNMQuant.forward``).
The official forward, for a weight W [out, in] and N=3, M=4:
  * view W as [out, in/4, 4]; ``torch.topk(|w|, 3)`` per block of 4 consecutive input columns;
    the 3 chosen entries are kept, the 4th is set to 0;
  * per_group: reshape the sparse weight to [-1, group] (group consecutive input columns of a
    row; main checks in % group == 0, the sherry branch just reshapes);
  * scale = sum(|sparse w|) over the group / (group / 4 * 3)   (main: max(that divisor, 1));
  * result = torch.sign(sparse w) * scale.
  Training adds ``eps * W`` (Arenas residual, annealed to 0) -- not part of the quantizer.
Conventions of this replica (differences from the official code):
  * ties: the official code leaves the dropped entry among equal |w| to ``torch.topk``, whose
    choice among ties is unspecified (on CPU, torch 2.13, [1,1,1,1] drops index 1 and
    [0,0,1,2] drops index 1, not 0).  Here the FIRST index of the smallest |w| is dropped.
    The scale does not depend on this choice; only which position is zero does.
  * a kept weight that is exactly 0.0 (or -0.0) gives +scale here; official ``torch.sign``
    gives 0.  So every block of 4 has exactly one zero (when its group's scale is nonzero),
    which is what a 5-bit code can represent.
  * float64 throughout; the official code runs in the weight's dtype (bf16/fp32).

The 5-bit code (the paper's "four weights in five bits"; the official repo ships no packer,
the layout is llmgraft's): code = 8 * p + b, p = dropped position 0..3, bit i of b set when the
i-th kept weight (in position order) is negative (w < 0; 0.0 and -0.0 count as positive).

W4 (llmgraft's definition of group-wise asymmetric int4 fake quantization), per group of
``group`` consecutive input columns of a row:
  low = min(min w, 0), high = max(max w, 0), scale = fp16((high - low) / 15) used as float64
  (the division is done in float64, then rounded once to float16); if that scale is 0 use 1;
  zero = clamp(round(-low / scale), 0, 15); q = clamp(round(w / scale) + zero, 0, 15);
  result = (q - zero) * scale.  round = round half to even (torch.round).
"""
import torch


def _as64(weight):
    w = torch.as_tensor(weight).detach().to(torch.float64).cpu()
    assert w.dim() == 2, "weight must be [out, in]"
    return w


def _check_shape(w, group):
    N, K = w.shape
    assert K % 4 == 0, "in features must be a multiple of 4"
    assert group > 0 and K % group == 0, "in features must be a multiple of group"
    return N, K


def _dropped_position(block):
    """Index (0..3) of the smallest |w| in a block of 4; the first one on ties."""
    best = 0
    for i in range(1, 4):
        if abs(float(block[i])) < abs(float(block[best])):
            best = i
    return best


def sherry_quantize(weight, group=128):
    """Sherry 3:4 ternary fake quantization, float64 [N, K] (see module docstring)."""
    w = _as64(weight)
    N, K = _check_shape(w, group)
    keep = torch.ones(N, K, dtype=torch.bool)
    for r in range(N):
        for b in range(K // 4):
            keep[r, 4 * b + _dropped_position(w[r, 4 * b:4 * b + 4])] = False
    out = torch.zeros(N, K, dtype=torch.float64)
    denom = group * 3 / 4
    for r in range(N):
        for g0 in range(0, K, group):
            total = 0.0
            for c in range(g0, g0 + group):
                if keep[r, c]:
                    total += abs(float(w[r, c]))
            scale = total / denom
            for c in range(g0, g0 + group):
                if keep[r, c]:
                    sign = -1.0 if float(w[r, c]) < 0 else 1.0   # 0.0 counts as +1 (deliberate)
                    out[r, c] = sign * scale
    return out


def packed_sherry_codes(weight, group=128):
    """5-bit code 8 * p + b per block of 4, LongTensor [N, K/4] (see module docstring).

    ``group`` only checks the shape: the code does not depend on the scale.
    """
    w = _as64(weight)
    N, K = _check_shape(w, group)
    codes = torch.zeros(N, K // 4, dtype=torch.long)
    for r in range(N):
        for b in range(K // 4):
            block = w[r, 4 * b:4 * b + 4]
            p = _dropped_position(block)
            bits, i = 0, 0
            for pos in range(4):
                if pos == p:
                    continue
                if float(block[pos]) < 0:
                    bits |= 1 << i
                i += 1
            codes[r, b] = 8 * p + bits
    return codes


def decode_sherry_codes(codes):
    """Inverse of the code layout: signs [N, 4 * n_blocks] in {-1, 0, +1} (float64)."""
    codes = torch.as_tensor(codes).long()
    N, B = codes.shape
    signs = torch.zeros(N, 4 * B, dtype=torch.float64)
    for r in range(N):
        for b in range(B):
            code = int(codes[r, b])
            assert 0 <= code < 32, f"code {code} out of range"
            p, bits, i = code // 8, code % 8, 0
            for pos in range(4):
                if pos == p:
                    continue
                signs[r, 4 * b + pos] = -1.0 if (bits >> i) & 1 else 1.0
                i += 1
    return signs


def w4_quantize(weight, group=128):
    """Group-wise asymmetric int4 fake quantization, float64 [N, K] (see module docstring)."""
    w = _as64(weight)
    N, K = w.shape
    assert group > 0 and K % group == 0, "in features must be a multiple of group"
    out = torch.zeros(N, K, dtype=torch.float64)
    for r in range(N):
        for g0 in range(0, K, group):
            vals = w[r, g0:g0 + group]
            low = min(float(vals.min()), 0.0)
            high = max(float(vals.max()), 0.0)
            scale = float(torch.tensor((high - low) / 15, dtype=torch.float64).to(torch.float16))
            if scale == 0.0:
                scale = 1.0
            zero = float(torch.round(torch.tensor(-low / scale, dtype=torch.float64)))
            zero = min(max(zero, 0.0), 15.0)
            for c in range(g0, g0 + group):
                q = float(torch.round(torch.tensor(float(w[r, c]) / scale, dtype=torch.float64)))
                q = min(max(q + zero, 0.0), 15.0)
                out[r, c] = (q - zero) * scale
    return out


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    N, K, G = 16, 256, 128
    W = torch.randn(N, K, generator=g, dtype=torch.float64)

    # --- Sherry: against the official NMQuant formula (vectorised, no ties in randn data).
    S = sherry_quantize(W, G)
    wb = W.reshape(N, K // 4, 4)
    _, top = torch.topk(wb.abs(), 3, dim=-1)
    mask = torch.zeros_like(wb, dtype=torch.bool).scatter_(-1, top, True)
    x = (wb * mask).reshape(-1, G)
    official = (torch.sign(x) * x.abs().sum(-1, keepdim=True) / (x.shape[-1] / 4 * 3)).reshape(N, K)
    assert torch.allclose(S, official, rtol=1e-12, atol=0)
    # exactly one zero per block; the zero sits on the smallest |w|; signs follow w.
    Sb = S.reshape(N, K // 4, 4)
    assert ((Sb == 0).sum(-1) == 1).all()
    assert torch.equal((Sb == 0).float().argmax(-1), wb.abs().argmin(-1))
    assert torch.equal(torch.sign(S)[S != 0], torch.sign(W)[S != 0])
    # one magnitude per group = mean |w| of the 96 kept weights.
    for r in range(N):
        for g0 in range(0, K, G):
            mags = S[r, g0:g0 + G].abs()
            assert torch.allclose(mags[mags > 0], mags.max().expand((mags > 0).sum()))

    # codes decode back to the quantized signs.
    C = packed_sherry_codes(W, G)
    assert C.shape == (N, K // 4) and C.dtype == torch.long and C.min() >= 0 and C.max() < 32
    assert torch.equal(decode_sherry_codes(C), torch.sign(S))

    # hand-made block: ties drop the first smallest; kept 0.0 counts as +1 (official: 0).
    w = torch.tensor([[0.0, 0.0, -2.0, 1.0], [3.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    s = sherry_quantize(w, 4)
    assert torch.equal(s[0], torch.tensor([0.0, 1.0, -1.0, 1.0]) * (3.0 / 3))
    assert torch.equal(s[1], torch.tensor([1.0, 0.0, -1.0, 1.0]) * (6.0 / 3))
    assert packed_sherry_codes(w, 4).tolist() == [[8 * 0 + 0b010], [8 * 1 + 0b010]]
    assert torch.equal(decode_sherry_codes(packed_sherry_codes(w, 4)), torch.sign(s))
    # an all-zero group: scale 0, result all zeros, code 0 (position 0, all "positive").
    z = torch.zeros(2, 8, dtype=torch.float64)
    assert torch.equal(sherry_quantize(z, 8), z) and packed_sherry_codes(z, 8).eq(0).all()

    # --- W4: against a vectorised version of the same definition.
    Q = w4_quantize(W, G)
    xg = W.reshape(-1, G)
    lo = xg.min(-1, keepdim=True).values.clamp(max=0)
    hi = xg.max(-1, keepdim=True).values.clamp(min=0)
    sc = ((hi - lo) / 15).half().double()
    sc = torch.where(sc == 0, torch.ones_like(sc), sc)
    zp = torch.round(-lo / sc).clamp(0, 15)
    ref = ((torch.round(xg / sc) + zp).clamp(0, 15) - zp) * sc
    assert torch.equal(Q, ref.reshape(N, K))
    # on the grid: at most 16 levels per group, error <= scale/2 inside the clamp range.
    for r in range(N):
        for gi, g0 in enumerate(range(0, K, G)):
            k = r * (K // G) + gi
            assert Q[r, g0:g0 + G].unique().numel() <= 16
            err = (Q[r, g0:g0 + G] - W[r, g0:g0 + G]).abs()
            inside = (W[r, g0:g0 + G] >= (0 - zp[k]) * sc[k]) & (W[r, g0:g0 + G] <= (15 - zp[k]) * sc[k])
            assert (err[inside] <= sc[k] / 2 + 1e-12).all()
    # zero weights stay exactly zero; a constant group keeps its value up to fp16 scale rounding.
    assert torch.equal(w4_quantize(torch.zeros(2, 8), 8), torch.zeros(2, 8, dtype=torch.float64))
    c = w4_quantize(torch.full((1, 8), -0.3), 8)
    assert torch.allclose(c, torch.full((1, 8), -0.3, dtype=torch.float64), atol=1e-3)
    # round half to even: group [0, 1.5, 15] -> scale 1, zero 0, 1.5 -> 2 and 2.5 -> 2.
    h = w4_quantize(torch.tensor([[0.0, 1.5, 2.5, 15.0]]), 4)
    assert h.tolist() == [[0.0, 2.0, 2.0, 15.0]]

    rel = ((S - W).norm() / W.norm()).item(), ((Q - W).norm() / W.norm()).item()
    print(f"ok: sherry rel err {rel[0]:.3f}, w4 rel err {rel[1]:.3f}")
