"""Shared machinery of truncation samplers: the bad-logit policy, exact top-N statistics, and the two forms
of rule every truncation sampler is built on:

* **prefix** (:func:`truncate_top_n`): keep a prefix of the N most likely tokens, in probability order
  (Top-H) or in an order of the rule's own (Top-W: by its potential φ);
* **threshold** (:func:`truncate_threshold`): keep every token whose logit reaches a per-row threshold
  computed from whole-row statistics (top-nσ: max - n·σ; p-less: log Σp²); it may keep any number of tokens.

Policy, identical for every truncation sampler:

* NaN logits are treated as -inf;
* a row with any +inf logit keeps exactly its +inf tokens, returned as logit 0 (uniform among them), so a
  downstream softmax never sees inf - inf;
* a row with no finite logit (all -inf / NaN) is returned as all -inf;
* every other row keeps at least its argmax token.

Statistics are exact in float64 and relative to each row's maximum ``m = x_1``, so peaked rows keep their
digits (a float32 softmax rounds p_1 near 1 and loses -p_1 log p_1, which is all of a peaked row's
entropy). With ``t_i = x_i - m`` and ``e_i = exp(t_i)`` (so ``e_1 = 1``) over the top N, and the rest of the
vocabulary (the "tail") summarised by its mass ``R = Σ_tail e_j`` and ``W_tail = Σ_tail e_j t_j``:

    s = Σ_{i≤N} e_i + R           (the softmax normaliser, in units of e^m)
    log p_i = t_i - log s,        log s = log1p(Σ_{2≤i≤N} e_i + R)
    H(p) = log s - (Σ_{i≤N} e_i t_i + W_tail) / s

Every sum above adds terms of one sign, so nothing cancels. The top-N terms are computed in float64 from
the logits themselves (exact inputs); only the tail sums come from a float32 pass over the vocabulary,
whose per-term error (~1e-6 relative) moves a kept-set boundary only at ties closer than that.

Two paths compute the top N and the tail sums, with the same results (the tests run every rule on both):

* **compiled** (``native/top_n.cpp``, float32 CPU logits on AVX-512 machines): one C++ call per batch. A
  lower bound on each row's N-th largest logit from the maxima of >= 4N groups lets a vector compare skip
  nearly every token, so the selection reads the row about twice instead of sorting it; the tail terms are
  float32 exponentials summed in double. Ties among equal logits: lowest index first.
* **torch** (everywhere else, or with ``LLMGRAFT_NATIVE=0``): ``torch.topk`` (or :func:`select_top_n`'s
  grouped form) and a float32 softmax pass for the tail sums.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from . import native

NEG_INF = float("-inf")
STATISTICS = ("none", "mass", "mass+entropy")
#: The entropy pass needs a probability buffer beside the logits. It is a per-thread workspace of at most
#: this many elements, reused across calls (a fresh [B, V] allocation is mapped and page-faulted on every
#: call: 5x slower at B=64, V=128k); rows are processed in chunks that fit it.
_CHUNK_ELEMENTS = 1 << 21
_workspace = threading.local()
#: Up to this many top-N entries per call (B <= 32 at N = 100) the float64 statistics are computed in numpy
#: on the CPU: on small arrays its per-operation cost is about half of torch's, and per-operation cost
#: decides the speed at small batches.
_NUMPY_MAX_ENTRIES = 3200
#: -inf logits become this (finite) value in the float64 statistics, so that e_i * t_i = 0 * -1e300 = 0
#: for masked tokens instead of 0 * -inf = NaN.
_FLOOR = -1e300
#: Rows whose maximum logit is at most this large in magnitude skip the shift before the entropy pass.
_UNSHIFTED_MAX = 64.0


@dataclass
class TopN:
    """The N largest logits of every row, sorted, with exact float64 statistics about them.

    ``logits``/``index`` are [B, N] torch tensors (values after the bad-logit policy, vocabulary ids). With
    ``statistics`` other than "none": ``shifted`` = t_i = x_i - x_1 and ``weight`` = e_i = exp(t_i), both
    [B, N] float64 (``weight[:, 0]`` is exactly 1); ``tail_mass`` = R and, for "mass+entropy",
    ``tail_weighted`` = W_tail, both [B, 1] float64 (see the module docstring), zero when N = V. These are
    arrays of the namespace ``xp`` (numpy for small CPU batches, else torch): rules written with operators
    and ``xp`` functions run on either, and :meth:`column` brings per-row parameters into it.
    """

    logits: torch.Tensor
    index: torch.Tensor
    shifted: Any = None
    weight: Any = None
    tail_mass: Any = None
    tail_weighted: Any = None
    #: Rows that held +inf logits and, per such row, where: they come back as 0 there and -inf elsewhere.
    posinf: tuple[torch.Tensor, torch.Tensor] | None = None
    xp: ModuleType = torch

    def column(self, values: Any) -> Any:
        """A float or [B] tensor of per-row values as a [B, 1] float64 array of ``xp`` (floats pass as is)."""
        if isinstance(values, (int, float)):
            return float(values)
        if self.xp is np:
            return values.numpy().astype(np.float64)[:, None]
        return values.to(device=self.logits.device, dtype=torch.float64).unsqueeze(1)


def _clean(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A copy of some rows under the bad-logit policy, which rows held +inf, and where (for those rows)."""
    clean = rows.nan_to_num(nan=NEG_INF, posinf=float("inf"), neginf=NEG_INF)
    where = torch.isposinf(clean)
    has = where.any(dim=-1)
    clean[has] = torch.where(where[has], 0.0, NEG_INF).to(clean.dtype)
    return clean, has, where[has]


def sanitize_logits_(logits: torch.Tensor) -> torch.Tensor:
    """Apply the bad-logit policy to ``logits[B, V]`` in place, for samplers that do not use
    :func:`truncate_top_n`: NaN becomes -inf, a row with +inf logits keeps exactly those tokens as logit 0,
    and a row with no finite logit stays all -inf. Clean rows cost one pass (their maximum)."""
    bad = ~torch.isfinite(logits.amax(dim=-1))  # NaN and +inf propagate through the maximum
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        logits[rows] = _clean(logits[rows])[0]
    return logits


def _apply_bad_logit_policy(logits: torch.Tensor, top_logits: torch.Tensor, top_idx: torch.Tensor):
    """Sanitise the rows whose maximum is not finite, in place, and redo their top N.

    Returns the +inf bookkeeping for :attr:`TopN.posinf`: a rule may keep only some of several tied
    +inf tokens, and the policy keeps them all.
    """
    special = (~torch.isfinite(top_logits[:, 0])).nonzero().squeeze(1)
    clean, has, where = _clean(logits[special])
    logits[special] = clean
    top_logits[special], top_idx[special] = torch.topk(clean, top_logits.shape[1], dim=-1)
    return special[has], where


def _tail_sums(logits: torch.Tensor, top: TopN, entropy: bool, shift: bool) -> tuple[torch.Tensor, ...]:
    """Σ_tail p, p_1 and (with ``entropy``) Σ_tail p·x of the float32 softmax, each [B] float32.

    Overwrites ``logits`` (the caller rewrites every entry afterwards). The float32 softmax is only used
    for the tail, in units of its own p_1 = 1 / s32 (R = Σ_tail p / p_1), so its rounded normaliser cancels.
    With ``shift``, x is first replaced by t = x - m, so the third sum is Σ_tail p·t.
    """
    if not entropy:
        in_place = logits.device.type == "cpu"  # no [B, V] allocation; the fused softmax is the fastest pass
        probs = torch.softmax(logits, dim=-1, out=logits) if in_place else logits.softmax(-1)
        p1 = probs.gather(1, top.index[:, :1]).squeeze(1)
        return probs.scatter_(1, top.index, 0.0).sum(-1), p1
    x = logits.sub_(top.logits[:, :1]) if shift else logits
    rows = max(1, _CHUNK_ELEMENTS // x.shape[1])
    if rows >= x.shape[0]:  # one chunk (the common case): no slicing
        return _entropy_sums(x, top.index, _buffer(x.shape, x.device))
    buffer = _buffer((rows, x.shape[1]), x.device)
    parts = [_entropy_sums(x[i:i + rows], top.index[i:i + rows], buffer[:min(rows, x.shape[0] - i)])
             for i in range(0, x.shape[0], rows)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _entropy_sums(x: torch.Tensor, index: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
    probs = torch.softmax(x, -1, out=buffer)
    p1 = probs.gather(1, index[:, :1]).squeeze(1)
    mass = probs.scatter_(1, index, 0.0).sum(-1)
    return mass, p1, probs.mul_(x).nansum(-1)  # nansum: 0 * -inf (masked tokens) is NaN


def _buffer(shape: tuple[int, ...], device: torch.device, slot: str = "main") -> torch.Tensor:
    """This thread's float32 workspace ``slot`` on ``device``, viewed as ``shape`` (views are cached: batch
    sizes repeat from step to step, and making a view costs as much as a small kernel at B=1)."""
    cache = getattr(_workspace, "cache", None)
    if cache is None:
        cache = _workspace.cache = {}
    numel = math.prod(shape)
    view = cache.get((slot, shape, device))
    if view is None:
        # Never an inference tensor (hosts call samplers under torch.inference_mode, tests and tools do
        # not), so the same workspace serves both.
        with torch.inference_mode(False):
            storage = cache.get((slot, device))
            if storage is None or storage.numel() < numel or len(cache) > 256:
                for key in [k for k in cache if k[0] == slot and k[-1] == device]:
                    del cache[key]  # views of the old storage go with it
                size = max(numel, 0 if storage is None else storage.numel())
                storage = cache[(slot, device)] = torch.empty(size, dtype=torch.float32, device=device)
            view = cache[(slot, shape, device)] = storage[:numel].view(shape)
    return view


_GROUP = 16
_GROUP_OFFSETS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _two_stages_win(batch: int, vocab: int, n: int) -> bool:
    """Where :func:`select_top_n`'s two stages beat ``torch.topk`` (see its docstring for the figures)."""
    if vocab < 40 * n:  # too few groups: the candidates are a large share of the row
        return False
    if vocab >= 1024 * n or (batch <= 4 and vocab >= 256 * n):
        return True
    return batch >= 24 and vocab < 64 * n  # torch.topk's slower selection path


def select_top_n(logits: torch.Tensor, n: int, torch_ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` largest logits of every row, sorted, and their indices: ``torch.topk``'s values.

    Where it is faster on the CPU, in two stages: the maxima of strided groups of 16 tokens, the top n
    groups, then the top n among those groups' tokens. Every token of the top n lies in a group whose
    maximum is among the top n maxima, so the values are exactly ``torch.topk``'s; only which of several
    exactly equal logits is chosen may differ. ``torch_ties`` keeps ``torch.topk``'s choice (transformers'
    warper is defined by it). Measured on 2 cores (n = 100, median of 5 rounds, random and LM-like rows):
    two stages win 1.7-2.9x at V >= 1024·n for any B (n = 1200 alike), 1.3-4x for B <= 4 at V >= 256·n, and
    1.3-1.5x at B >= 24 when V < 64·n, where torch.topk falls back from its partial sort to a slower
    selection; elsewhere torch.topk's partial sort wins (two stages: 0.35-0.8x at B = 16-64, V = 8k on
    LM-like rows), so it stays.
    """
    batch, vocab = logits.shape
    if torch_ties or not _two_stages_win(batch, vocab, n):
        return torch.topk(logits, n, dim=-1, largest=True, sorted=True)
    cols = vocab // _GROUP
    body = cols * _GROUP
    maxima = logits[:, :body].view(batch, _GROUP, cols).amax(1)  # NaN and +inf propagate: their groups win
    groups = torch.topk(maxima, n, dim=-1, sorted=False).indices
    key = (cols, logits.device)
    offsets = _GROUP_OFFSETS.get(key)
    if offsets is None:
        offsets = _GROUP_OFFSETS[key] = torch.arange(_GROUP, device=logits.device) * cols
    candidates = (groups.unsqueeze(-1) + offsets).view(batch, n * _GROUP)
    if body < vocab:  # the few tokens past the last whole group are always candidates
        rest = torch.arange(body, vocab, device=logits.device).expand(batch, -1)
        candidates = torch.cat([candidates, rest], dim=1)
    values, where = torch.topk(logits.gather(1, candidates), n, dim=-1, largest=True, sorted=True)
    return values, candidates.gather(1, where)


def top_n_statistics(logits: torch.Tensor, top_n: int, statistics: str = "none",
                     torch_ties: bool = False) -> TopN:
    """The sorted top-N of every row (bad-logit policy applied) and, per ``statistics``, exact statistics.

    May overwrite ``logits`` with scratch values: callers rewrite every entry (:func:`truncate_top_n`).
    ``torch_ties``: see :func:`select_top_n`.
    """
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    batch, vocab = logits.shape
    n = min(top_n, vocab)
    fast = None if torch_ties else native.top_n(logits, n, statistics)
    if fast is not None and bool(np.isfinite(fast[0].numpy()[:, 0]).all()):  # else: the policy, below
        top = TopN(fast[0], fast[1])
        if statistics != "none":
            _exact_statistics(top, fast[2][:, :1], fast[2][:, 1:] if statistics == "mass+entropy" else None)
        return top
    top_logits, top_idx = select_top_n(logits, n, torch_ties)
    host = logits.device.type == "cpu" and top_logits.dtype == torch.float32
    # topk sorts NaN first, so a non-finite row maximum flags every row needing the policy, and one check
    # of the first column tells whether any does: clean rows (nearly all) pay for no pass over the
    # vocabulary. (On the CPU through a numpy view; elsewhere a sum, which may overflow: the policy path
    # then simply finds no row to change.)
    if host:
        clean = bool(np.isfinite(top_logits.numpy()[:, 0]).all())
    else:
        clean = math.isfinite(float(top_logits[:, 0].sum()))
    top = TopN(top_logits, top_idx)
    if not clean:
        top.posinf = _apply_bad_logit_policy(logits, top_logits, top_idx)
    if statistics == "none":
        return top
    entropy = statistics == "mass+entropy"
    # Σ_tail p·t = Σ_tail p·x - m·Σ_tail p: skipping the shift saves a pass over the vocabulary, and its
    # float32 products then err by <= 6e-8·|m| per unit of tail mass, which is <= 1e-6 of H(p) (itself
    # >= P_tail·log N) while |m| <= 64. Larger logits (or an unknown m, off the CPU) are shifted first.
    shift = entropy and (not host or float(np.abs(top_logits.numpy()[:, 0]).max()) > _UNSHIFTED_MAX)
    if n < vocab:
        sums = _tail_sums(logits if logits.dtype == torch.float32 else logits.float(), top, entropy, shift)
    else:
        zero = torch.zeros(batch, device=logits.device)
        sums = (zero, torch.ones(batch, device=logits.device)) + ((zero,) if entropy else ())
    # The float32 softmax's sums, in units of its own p_1 (R = Σ_tail p / p_1): its rounded normaliser cancels.
    mass, p1 = (v.double().unsqueeze(1) for v in sums[:2])
    tail_weighted = None
    if entropy:
        weighted = sums[2].double().unsqueeze(1)
        if not shift:
            weighted -= top_logits[:, :1].double().clamp(min=_FLOOR) * mass
        tail_weighted = weighted / p1
    _exact_statistics(top, mass / p1, tail_weighted)
    return top


def _exact_statistics(top: TopN, tail_mass: torch.Tensor, tail_weighted: torch.Tensor | None) -> None:
    """Fill ``top``'s float64 statistics from its logits and the tail sums ([B, 1] float64 tensors), in numpy
    for small CPU calls (see ``_NUMPY_MAX_ENTRIES``), else in torch."""
    if (top.logits.device.type == "cpu" and top.logits.dtype == torch.float32
            and top.logits.numel() <= _NUMPY_MAX_ENTRIES):
        top.xp = np
        x = np.maximum(top.logits.numpy(), _FLOOR, dtype=np.float64)
        tail_mass = tail_mass.numpy()
        tail_weighted = None if tail_weighted is None else tail_weighted.numpy()
    else:
        x = top.logits.double().clamp_(min=_FLOOR)
    top.tail_mass, top.tail_weighted = tail_mass, tail_weighted
    top.shifted = x - x[:, :1]
    top.weight = top.xp.exp(top.shifted)


_RANKS: dict[tuple[int, Any], Any] = {}


def _ranks(n: int, device: torch.device | None) -> Any:
    """[1, n] ranks (numpy when ``device`` is None), cached: a per-call arange costs at B=1.

    Rank 0 is -1 so that ``ranks >= count`` never drops the first token, even for a count of 0.
    """
    key = (n, device)
    ranks = _RANKS.get(key)
    if ranks is None:
        ranks = np.arange(n)[None, :] if device is None else torch.arange(n, device=device).unsqueeze(0)
        ranks[0, 0] = -1
        _RANKS[key] = ranks
    return ranks


def truncate_top_n(logits: torch.Tensor, top_n: int, keep: Callable[[TopN], Any],
                   statistics: str = "none", torch_ties: bool = False) -> torch.Tensor:
    """Keep, in each row, a prefix of its ``top_n`` largest logits, in place.

    ``keep`` receives the :class:`TopN` of :func:`top_n_statistics` and returns either integer counts [B]
    (keep that many of the most likely) or ``(order, counts)``: ``order`` [B, N] lists positions into the
    top N (0 = the most likely) in the rule's own order, and each row keeps its first ``counts`` entries.
    Arrays are of ``top.xp``. Every row keeps at least its most likely token. Kept logits keep their values;
    the rest become -inf.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        return logits
    with torch.no_grad():
        top = top_n_statistics(logits, top_n, statistics, torch_ties)
        n = top.logits.shape[1]
        kept = keep(top)
        if isinstance(kept, tuple):
            drop = _ordered_drop(*kept, n).to(logits.device)
        elif isinstance(kept, np.ndarray):
            drop = torch.from_numpy(_ranks(n, None) >= kept[:, None])
        else:
            drop = _ranks(n, logits.device) >= kept.unsqueeze(1)
        logits.fill_(NEG_INF).scatter_(1, top.index, top.logits.masked_fill_(drop, NEG_INF))
        _restore_posinf(logits, top.posinf)
    return logits


def _ordered_drop(order: Any, counts: Any, n: int) -> torch.Tensor:
    """[B, N] bool over the top-N positions: True where ``order``'s prefix of length ``counts`` leaves it out."""
    order = torch.as_tensor(order)
    counts = torch.as_tensor(counts, device=order.device)
    in_prefix = _ranks(n, order.device) < counts.unsqueeze(1)
    in_prefix[:, 0] = True  # the rule's first choice always stays
    drop = torch.ones(order.shape, dtype=torch.bool, device=order.device)
    drop.scatter_(1, order, ~in_prefix)
    drop[:, 0] = False  # and so does the most likely token
    return drop


def _restore_posinf(logits: torch.Tensor, posinf: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if posinf is not None and posinf[0].numel():
        rows, where = posinf
        logits[rows] = torch.where(where, 0.0, NEG_INF).to(logits.dtype)


#: Up to this many logits per call (float32, CPU), :func:`truncate_threshold` runs its rule on numpy views:
#: there a call is a dozen small operations, and numpy's per-operation cost is a third of torch's.
_NUMPY_MAX_LOGITS = 1 << 16


def truncate_threshold(logits: torch.Tensor, threshold: Callable[[Any, Any, ModuleType], Any]) -> torch.Tensor:
    """Keep, in each row, every logit at or above the row's threshold, in place.

    ``threshold(rows, row_max, xp)`` receives the rows (bad-logit policy applied: NaN is -inf, no +inf;
    rows may hold -inf) and their maxima [B] as arrays of ``xp`` (numpy for small float32 CPU inputs,
    else torch), and returns [B] thresholds in logit units; it must not modify ``rows``. A threshold
    above the maximum, or NaN, keeps just the maximum, so every row keeps its argmax. Rows with +inf
    logits keep exactly those (as 0) and rows with no finite logit stay all -inf, whatever the rule says.
    Costs one pass for the maxima, the rule's passes, and one masking pass.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        return logits
    with torch.no_grad():
        if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
                and logits.numel() <= _NUMPY_MAX_LOGITS):
            x = logits.numpy()
            top = x.max(axis=1)  # NaN and +inf propagate through the maximum
            if np.isfinite(top).all():  # else the policy below, through torch
                with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                    bound = np.asarray(threshold(x, top, np), dtype=np.float32)
                    x[x < np.where(bound <= top, bound, top)[:, None]] = NEG_INF
                return logits
        row_max = logits.amax(dim=-1)
        ruled = torch.isfinite(row_max)  # NaN and +inf propagate through the maximum
        if bool(ruled.all()):  # the common case: fmin also turns a NaN threshold into the maximum
            bound = torch.fmin(threshold(logits, row_max, torch).to(row_max.dtype), row_max)
            return logits.masked_fill_(logits < bound.unsqueeze(1), NEG_INF)
        rows = (~ruled).nonzero().squeeze(1)
        clean, has_posinf, _ = _clean(logits[rows])
        logits[rows] = clean
        row_max[rows] = clean.amax(dim=-1)
        # Rows that held +inf keep exactly those tokens; rows with no finite logit stay all -inf.
        ruled = torch.isfinite(row_max)
        ruled[rows[has_posinf]] = False
        bound = threshold(logits, row_max, torch)
        # Policy rows bypass the rule; NaN and too-high thresholds keep just the maximum.
        bound = torch.where(ruled & (bound <= row_max), bound.to(row_max.dtype), row_max)
        logits.masked_fill_(logits < bound.unsqueeze(1), NEG_INF)
    return logits
