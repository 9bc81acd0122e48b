"""Independent float64 replicas of TIES-Merging, TALL masks / Consensus merging, task
arithmetic, and llmgraft's own MWA (metric-weighted averaging).

Written from a reading of the official code, not from llmgraft's kernels/plugins:

* TIES-Merging (Yadav et al., NeurIPS 2023): github.com/prateeky2806/ties-merging
  (the repo the paper links; ``prateeksr/TIES-Merging`` could not be had here) at commit
  44e7891fc84f3de7e4caa52664cd864ca3715e91: ``src/ties_minimal.ipynb`` (``topk_values_mask``,
  ``resolve_zero_signs``, ``resolve_sign``, ``disjoint_merge``, ``ties_merging``, the worked
  example) and ``src/utils/merge_utils.py`` (the same helpers plus ``merge_methods``), README
  (the command lines that give the defaults).
* TALL masks / Consensus merging (Wang et al., ICML 2024): github.com/nik-dim/tall_masks at
  commit d10af8b21383322367fb35474bd9cd0f9ebe9ecf: ``src/utils/tallmask_utils.py``
  (``generate_task_masks``, ``construct_tall_mask``, ``load_tall_mask``,
  ``construct_consensus_mask``), ``src/utils/ties_utils.py``, ``src/utils/utils.py``
  (its own ``topk_values_mask``), ``src/eval/aggregation.py`` (``create_task_vector``: what
  vector each method builds), ``src/eval/eval.py`` / ``eval_utils.py`` (how masks and the
  scaling coefficient are applied), ``config/method/*.yaml`` (defaults), README.

Everything here works on ONE tensor, flattened, in float64.  The official code works on the
whole model flattened into one vector (all state-dict entries, sorted by name, concatenated),
so wherever the official code does a global operation over that vector (the top-k trim, the
"majority sign" fallback) the replica does it over this one tensor instead.

Conventions found in the official code
--------------------------------------
Task vector: tau_i = theta_i - theta_0 (``flat_ft - flat_ptm``).

TIES trim (``topk_values_mask``), per task vector, over all d entries of the tensor:
  * density: the official ``K`` is a percentage when ``K > 1`` (TIES repo; the tall_masks copy
    uses ``K >= 1``, and ``K == 100`` returns the input untouched); ``topk20`` = K 20 = 0.2.
    Here ``density`` is the fraction (0..1].
  * ``n_drop = d - int(d * density)`` (Python float product, truncated), threshold
    ``t = the n_drop-th smallest |tau|`` (torch ``kthvalue``, 1-indexed), keep
    ``|tau| >= t``.  So the official code keeps ``int(d*density) + 1`` entries, one MORE than
    "top density" (d=10, density=0.2 keeps 3), plus every entry tied with the threshold
    magnitude; ``density`` so small that ``int(d*density) == 0`` still keeps the largest
    entry (and its ties).  ``density == 1`` makes ``n_drop = 0``, which ``kthvalue`` rejects
    in the TIES repo; here (as in tall_masks' ``K == 100`` shortcut) it keeps everything.
    Entries that are exactly zero stay zero whether "kept" or not.
Sign election (``resolve_sign``, "mass", the only method in the minimal notebook):
  ``s = sign(sum_i trimmed_i)``; entries where that sum is exactly 0 get the "majority sign"
  ``sign(sum over ALL entries of s)`` (here: of this tensor), which may itself be 0.
Disjoint merge (``disjoint_merge``): keep entry i where ``trimmed_i > 0`` if ``s > 0``, else
  where ``trimmed_i < 0`` (so an entry whose elected sign stayed 0 keeps the NEGATIVE entries
  -- an official quirk, replicated).  Zeros are never kept.  "dis-mean" (TIES default) =
  sum of kept / max(#kept, 1) (0 where nothing is kept); "dis-sum" = sum of kept.
  Result ``theta_0 + lambda * merged``.  Official defaults: topk20 / mass / dis-mean;
  lambda (``scale``) grid ``linear+0.8+2.51+0.1`` = 0.8, 0.9, ..., 2.5 picked on validation
  (the notebook example uses lambda = 1).
Weights (not in the official TIES code): ``w_i`` multiplies the trimmed tau_i before sign
  election and the disjoint mean; the mean still divides by the COUNT of agreeing entries, not
  by the sum of their weights.  Because the trim is per task vector and ranks by magnitude,
  multiplying by a scalar before or after trimming keeps the same entries (exactly, barring
  ties created by rounding), so "before trimming" and "after trimming" are the same thing.

Task arithmetic (TIES notebook ``tv_merging`` and tall_masks method ``sum``):
  ``theta_0 + lambda * sum_i tau_i`` (tall_masks: method.k = 100, i.e. no trim), lambda grid
  0.1, 0.2, ..., 1.0 (tall_masks ``linspace(0, 1, 11)[1:]``; TIES README the same).
  Weights here are an addition: ``sum_i w_i tau_i``.

TALL masks (``generate_task_masks``):
  * multi-task vector tau_MTL = the UNSCALED merged task vector of the base method:
    task arithmetic -> ``sum_t tau_t`` (no trim, no lambda; also the function's default when
    no vector is passed); TIES variant (``use_ties``) -> ``ties_merging(K=20, "dis-sum")``,
    i.e. disjoint SUM (not mean), density 0.2, no lambda.
  * computed from checkpoints, not task vectors: ``theta_MTL = theta_0 + tau_MTL``,
    ``m_t = |theta_0 - theta_t| > lambda_t * |theta_MTL - theta_t|`` (strict ``>``;
    mathematically ``|tau_t| > lambda_t |tau_MTL - tau_t|``; the replica uses the official
    form, which can differ by rounding).  tau_t is the untrimmed task vector.
  * lambda grid ``[0.2, 0.3, 0.4, 0.5, 0.6]`` (no default); each task picks its own lambda_t
    by its own validation accuracy (``find_optimal_mask``).
  * reconstruction of task t: ``theta_0 + 1.0 * (tau_MTL * m_t)`` -- scaling coefficient fixed
    at 1.0, no lambda search.
Consensus merging (``construct_consensus_mask`` + ``create_task_vector``, method consensus):
  * count_j = sum_t m_t[j] over the saved TALL masks (each task at its validation-chosen
    lambda_t), keep ``count >= k`` (``>=``); ``prun_thre_k`` default k = 2 (1 drops only
    "catastrophic" weights, 0 keeps all, > T keeps none).
  * the mask multiplies the UNSCALED merged task vector of the base method, then the usual
    scaling: ``theta_0 + lambda * (tau * mask)``, lambda from 0.1..1.0 on validation.
    task_arithmetic: tau = sum_t tau_t (method.k = 100, no trim);
    ties: tau = ``ties_merging(K=20, "dis-sum")`` -- disjoint SUM with density 0.2 (the
    config's ``ties_agg: "sum"``), NOT the dis-mean of the TIES paper.
  * the TALL masks it counts are the ones the tall_mask run built around the same tau (TA sum,
    or the TIES dis-sum vector when ``use_ties``).  (Official quirk, not replicated: the TIES
    masks are saved as ``..._use_ties_sum.npy`` but loaded as ``..._use_ties.npy``.)

MWA (llmgraft's own, no official code): ``w_i = loss_i ** -p`` (metric "loss") or
  ``step_i ** p`` (metric "step"), divided by their sum; result ``sum_i w_i theta_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "trim_mask", "ties_vector", "ties", "task_arithmetic", "tall_masks", "rebuild",
    "consensus_mask", "consensus", "mwa_weights", "mwa",
]


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _task_vectors(base, inputs) -> tuple[np.ndarray, list[np.ndarray]]:
    b = _f64(base)
    taus = []
    for x in inputs:
        x = _f64(x)
        if x.shape != b.shape:
            raise ValueError(f"shape {x.shape} != base shape {b.shape}")
        taus.append(x - b)
    if not taus:
        raise ValueError("need at least one input")
    return b, taus


def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = _f64(weights).reshape(-1)
    if w.size != n:
        raise ValueError(f"{w.size} weights for {n} inputs")
    return w


def trim_mask(tau: np.ndarray, density: float) -> np.ndarray:
    """Official ``topk_values_mask`` keep-mask of one task vector (whole tensor, flattened).

    Keeps ``|tau| >= t`` with ``t`` the ``(d - int(d*density))``-th smallest magnitude, i.e.
    ``int(d*density) + 1`` entries plus ties; ``density >= 1`` keeps everything.
    """
    tau = _f64(tau)
    density = float(density)
    if not 0.0 <= density <= 1.0:
        raise ValueError("density must be a fraction in [0, 1]")
    d = tau.size
    if d == 0 or density >= 1.0:
        return np.ones(tau.shape, dtype=bool)
    n_drop = d - int(d * density)  # >= 1 because int(d*density) < d here
    mags = np.abs(tau).reshape(-1)
    t = np.partition(mags, n_drop - 1)[n_drop - 1]
    return np.abs(tau) >= t


def ties_vector(base, inputs, density: float, weights=None, agg: str = "mean") -> np.ndarray:
    """Merged (unscaled) TIES task vector: trim, elect sign ("mass"), disjoint mean/sum."""
    b, taus = _task_vectors(base, inputs)
    w = _weights(weights, len(taus))
    trimmed = np.stack([wi * (t * trim_mask(t, density)) for wi, t in zip(w, taus)])
    elected = np.sign(trimmed.sum(axis=0))
    majority = np.sign(elected.sum())
    elected[elected == 0] = majority
    keep = np.where(elected > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    total = selected.sum(axis=0)
    if agg == "sum":
        return total
    if agg == "mean":
        count = (selected != 0).sum(axis=0).astype(np.float64)
        return total / np.maximum(count, 1.0)
    raise ValueError(f"unknown disjoint aggregation {agg!r}")


def ties(base, inputs, density: float, scale: float = 1.0, weights=None,
         agg: str = "mean") -> np.ndarray:
    """TIES-Merging of one tensor: ``theta_0 + scale * ties_vector(...)``."""
    return _f64(base) + float(scale) * ties_vector(base, inputs, density, weights, agg)


def task_arithmetic(base, inputs, scale: float = 1.0, weights=None) -> np.ndarray:
    """``theta_0 + scale * sum_i w_i tau_i``."""
    b, taus = _task_vectors(base, inputs)
    w = _weights(weights, len(taus))
    total = np.zeros_like(b)
    for wi, t in zip(w, taus):
        total = total + wi * t
    return b + float(scale) * total


def _lams(lams, n: int) -> list[float]:
    if np.ndim(lams) == 0:
        return [float(lams)] * n
    out = [float(x) for x in np.asarray(lams, dtype=np.float64).reshape(-1)]
    if len(out) != n:
        raise ValueError(f"{len(out)} lambdas for {n} inputs")
    return out


def tall_masks(base, inputs, lams, total=None) -> list[np.ndarray]:
    """Per-task TALL masks ``|theta_0 - theta_t| > lam_t * |theta_MTL - theta_t|``.

    ``theta_MTL = theta_0 + total``; ``total`` defaults to the task-arithmetic sum
    ``sum_t tau_t`` (unscaled).  ``lams``: one scalar for all tasks or one per task.
    """
    b, taus = _task_vectors(base, inputs)
    if total is None:
        total = np.zeros_like(b)
        for t in taus:
            total = total + t
    total = _f64(total)
    if total.shape != b.shape:
        raise ValueError("total must have the base's shape")
    multi = b + total
    out = []
    for x, lam in zip(inputs, _lams(lams, len(taus))):
        x = _f64(x)
        out.append(np.abs(b - x) > np.abs(multi - x) * lam)
    return out


def rebuild(base, total, mask) -> np.ndarray:
    """Reconstructed task model ``theta_0 + 1.0 * (tau_MTL * mask)``."""
    return _f64(base) + _f64(total) * np.asarray(mask, dtype=bool)


def consensus_mask(masks: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Entries activated in at least ``k`` of the task masks (``sum_t m_t >= k``)."""
    count = np.zeros(np.shape(masks[0]), dtype=np.float64)
    for m in masks:
        count = count + np.asarray(m, dtype=np.float64)
    return count >= k


def consensus(base, inputs, k, lam, scale: float = 1.0, base_method: str = "task_arithmetic",
              density: float = 0.2, ties_agg: str = "sum") -> np.ndarray:
    """Consensus merging: ``theta_0 + scale * (tau * [sum_t m_t >= k])``.

    ``tau``: ``"task_arithmetic"`` -> ``sum_t tau_t``; ``"ties"`` -> the unscaled TIES vector
    with ``density`` and disjoint ``ties_agg`` (official: 0.2 and "sum").  The TALL masks are
    built around that same ``tau`` with ``lam`` (scalar or one per task).  Official k = 2.
    """
    b, taus = _task_vectors(base, inputs)
    if base_method == "task_arithmetic":
        tau = np.zeros_like(b)
        for t in taus:
            tau = tau + t
    elif base_method == "ties":
        tau = ties_vector(base, inputs, density, agg=ties_agg)
    else:
        raise ValueError(f"unknown base_method {base_method!r}")
    keep = consensus_mask(tall_masks(base, inputs, lam, total=tau), k)
    return b + float(scale) * (tau * keep)


def mwa_weights(values, penalty: float, metric: str) -> np.ndarray:
    """Normalised MWA weights: ``loss**-p`` ("loss") or ``step**p`` ("step")."""
    v = _f64(values).reshape(-1)
    p = float(penalty)
    if metric == "loss":
        if np.any(v <= 0):
            raise ValueError("losses must be > 0")
        raw = v ** (-p)
    elif metric == "step":
        if np.any(v < 0):
            raise ValueError("steps must be >= 0")
        raw = v ** p
    else:
        raise ValueError(f"unknown metric {metric!r}")
    s = raw.sum()
    if not np.isfinite(s) or s <= 0:
        raise ValueError("weights do not normalise")
    return raw / s


def mwa(inputs, values, penalty: float, metric: str) -> np.ndarray:
    """``sum_i w_i theta_i`` with :func:`mwa_weights`."""
    w = mwa_weights(values, penalty, metric)
    if len(inputs) != w.size:
        raise ValueError(f"{w.size} values for {len(inputs)} inputs")
    out = np.zeros_like(_f64(inputs[0]))
    for wi, x in zip(w, inputs):
        out = out + wi * _f64(x)
    return out


if __name__ == "__main__":
    rng = np.random.default_rng(0)

    # trim: d=10, density 0.2 keeps int(2)+1 = 3; ties at the threshold are all kept.
    v = np.arange(1.0, 11.0) * np.where(np.arange(10) % 2, -1, 1)
    assert trim_mask(v, 0.2).sum() == 3 and trim_mask(v, 0.2)[-3:].all()
    assert trim_mask(np.array([1.0, 2, 2, 2, 0]), 0.2).sum() == 3
    assert trim_mask(v, 0.0).sum() == 1 and trim_mask(v, 1.0).all()

    # TIES by hand: three tasks, density 1 (no trim).
    base = np.zeros(4)
    ins = [np.array([1.0, -2, 0, 1]), np.array([3.0, 1, 0, -1]), np.array([-1.0, 1, 0, 0])]
    # sums: [3, 0, 0, 0] -> signs [1, 0, 0, 0] -> majority sign(1) = 1 -> all +1
    assert np.allclose(ties_vector(base, ins, 1.0), [2.0, 1.0, 0.0, 1.0])
    assert np.allclose(ties_vector(base, ins, 1.0, agg="sum"), [4.0, 2.0, 0.0, 1.0])
    # all-zero elected sign (majority 0): the negative entries are kept (official quirk).
    assert np.allclose(ties_vector(np.zeros(1), [np.array([1.0]), np.array([-1.0])], 1.0), [-1.0])
    # weights scale trimmed vectors; positive scalar weights before/after trim agree.
    w = [0.5, 2.0, 1.0]
    tw = ties_vector(base, [x * wi for x, wi in zip(ins, w)], 0.5)
    assert np.allclose(tw, ties_vector(base, ins, 0.5, weights=w))

    T, shape = 4, (6, 5)
    base = rng.normal(size=shape)
    ins = [base + rng.normal(scale=0.1, size=shape) for _ in range(T)]
    merged = ties(base, ins, 0.2, scale=0.7)
    assert merged.shape == shape and np.isfinite(merged).all()
    ta = task_arithmetic(base, ins, 0.3, weights=[1, 2, 3, 4])
    assert np.allclose(ta, base + 0.3 * sum((i + 1) * (x - base) for i, x in enumerate(ins)))

    # TALL: single task -> tau_MTL = tau_1, |tau| > 0 everywhere nonzero.
    m1 = tall_masks(base, ins[:1], 0.5)[0]
    assert m1.all()
    masks = tall_masks(base, ins, [0.2, 0.3, 0.4, 0.6])
    total = sum(x - base for x in ins)
    for x, m, lam in zip(ins, masks, [0.2, 0.3, 0.4, 0.6]):
        t = x - base
        near = np.isclose(np.abs(t), lam * np.abs(total - t))
        assert np.array_equal(m[~near], (np.abs(t) > lam * np.abs(total - t))[~near])
        r = rebuild(base, total, m)
        assert np.allclose(r, np.where(m, base + total, base))

    # consensus: k=0 -> task arithmetic / TIES(dis-sum); k > T -> base.
    assert np.allclose(consensus(base, ins, 0, 0.4, 0.5), task_arithmetic(base, ins, 0.5))
    assert np.allclose(consensus(base, ins, T + 1, 0.4, 0.5), base)
    assert np.allclose(consensus(base, ins, 0, 0.4, 0.5, "ties"),
                       ties(base, ins, 0.2, 0.5, agg="sum"))
    c2 = consensus(base, ins, 2, 0.4, 1.0)
    keep = consensus_mask(tall_masks(base, ins, 0.4), 2)
    assert np.allclose(c2, base + total * keep)
    print(f"consensus k=2 lam=0.4 keeps {keep.mean():.2f}; TALL sparsities "
          f"{[round(float(m.mean()), 2) for m in masks]}")

    # MWA
    wl = mwa_weights([1.0, 2.0, 4.0], 1.0, "loss")
    assert np.allclose(wl, np.array([1, 0.5, 0.25]) / 1.75)
    ws = mwa_weights([10, 20], 2.0, "step")
    assert np.allclose(ws, [0.2, 0.8])
    out = mwa(ins[:3], [1.0, 2.0, 4.0], 1.0, "loss")
    assert np.allclose(out, sum(wi * x for wi, x in zip(wl, ins[:3])))
    assert np.allclose(mwa(ins, [3.0] * T, 5.0, "loss"), sum(ins) / T)
    print("ok")
