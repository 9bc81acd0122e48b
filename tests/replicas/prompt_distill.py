"""Independent float64 replicas of the prompt-token selection rules of PromptDistill and
GemFilter, for batch size 1 without padding.

Written from a reading of the official code (not copied, and not from llmgraft's plugins):

* PromptDistill (Jin et al., arXiv 2503.23274): github.com/declare-lab/PromptDistill at
  commit 472bfef, ``models/llama.py`` (``SelectiveAttention.forward`` lines 85-92: the
  selection logits; ``SelectiveLlamaModel.forward`` lines 310-331: pooling and top-k;
  ``models/qwen2.py`` and ``models/phi3.py`` do the same), harness ``longbench/longbench.py``.
* GemFilter (Shi et al., arXiv 2409.17422): github.com/SalesforceAIResearch/GemFilter at
  commit 5f79b1a, ``my_baseline/GemFilter/gem_filter_utils.py`` (``standard_dis_index``,
  ``find_context``) and ``my_utils/my_generation.py`` (``get_layer_context``,
  ``my_greedy_generate_selection``).

Inputs (both methods): ``query_last`` [H, D] is the RoPE'd query of the LAST prompt token
at the selection layer (all H query heads), ``keys`` [Hkv, T, D] the RoPE'd keys of all T
prompt tokens at that layer (before any cache update).  Query head h reads kv head
``h // (H // Hkv)`` (the layout of transformers' ``repeat_kv``).

PromptDistill score (no softmax, no causal mask needed: the query is the last token):
  s_j = mean over the H heads of (q_h . k_{kv(h), j}) / sqrt(D)      (per head /sqrt(D), then mean)
  m_j = s_j for j < T-1, m_{T-1} = 0                                 (the last token is zeroed)
  p_i = (m_{i-2} + m_{i-1} + m_i + m_{i+1} + m_{i+2}) / 5             (avg_pool1d, kernel 5,
        padding 2, stride 1, count_include_pad=True: out-of-range terms are 0, divisor always 5)
  The last token is then pushed to the bottom (official: + finfo(dtype).min; here -inf).
  Keep the top min(k, T-1) of tokens 0..T-2 by p, plus token T-1 (always kept), in
  increasing index order.  So ``k`` is the official ``n_topks[i]``: the count besides the
  last token.

GemFilter score (no 1/sqrt(D), no softmax, SUM over heads, no masking of the last token):
  g_j = sum over the H heads of q_h . k_{kv(h), j}
  p_i = (g_{i-2} + ... + g_{i+2}) / 5                                 (same avg_pool1d)
  Keep the top min(k, T) tokens by p over ALL T tokens, then sort the indices ascending.
  The last token is NOT forced; ``k`` is the official ``topk`` (total count).  GemFilter
  uses only the last query (``query_states[:, :, -1:, :]``), so the signature is the same.

Ties: the official code uses ``torch.topk`` on the GPU in bf16 (PromptDistill) or fp16
(GemFilter), whose order among equal values is unspecified.  Here ties are broken
deterministically: higher score first, then the lower index.  Tests should accept any
selection that differs only among tokens whose score equals the k-th kept score.
"""
import math

import torch


def _as64(x):
    return torch.as_tensor(x).detach().to(torch.float64).cpu()


def _check(query_last, keys):
    q = _as64(query_last)
    kk = _as64(keys)
    assert q.dim() == 2 and kk.dim() == 3, "query_last [H, D], keys [Hkv, T, D]"
    H, D = q.shape
    Hkv, T, D2 = kk.shape
    assert D == D2, "head dims differ"
    assert H % Hkv == 0, "H must be a multiple of Hkv"
    assert T >= 1
    return q, kk, H, Hkv, T, D


def _head_dots(q, kk, H, Hkv, T):
    """[H, T] float64: dots[h, j] = q_h . k_{kv(h), j}."""
    group = H // Hkv
    dots = torch.zeros(H, T, dtype=torch.float64)
    for h in range(H):
        kv = h // group
        for j in range(T):
            dots[h, j] = torch.dot(q[h], kk[kv, j])
    return dots


def _pool5(values):
    """avg_pool1d(kernel_size=5, padding=2, stride=1, count_include_pad=True) on a 1-D row."""
    T = values.shape[0]
    out = torch.zeros(T, dtype=torch.float64)
    for i in range(T):
        total = torch.zeros((), dtype=torch.float64)
        for j in range(i - 2, i + 3):
            if 0 <= j < T:
                total = total + values[j]
        out[i] = total / 5.0
    return out


def _top_indices(scores, candidates, n):
    """The n candidates with the largest score; ties go to the lower index."""
    order = sorted(candidates, key=lambda j: (-float(scores[j]), j))
    return order[:n]


def promptdistill_scores(query_last, keys):
    """[T] float64: the pooled scores PromptDistill ranks by; entry T-1 is -inf (excluded)."""
    q, kk, H, Hkv, T, D = _check(query_last, keys)
    dots = _head_dots(q, kk, H, Hkv, T)
    raw = torch.zeros(T, dtype=torch.float64)
    for j in range(T):
        total = torch.zeros((), dtype=torch.float64)
        for h in range(H):
            total = total + dots[h, j] / math.sqrt(D)
        raw[j] = total / H
    raw[T - 1] = 0.0  # the official code multiplies by (index < prompt_end) before pooling
    pooled = _pool5(raw)
    pooled[T - 1] = float("-inf")
    return pooled


def promptdistill_select(query_last, keys, k):
    """Sorted LongTensor of kept indices: top min(k, T-1) of tokens 0..T-2, plus T-1."""
    assert k >= 0
    scores = promptdistill_scores(query_last, keys)
    T = scores.shape[0]
    chosen = _top_indices(scores, range(T - 1), min(k, T - 1))
    chosen.append(T - 1)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def gemfilter_scores(query_last, keys):
    """[T] float64: GemFilter's pooled head-summed raw dot products (last token included)."""
    q, kk, H, Hkv, T, D = _check(query_last, keys)
    dots = _head_dots(q, kk, H, Hkv, T)
    summed = torch.zeros(T, dtype=torch.float64)
    for j in range(T):
        total = torch.zeros((), dtype=torch.float64)
        for h in range(H):
            total = total + dots[h, j]
        summed[j] = total
    return _pool5(summed)


def gemfilter_select(query_last, keys, k):
    """Sorted LongTensor of the top min(k, T) tokens over all T; the last token is not forced."""
    assert k >= 0
    scores = gemfilter_scores(query_last, keys)
    T = scores.shape[0]
    chosen = _top_indices(scores, range(T), min(k, T))
    return torch.tensor(sorted(chosen), dtype=torch.long)


if __name__ == "__main__":
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    H, Hkv, T, D = 8, 2, 23, 16
    q = torch.randn(H, D, generator=g, dtype=torch.float64)
    kk = torch.randn(Hkv, T, D, generator=g, dtype=torch.float64)

    # Vectorised cross-check (repeat_kv layout, F.avg_pool1d default count_include_pad=True).
    krep = kk.repeat_interleave(H // Hkv, dim=0)                      # [H, T, D]
    dots = torch.einsum("hd,htd->ht", q, krep)
    pd_raw = (dots / math.sqrt(D)).mean(0)
    pd_raw[T - 1] = 0.0
    pd_ref = F.avg_pool1d(pd_raw[None, None], kernel_size=5, padding=2, stride=1)[0, 0]
    pd = promptdistill_scores(q, kk)
    assert torch.allclose(pd[:-1], pd_ref[:-1], rtol=0, atol=1e-12) and pd[-1] == float("-inf")
    gf_ref = F.avg_pool1d(dots.sum(0)[None, None], kernel_size=5, padding=2, stride=1)[0, 0]
    assert torch.allclose(gemfilter_scores(q, kk), gf_ref, rtol=0, atol=1e-12)

    for k in (0, 1, 5, T - 2, T - 1, T, 100):
        sel = promptdistill_select(q, kk, k)
        assert sel[-1] == T - 1 and len(sel) == min(k, T - 1) + 1
        assert torch.equal(sel, sel.sort().values) and len(set(sel.tolist())) == len(sel)
        want = set(torch.topk(pd_ref[:-1], min(k, T - 1)).indices.tolist()) | {T - 1}
        assert set(sel.tolist()) == want
        gsel = gemfilter_select(q, kk, k)
        assert len(gsel) == min(k, T) and torch.equal(gsel, gsel.sort().values)
        assert set(gsel.tolist()) == set(torch.topk(gf_ref, min(k, T)).indices.tolist())

    # Hand case: one head, D=1, so dots are the key values themselves.
    q1 = torch.ones(1, 1, dtype=torch.float64)
    k1 = torch.tensor([[[0.0], [0.0], [0.0], [10.0], [0.0], [0.0], [0.0], [0.0], [50.0]]])
    # PromptDistill zeroes the last token (50) before pooling: peak at 3 spreads to 1..5.
    assert promptdistill_select(q1, k1, 5).tolist() == [1, 2, 3, 4, 5, 8]
    # GemFilter keeps the last token's 50 in the pool: 6, 7, 8 score 10 each, 1..5 score 2.
    assert gemfilter_select(q1, k1, 3).tolist() == [6, 7, 8]
    # Single token prompt.
    assert promptdistill_select(q1, k1[:, :1], 4).tolist() == [0]
    print("prompt_distill replica self-check ok")
