"""Benchmark baseline: numpy re-implementation of the official Top-W logits processor.

Source mirrored: github.com/arashgholami/top-w-decoding, ``logit_processor_w1.py``
(commit 5949bfae5e6a81bc279c65923f1adc1c9f2e2059), class ``TopW_LogitsProcessor``.

This module exists only so benchmarks can time llmgraft's batched torch Top-W kernel
against what the authors' own code costs.  It is written anew (not copied) but keeps the
official structure and numerics, with no extra optimisations and no handicaps:

* constructor: embeddings cast to float32 once; per-dimension mean and biased variance
  (float32, variance clipped at >= 1e-6) -> ``mean`` and ``scale = 1/sqrt(var)``;
* per call, one row at a time:
    - float64 softmax of ``logits / T`` (with the official overflow fallback);
    - pool: ``argpartition`` of ``-p`` for the top ``M = min(top_m, V)``, then ``argsort``
      of the pool by ``-p`` (default quicksort, as the official code);
    - the pool's embedding rows are standardised and L2-normalised *on every call*, in
      float32 (norm clipped at >= 1e-12);
    - warm start: shortest p-descending prefix reaching ``init_top_p * sum(p_pool)``;
    - up to ``alt_iters`` passes: nearest-set cosine distance computed in float32 with
      the official row chunking (``geom_chunk`` = 4096 rows per block), then the
      float64 prefix scan over ``phi = geom_scale * f + lam * log p`` sorted descending,
      stopping early when the chosen set does not change;
    - output: float64 array of -inf with the kept tokens' original (undivided) logits,
      cast back to the input dtype (the official code hands back
      ``torch.tensor(masked, dtype=scores.dtype)``).
* a batch is B sequential single-row calls (the official processor refuses
  batch_size != 1).

Left out, as they are not part of the algorithm: the torch <-> numpy transfers of the
``LogitsProcessor`` wrapper and its debug printing (on by default for the first three
calls in the official code), and the defined-but-unused ``_distance_matching_potential``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OfficialTopW"]

_EPS = 1e-12


def _softmax64(x: np.ndarray) -> np.ndarray:
    # float64 softmax with the official fallback for an underflowing / non-finite sum.
    z = np.asarray(x, dtype=np.float64)
    z = z - np.max(z)
    w = np.exp(z)
    total = np.sum(w)
    if total == 0.0 or not np.isfinite(total):
        w = np.exp(np.clip(z, -80, 80))
        total = np.sum(w) + 1e-12
    return (w / total).astype(np.float64, copy=False)


def _set_cosine_distance(U: np.ndarray, S: np.ndarray, chunk: int) -> np.ndarray:
    # For each pool row: 1 - max cosine to the rows in S, float32 matmul per chunk of rows,
    # accumulated into a float64 running minimum (as the official helper does).
    n = U.shape[0]
    if S.size == 0:
        return np.zeros(n, dtype=float)
    best = np.full(n, np.inf, dtype=float)
    anchors = U[S].astype(np.float32, copy=False)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        rows = U[lo:hi].astype(np.float32, copy=False)
        cos = rows @ anchors.T
        np.clip(cos, -1.0, 1.0, out=cos)
        dist = 1.0 - np.max(cos, axis=1)
        best[lo:hi] = np.minimum(best[lo:hi], dist)
    return best


def _prefix_choice(p: np.ndarray, f: np.ndarray, lam: float, beta: float,
                   geom_scale: float) -> np.ndarray:
    # Best phi-descending prefix under mean(phi) + (beta - lam) * log(mass); sorted local ids.
    p = np.asarray(p, dtype=float)
    f = np.asarray(f, dtype=float)
    phi = geom_scale * f + lam * np.log(np.clip(p, _EPS, 1.0))
    rank = np.argsort(-phi)
    ps = p[rank]
    phis = phi[rank]
    mass = np.maximum(np.cumsum(ps), _EPS)
    weighted = np.cumsum(ps * phis)
    objective = weighted / mass + (beta - lam) * np.log(mass)
    k = int(np.argmax(objective)) + 1
    return np.sort(rank[:k])


class OfficialTopW:
    """Single-row Top-W truncation with the official code's per-call cost profile."""

    def __init__(self, embeddings: np.ndarray, lam: float = 2.2, beta: float = 2.8,
                 geom_scale: float = 0.6, top_m: int = 1200, init_top_p: float = 0.999,
                 alt_iters: int = 9, geom_chunk: int = 4096):
        E = np.asarray(embeddings)
        if E.ndim != 2:
            raise ValueError(f"embeddings must be [V, d], got shape {E.shape}")
        E = E.astype(np.float32, copy=False)
        self.embeddings = E
        mu = E.mean(axis=0, keepdims=True).astype(np.float32, copy=False)
        dev = E - mu
        var = np.mean(dev ** 2, axis=0, keepdims=True).astype(np.float32, copy=False)
        self._mean = mu
        self._scale = (1.0 / np.sqrt(np.clip(var, 1e-6, None))).astype(np.float32, copy=False)

        if int(top_m) < 1:
            raise ValueError("top_m must be >= 1")
        if not (0.0 < init_top_p <= 1.0):
            raise ValueError("init_top_p must be in (0, 1]")
        if int(alt_iters) < 1:
            raise ValueError("alt_iters must be >= 1")
        if int(geom_chunk) < 1:
            raise ValueError("geom_chunk must be >= 1")
        self.lam = float(lam)
        self.beta = float(beta)
        self.geom_scale = float(geom_scale)
        self.top_m = int(top_m)
        self.init_top_p = float(init_top_p)
        self.alt_iters = int(alt_iters)
        self.geom_chunk = int(geom_chunk)

    def __call__(self, logits_row: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        out_dtype = np.asarray(logits_row).dtype
        x = np.asarray(logits_row, dtype=np.float64)
        V = x.shape[0]
        T = float(max(temperature, _EPS))

        p = _softmax64(x / T)

        M = int(min(max(1, self.top_m), V))
        pool = np.argpartition(-p, M - 1)[:M]
        pool = pool[np.argsort(-p[pool])]
        p_pool = p[pool].astype(np.float64, copy=False)

        U = self.embeddings[pool].astype(np.float32, copy=False)
        U = (U - self._mean) * self._scale
        nrm = np.linalg.norm(U, axis=1, keepdims=True).clip(1e-12)
        U = (U / nrm).astype(np.float32, copy=False)

        goal = float(np.clip(self.init_top_p, 0.0, 1.0)) * float(np.sum(p_pool))
        k0 = int(np.searchsorted(np.cumsum(p_pool), goal, side="left")) + 1
        k0 = max(1, min(k0, M))
        S = np.arange(k0, dtype=int)

        for _ in range(max(1, self.alt_iters)):
            f = -_set_cosine_distance(U, S, self.geom_chunk)
            S_next = _prefix_choice(p_pool, f, self.lam, self.beta, self.geom_scale)
            same = S_next.size == S.size and np.array_equal(S_next, S)
            S = S_next
            if same:
                break

        kept = pool[S]
        out = np.full_like(x, -np.inf, dtype=np.float64)
        out[kept] = x[kept]
        return out.astype(out_dtype, copy=False)

    def run_batch(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """B sequential single-row calls, stacked into [B, V]."""
        L = np.asarray(logits)
        if L.ndim != 2:
            raise ValueError(f"logits must be [B, V], got shape {L.shape}")
        return np.stack([self(L[b], temperature) for b in range(L.shape[0])], axis=0)
