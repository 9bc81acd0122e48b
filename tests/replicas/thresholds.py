"""Independent float64 replicas of two threshold truncation samplers, one row at a time.

Written from the papers and the authors' public code (read, not copied); nothing here
comes from llmgraft's plugins or kernels.

top-nσ  (Tang, Liu, Xu, Huang, ACL 2025, "Top-nσ: Not All Logits Are You Need",
arXiv 2411.07641).  Official repository github.com/Tomorrowdawn/top_nsigma:
``src/hf/hf_nsigma.py`` (HF LogitsProcessor; keeps ``logit >= max - n*std``),
``src/vllm/sampler.py`` and, on the ``dev`` branch, ``eval_code/my_sampler.py``
(``nsigma_truncate``, the code behind the paper's numbers: logits are divided by the
temperature first, then ``logit > max - n*std`` is kept).  ``std`` is ``torch.std``,
i.e. the unbiased (ddof=1) estimate over the *whole* row.  None of the official code
handles -inf: one -inf entry makes ``std`` NaN, the threshold NaN, and every token is
dropped.  llama.cpp (``src/llama-sampling.cpp``, ``llama_sampler_top_n_sigma_apply``,
PRs #11223 and #13344) skips -inf entries for max/mean/std, uses the population
std (ddof=0) and drops ``logit < max - n*std`` (so keeps ``>=``); ``n <= 0`` disables it.
The authors recommend n = 1.0 as the default (llama.cpp PR #11223 discussion).

p-less  (Tan, Wu, Howard, ICLR 2026, "p-less Sampling: A Robust Hyperparameter-Free
Approach for LLM Decoding", arXiv 2509.23234).  Official repository
github.com/ryttry/p-less-sampling, ``p_less_samplers.py`` (read at commit a681f23 via
its fork CreateTao/p-less): ``p_less_decode(probs)`` and ``p_less_norm_decode(probs)``
take the caller's probability rows (softmax of the temperature-scaled logits) and drop
``probs < threshold``:
    p-less       L = sum_v p_v**2
    p-less-norm  (V*L - 1) / (V - 1),  V = probs.size(-1), the full row width
The general order k (paper Appendix B.5; vLLM PR #48136, ``SamplingParams.p_less`` +
``p_less_order`` default 2.0, k > 1 enforced) uses the Rényi form
``(sum_v p_v**k) ** (1/(k-1))``, which is L at k = 2; it runs on the temperature-scaled
logits (an argmax-invariant vLLM logits processor).  No normalised variant of higher
orders exists in any source found.  In exact arithmetic every threshold is <= max p,
so the argmax always survives; the official code has no fallback (a float rounding that
drops everything gives 0/0 and ``torch.multinomial`` fails; llama.cpp PR #26035
subtracts 1e-5 from the threshold instead).
"""
import numpy as np

_P_LESS_NAMES = {"p_less": "p_less", "p-less": "p_less",
                 "p_less_norm": "p_less_norm", "p-less-norm": "p_less_norm"}


def _row(logits_row, temperature):
    x = np.asarray(logits_row, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("empty row")
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("NaN / +inf logits are undefined for these samplers")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError("temperature must be a finite number > 0")
    return x / float(temperature)


def top_nsigma_threshold(logits_row, n=1.0, *, temperature=1.0, ddof=1):
    """``max - n * std`` over the finite entries of ``logits_row / temperature``.

    Returns None when the row has no finite entry.  With one finite entry, or with
    ``ddof`` >= the finite count, std is taken as 0.
    """
    if not (np.isfinite(n) and n >= 0):
        raise ValueError("n must be a finite number >= 0")
    x = _row(logits_row, temperature)
    f = x[np.isfinite(x)]
    if f.size == 0:
        return None
    sigma = float(np.std(f, ddof=ddof)) if f.size > ddof else 0.0
    return float(f.max()) - float(n) * sigma


def top_nsigma_keep(logits_row, n=1.0, *, temperature=1.0, ddof=1, strict=False):
    """Sorted ids kept by top-nσ: finite ``x_i >= max(x) - n * std(x)``, ``x = logits/T``.

    Conventions (defaults follow the paper / README / official HF processor):
    * temperature: the statistic is computed on ``logits_row / temperature``, as in the
      authors' evaluation sampler.  In exact arithmetic the kept set does not depend on
      T > 0 (max, std and every logit scale by 1/T), so passing raw logits with T = 1
      (the official HF processor and llama.cpp order) gives the same set.
    * ddof=1: unbiased std, as ``torch.std`` in all official code; llama.cpp uses ddof=0
      (std smaller by sqrt((m-1)/m), m = number of finite entries).
    * strict=False keeps ``>=`` (official HF code, README, paper; llama.cpp); strict=True
      keeps ``>`` (official vLLM/eval sampler; then an all-equal row keeps nothing).
    * -inf entries are never kept and are excluded from max / mean / std (llama.cpp's
      choice; the official code does not define it and drops the whole row).  NaN and
      +inf raise ValueError (official code: NaN threshold, every token dropped).
    * n = 0 keeps the ties of the max; n < 0 raises (llama.cpp treats n <= 0 as "off",
      which callers must handle themselves).  A row with no finite entry keeps nothing.
    """
    thr = top_nsigma_threshold(logits_row, n, temperature=temperature, ddof=ddof)
    if thr is None:
        return []
    x = _row(logits_row, temperature)
    keep = np.isfinite(x) & ((x > thr) if strict else (x >= thr))
    return [int(i) for i in np.flatnonzero(keep)]


def _probs(x):
    finite = np.isfinite(x)
    if not finite.any():
        return None
    z = np.where(finite, x - x[finite].max(), -np.inf)
    e = np.exp(z)                                       # exp(-inf) == 0 exactly
    return e / e.sum()


def p_less_threshold(logits_row, variant="p_less", *, order=2.0, temperature=1.0,
                     vocab_size=None):
    """The p-less / p-less-norm probability threshold of ``softmax(logits_row / T)``.

    Returns None when the row has no finite entry.
    """
    name = _P_LESS_NAMES.get(variant)
    if name is None:
        raise ValueError(f"unknown variant {variant!r}")
    if not (np.isfinite(order) and order > 1):
        raise ValueError("order must be a finite number > 1")
    if name == "p_less_norm" and order != 2:
        raise ValueError("p_less_norm is only defined for order 2")
    p = _probs(_row(logits_row, temperature))
    if p is None:
        return None
    if order == 2:
        thr = float(np.sum(p * p))
    else:
        thr = float(np.sum(p ** order)) ** (1.0 / (order - 1.0))
    if name == "p_less_norm":
        v = p.size if vocab_size is None else int(vocab_size)
        if v < 1:
            raise ValueError("vocab_size must be >= 1")
        thr = 0.0 if v == 1 else (v * thr - 1.0) / (v - 1.0)
    return thr


def p_less_keep(logits_row, variant="p_less", *, order=2.0, temperature=1.0,
                vocab_size=None, rel_tol=1e-12):
    """Sorted ids kept by p-less: ``p_i >= threshold`` with ``p = softmax(logits_row / T)``.

    variant: "p_less" (threshold ``L = sum p**2``, or ``(sum p**k)**(1/(k-1))`` for
    ``order=k``) or "p_less_norm" (``(V*L - 1)/(V - 1)``, order 2 only); the hyphenated
    spellings are accepted too.  ``V`` is the row length, -inf entries included, as
    ``probs.size(-1)`` in the official code; ``vocab_size`` overrides it.

    Conventions:
    * temperature: p is the temperature-scaled distribution (the caller divides the
      logits by T before the official ``p_less_decode``; vLLM PR #48136 applies it
      after temperature).  Unlike top-nσ the kept set depends on T.  Pass logits already
      divided by T with the default temperature=1.0, or raw logits and ``temperature``.
    * comparison ``>=`` (official: drop ``probs < threshold``).  ``rel_tol`` also keeps
      tokens within ``rel_tol * threshold`` below it, so exact-arithmetic ties (e.g. a
      uniform row, where every p equals L) are kept despite float64 rounding; set 0 for
      the bare comparison.
    * -inf entries (p = 0) are never kept.  NaN / +inf raise ValueError.
    * nothing kept (impossible in exact arithmetic: threshold <= max p) -> the argmax
      ids are kept; the official code has no fallback.  A row with no finite entry
      keeps nothing.
    """
    thr = p_less_threshold(logits_row, variant, order=order, temperature=temperature,
                           vocab_size=vocab_size)
    if thr is None:
        return []
    x = _row(logits_row, temperature)
    p = _probs(x)
    finite = np.isfinite(x)
    keep = finite & (p >= thr - rel_tol * abs(thr))
    if not keep.any():
        keep = finite & (x == x[finite].max())
    return [int(i) for i in np.flatnonzero(keep)]


if __name__ == "__main__":
    ninf = -np.inf
    # top-nσ: [4, 3, 1, 0] has mean 2, unbiased std sqrt(10/3) = 1.826, threshold 2.174.
    r = [4.0, 3.0, 1.0, 0.0]
    assert top_nsigma_keep(r, 1.0) == [0, 1]
    assert abs(top_nsigma_threshold(r, 1.0) - (4 - np.sqrt(10 / 3))) < 1e-12
    # population std sqrt(2.5) = 1.581 -> threshold 2.419, same set here.
    assert top_nsigma_keep(r, 1.0, ddof=0) == [0, 1]
    assert top_nsigma_keep(r, 2.0) == [0, 1, 2]                  # threshold 0.349
    assert top_nsigma_keep(r, 0.0) == [0]
    # temperature invariance of the kept set.
    rng = np.random.default_rng(0)
    for _ in range(50):
        row = rng.normal(size=300) * 3
        base = top_nsigma_keep(row, 1.0)
        for t in (0.3, 0.7, 1.5, 4.0):
            assert top_nsigma_keep(row, 1.0, temperature=t) == base
    # -inf entries: never kept, excluded from the statistics.
    assert top_nsigma_keep([4.0, ninf, 3.0, 1.0, ninf, 0.0], 1.0) == [0, 2]
    assert top_nsigma_keep([ninf, ninf], 1.0) == []
    assert top_nsigma_keep([ninf, 2.0], 1.0) == [1]
    # ties: an all-equal row keeps everything with >=, nothing with >.
    assert top_nsigma_keep([1.0, 1.0, 1.0], 1.0) == [0, 1, 2]
    assert top_nsigma_keep([1.0, 1.0, 1.0], 1.0, strict=True) == []

    # p-less: logits log([0.5, 0.3, 0.15, 0.05]) -> L = 0.365, norm (4L-1)/3 = 0.15333.
    p = np.array([0.5, 0.3, 0.15, 0.05])
    lg = np.log(p)
    assert abs(p_less_threshold(lg) - 0.365) < 1e-12
    assert p_less_keep(lg) == [0]
    assert abs(p_less_threshold(lg, "p_less_norm") - (4 * 0.365 - 1) / 3) < 1e-12
    assert p_less_keep(lg, "p-less-norm") == [0, 1]              # 0.15 < 0.1533
    # order 3: (0.125+0.027+0.003375+0.000125)**0.5 = 0.3958 -> keeps token 0 only.
    assert p_less_keep(lg, order=3.0) == [0]
    # a flatter row: p = [0.3, 0.25, 0.25, 0.2], L = 0.2550 -> keeps 0, (1, 2 are 0.25 <).
    q = np.log([0.3, 0.25, 0.25, 0.2])
    assert p_less_keep(q) == [0]
    assert p_less_keep(q, "p_less_norm") == [0, 1, 2, 3]         # thr 0.00667
    # uniform row: every p equals L -> all kept (ties).
    assert p_less_keep(np.zeros(7)) == list(range(7))
    assert p_less_keep(np.zeros(7), "p_less_norm") == list(range(7))
    # temperature changes the set; T=1 is an exact tie (p_1 = L = 0.3) kept by rel_tol.
    row = np.log([0.4, 0.3, 0.2, 0.1])
    assert p_less_keep(row) == [0, 1]                            # L = 0.30
    assert p_less_keep(row, temperature=0.25) == [0]             # L = 0.577
    assert p_less_keep(row, temperature=4.0) == [0, 1]           # L = 0.254
    assert p_less_keep(row / 4.0) == p_less_keep(row, temperature=4.0)
    assert p_less_keep(row, rel_tol=0.0) == [0]                  # float64 L = 0.30000000000000004
    r3 = np.log([0.45, 0.35, 0.2])
    assert p_less_keep(r3) == [0]                                # L = 0.365
    assert p_less_keep(r3, temperature=4.0) == [0, 1]            # L = 0.336
    # -inf entries: p = 0, never kept; V in p_less_norm still counts them.
    r2 = np.array([0.0, 0.0, ninf, ninf])
    assert p_less_keep(r2) == [0, 1]
    assert abs(p_less_threshold(r2, "p_less_norm") - (4 * 0.5 - 1) / 3) < 1e-12
    assert p_less_keep(r2, "p_less_norm") == [0, 1]
    assert p_less_keep([ninf, ninf]) == []
    assert p_less_keep([5.0]) == [0] and p_less_keep([5.0], "p_less_norm") == [0]
    # the argmax always survives on random rows, and the kept set is a top set.
    for _ in range(200):
        row = rng.normal(size=500) * rng.uniform(0.1, 5)
        for var, k in (("p_less", 2.0), ("p_less_norm", 2.0), ("p_less", 3.0),
                       ("p_less", 1.5)):
            kept = p_less_keep(row, var, order=k)
            assert int(np.argmax(row)) in kept
            assert row[kept].min() >= np.max(np.delete(row, kept), initial=-np.inf)
        assert set(p_less_keep(row)) <= set(p_less_keep(row, "p_less_norm"))
    for bad in ([np.nan, 1.0], [np.inf, 1.0]):
        for f in (top_nsigma_keep, p_less_keep):
            try:
                f(bad)
            except ValueError:
                continue
            raise AssertionError("non-finite row accepted")
    print("thresholds replica self-check: OK")
