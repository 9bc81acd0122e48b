"""Independent float64 replica of two Top-H truncation rules (arXiv 2509.02510).

Written from the rule definitions only (not from llmgraft's kernels/plugins), one row
at a time in plain numpy float64.  Each rule returns ``(order, k_min, k_max)``: the
top-N token ids by descending logit (stable sort) and the kept count when every
comparison ``a <= b`` is evaluated strictly (``a <= b - 1e-5*|b|``) or loosely
(``a <= b + 1e-5*|b|``).  ``check_kept`` accepts a kept set iff its size lies in
``[k_min, k_max]``, it is a top-k set by logit value and it has no p == 0 token
beyond the first.
"""
import numpy as np

RTOL = 1e-5


def _prep(row, top_n):
    x = np.asarray(row, dtype=np.float64).reshape(-1)
    m = x.max()
    assert np.isfinite(m), "row needs at least one finite logit"
    logp = x - (m + np.log(np.sum(np.exp(x - m))))
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):                # 0 * -inf for -inf logits
        h = np.where(p > 0, -p * logp, 0.0)            # -p log p, 0 where p == 0
    order = np.argsort(-x, kind="stable")[: min(int(top_n), x.size)]
    cap = max(1, int(np.count_nonzero(p[order] > 0)))  # zero-p tokens form a suffix
    return logp, p, h, order, cap


def _le(a, b, sign):
    return a <= b + sign * RTOL * np.abs(b)


def reference_bounds(row, alpha, top_n=100):
    """Official code: S_k = cumsum of -p log p over sorted top-N; keep #{S_k <= alpha*S_N}."""
    _, _, h, order, cap = _prep(row, top_n)
    s = np.cumsum(h[order])
    tau = alpha * s[-1]
    ks = [max(1, min(cap, int(np.count_nonzero(_le(s, tau, sg))))) for sg in (-1, 1)]
    return [int(i) for i in order], ks[0], ks[1]


def paper_bounds(row, alpha, top_n=100):
    """Paper bound: grow prefix while H(q_k) <= alpha * H(p), q_k = p renormalised on prefix."""
    logp, p, h, order, cap = _prep(row, top_n)
    bound = alpha * h.sum()
    lz = np.logaddexp.accumulate(logp[order])           # log sum_{j<=k} p_j, stable
    # H(q_k) = -sum q_i log q_i with log q_i = logp_i - lz_k  ==  lz_k + S_k / Z_k
    hq = lz + np.cumsum(h[order]) * np.exp(-lz)
    ks = []
    for sg in (-1, 1):
        ok = _le(hq[1:cap], bound, sg)                   # candidate k = 2..cap
        ks.append(1 + (int(np.argmin(ok)) if not ok.all() else ok.size))
    return [int(i) for i in order], ks[0], ks[1]


def check_kept(row, kept_ids, bounds):
    """None if kept_ids is an acceptable kept set for ``bounds``, else a reason."""
    x = np.asarray(row, dtype=np.float64).reshape(-1)
    _, k_min, k_max = bounds
    kept = np.array(sorted(int(i) for i in kept_ids), dtype=np.int64)
    k = kept.size
    if k == 0 or kept.min() < 0 or kept.max() >= x.size:
        return f"kept ids empty or out of range: {kept.tolist()[:10]}"
    if not k_min <= k <= k_max:
        return f"kept {k} tokens, expected between {k_min} and {k_max}"
    mask = np.zeros(x.size, dtype=bool)
    mask[kept] = True
    if (~mask).any() and x[mask].min() < x[~mask].max():
        return (f"not a top-{k} set: min kept logit {x[mask].min()!r} < "
                f"max dropped logit {x[~mask].max()!r}")
    logp, p, *_ = _prep(x, 1)
    if k > 1 and (p[kept] == 0).any():
        return f"kept {(p[kept] == 0).sum()} zero-probability token(s) among {k}"
    return None
