"""Independent float64 replica of Top-W truncation (arXiv 2602.10346).

Written from a reading of the official ``logit_processor_w1.py`` in
github.com/arashgholami/top-w-decoding (commit 5949bfae5e6a81bc279c65923f1adc1c9f2e2059;
the file has not changed since af635d10), not from llmgraft's plugins/kernels.  One row
at a time, plain numpy, float64 everywhere (the official code keeps embeddings and
cosines in float32; that only matters for near-ties).

Input: ``logits_row`` = logits already divided by the selection temperature (the
official processor computes ``softmax(logits / T_sel)`` itself and hands back the
*undivided* logits of the kept tokens, -inf elsewhere, without renormalising; the
sampler's own temperature/softmax then renormalises over the kept set).

Algorithm (same order of operations as the official code):
  1. Embedding standardisation over the whole [V, d] matrix: per-dimension mean and
     biased variance (ddof=0), variance clipped at >= 1e-6, ``(e - mean) / sqrt(var)``.
  2. ``p = softmax(logits)``; pool I = the ``M = min(top_m, V)`` most probable ids,
     sorted by p descending.  p_I is NOT renormalised.  Only the pool rows are
     standardised and L2-normalised (norm clipped at >= 1e-12).
  3. Warm start: S = the shortest p-descending prefix of I whose cumulative mass is
     >= ``init_top_p * sum(p_I)`` (clamped to 1..M).
  4. Up to ``alt_iters`` passes:
       f_i   = -(1 - max_{j in S} clip(cos(e_i, e_j), -1, 1))   (i in S gives f_i = 0)
       phi_i = geom_scale * f_i + lam * log(max(p_i, 1e-12))
       order I by phi descending; Gamma_k = cumsum p, V_k = cumsum p*phi;
       score_k = V_k / max(Gamma_k, 1e-12) + (beta - lam) * log(max(Gamma_k, 1e-12));
       S_new = first k* = argmax(score) (first maximiser) ids of that order;
       stop as soon as S_new == S (as a set).
     This maximises E_q[phi] + (beta - lam) log Gamma, i.e. minimises the surrogate of
     F(S) = W1(p, q_S) + lam H(q_S) - beta log Gamma_S.
  5. Kept ids = I[S]; S is always a subset of the top-m pool.

``potential="matching"`` is the official ``_distance_matching_potential``, which the
official code defines but never calls (there is no kNN potential in the file):
chordal distances D_ij = sqrt(max(2 - 2 clip(cos_ij, -1, 1), 0)) (D_ii = 0) over the
pool; gamma = clip(sum_S p, 1e-12, 1 - 1e-12); a = p/gamma on S, b = p/clip(1-gamma,
1e-12, 1) off S; g = D b - D a; f_i = min_j (g_j + D_ij); f = 0 if S is empty or the
whole pool.  Used as phi's f directly (no sign flip).

Differences from the official code, all deliberate:
  * Ties (equal p, equal phi) are broken by the lower index via stable sorts; the
    official code uses argpartition / default quicksort argsort (implementation-
    defined tie order).
  * Zero-probability tokens (-inf logits, or exp underflow to exactly 0) are left out
    of the pool, so they can never be kept.  In the official code they can enter the
    pool when fewer than top_m tokens have p > 0, but add nothing to Gamma or V_k, so
    the first argmax never ends on one; they could only be kept if a positive-p token
    ranked below them in phi were kept, which needs p < ~1e-12 tokens to be kept.
  * A row with no finite maximum (all -inf, NaN, +inf) raises ValueError (the
    official code would produce NaNs).
"""
import numpy as np

EPS = 1e-12


def standardise(embeddings):
    """Per-dimension mean/biased-variance standardisation over all V rows (float64)."""
    E = np.asarray(embeddings, dtype=np.float64)
    mean = E.mean(axis=0)
    var = np.mean((E - mean) ** 2, axis=0)
    return (E - mean) / np.sqrt(np.clip(var, 1e-6, None))


def _nearest_potential(U, S):
    cos = np.clip(U @ U[S].T, -1.0, 1.0)
    return -(1.0 - cos.max(axis=1))


def _matching_potential(U, p, S):
    M = p.size
    if S.size == 0 or S.size >= M:
        return np.zeros(M)
    D = np.sqrt(np.maximum(2.0 - 2.0 * np.clip(U @ U.T, -1.0, 1.0), 0.0))
    np.fill_diagonal(D, 0.0)
    gamma = float(np.clip(p[S].sum(), EPS, 1.0 - EPS))
    inS = np.zeros(M, dtype=bool)
    inS[S] = True
    a = np.where(inS, p / gamma, 0.0)
    b = np.where(inS, 0.0, p / float(np.clip(1.0 - gamma, EPS, 1.0)))
    g = D @ b - D @ a
    return np.min(g[None, :] + D, axis=1)


def _prefix_scan(p, f, lam, beta, geom_scale):
    phi = geom_scale * f + lam * np.log(np.clip(p, EPS, 1.0))
    order = np.argsort(-phi, kind="stable")
    mass = np.maximum(np.cumsum(p[order]), EPS)
    score = np.cumsum(p[order] * phi[order]) / mass + (beta - lam) * np.log(mass)
    return np.sort(order[: int(np.argmax(score)) + 1])


def top_w_iterations(logits_row, embeddings, *, lam=2.2, beta=2.8, geom_scale=0.6,
                     top_m=1200, init_top_p=0.999, alt_iters=9, potential="nearest"):
    """Return (kept ids sorted, passes run, converged, warm-start size k0)."""
    x = np.asarray(logits_row, dtype=np.float64).reshape(-1)
    mx = np.max(x)
    if not np.isfinite(mx) or np.isnan(x).any():
        raise ValueError("logits row needs a finite maximum and no NaN")
    e = np.exp(x - mx)
    p = e / e.sum()

    order = np.argsort(-p, kind="stable")
    M = max(1, min(int(top_m), int(np.count_nonzero(p > 0))))
    I = order[:M]
    pI = p[I]

    U = standardise(embeddings)[I]
    U = U / np.linalg.norm(U, axis=1, keepdims=True).clip(EPS)

    target = float(np.clip(init_top_p, 0.0, 1.0)) * float(pI.sum())
    k0 = int(np.searchsorted(np.cumsum(pI), target, side="left")) + 1
    k0 = max(1, min(k0, M))
    S = np.arange(k0)

    n, converged = 0, False
    for n in range(1, max(1, int(alt_iters)) + 1):
        if potential == "nearest":
            f = _nearest_potential(U, S)
        elif potential == "matching":
            f = _matching_potential(U, pI, S)
        else:
            raise ValueError(f"unknown potential {potential!r}")
        new_S = _prefix_scan(pI, f, lam, beta, geom_scale)
        converged = np.array_equal(new_S, S)
        S = new_S
        if converged:
            break
    return np.sort(I[S]), n, converged, k0


def top_w_keep(logits_row, embeddings, *, lam=2.2, beta=2.8, geom_scale=0.6, top_m=1200,
               init_top_p=0.999, alt_iters=9, potential="nearest"):
    """Sorted vocabulary ids kept by Top-W for one row of temperature-scaled logits."""
    return top_w_iterations(logits_row, embeddings, lam=lam, beta=beta,
                            geom_scale=geom_scale, top_m=top_m, init_top_p=init_top_p,
                            alt_iters=alt_iters, potential=potential)[0]


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    V, d = 500, 16
    E = rng.normal(size=(V, d)) * rng.uniform(0.1, 3.0, size=d) + rng.normal(size=d)
    for scale in (0.5, 2.0, 5.0):
        row = rng.normal(size=V) * scale
        row[rng.choice(V, 20, replace=False)] = -np.inf
        for pot in ("nearest", "matching"):
            kept, n, conv, k0 = top_w_iterations(row, E, top_m=200, potential=pot)
            assert kept.size >= 1 and np.isfinite(row[kept]).all()
            assert np.array_equal(kept, np.unique(kept))
            print(f"scale={scale} {pot:8s} warm={k0:3d} kept={kept.size:3d} "
                  f"passes={n} converged={conv} top1_kept={int(np.argmax(row)) in kept}")
    one_hot = np.full(V, -np.inf)
    one_hot[7] = 0.0
    assert top_w_keep(one_hot, E).tolist() == [7]
    print("ok")
