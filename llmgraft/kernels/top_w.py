"""Top-W truncation (arXiv 2602.10346), batched over rows with per-row parameters. Torch reference kernel.

Follows the official ``logit_processor_w1.py`` (github.com/arashgholami/top-w-decoding):

* E, the input-embedding matrix, is standardised per dimension over all V rows (mean, biased variance
  clipped at ≥ 1e-6) and each row L2-normalised (norm clipped at ≥ 1e-12): :func:`unit_embeddings`, once
  per model;
* p = softmax(x) with x the temperature-scaled logits (exact float64 statistics); the pool I is the
  m = ``top_m`` most likely tokens, p NOT renormalised over it;
* warm start: S = the shortest prefix of I (by p) whose mass reaches ``init_top_p``·Σ_I p;
* up to ``alt_iters`` passes, stopping when S is unchanged:
  f_i = −(1 − max_{j∈S} cos(e_i, e_j)) (the nearest-set potential, 0 on S);
  φ_i = ``geom_scale``·f_i + λ·log max(p_i, 1e-12); order I by φ descending; Γ_k = max(Σ_{j≤k} p_j, 1e-12);
  score_k = Σ_{j≤k} p_j φ_j / Γ_k + (β − λ)·log Γ_k; S = the first k* = argmax score (first maximiser)
  tokens of that order;
* the kept tokens keep their logits; all others, and everything outside the pool, become -inf.

``potential="matching"`` is the distance-matching potential the official file defines but never calls
(``_distance_matching_potential``): chordal distances D_ij = sqrt(max(2 − 2 cos_ij, 0)) over the pool,
γ = clip(Σ_S p, 1e-12, 1 − 1e-12), a = p/γ on S, b = p/(1 − γ) off S, g = D b − D a, f_i = min_j (g_j + D_ij)
(0 when S is empty or the whole pool).

Differences from the official code: batches of any size with per-row λ, β, geom_scale and init_top_p (the
official processor takes one row); tokens of zero probability never enter the pool (the official code can
pool them when fewer than m tokens have p > 0, but they add nothing to any score); ties follow the pool's
order (stable sorts) where the official sorts are unstable; rows follow the shared bad-logit policy.

Cost, per row and pass, with d the embedding width: the potential needs max_{j∈S} cos(e_i, e_j) only for
i ∉ S. The first pass computes exactly that block, (m − |S₀|)·|S₀|·d multiply-adds (|S₀| is the warm start,
near m at high temperature, so the block is small at both ends); later passes reuse every similarity
column computed so far and add full columns only for tokens new to S, m·|new|·d. Rows stop as soon as
their S repeats, and each pass is one batched matmul over the rows still running. The prefix scan is a
sort of m values per pass. The matching potential costs m²·d once per call plus m² per pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .truncation import TopN, _buffer, truncate_top_n

POTENTIALS = ("nearest", "matching")
_EPS = 1e-12
_NEG_INF = torch.tensor(-torch.inf)


def unit_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """Standardise ``embeddings[V, d]`` per dimension over all rows, then L2-normalise each row (float32)."""
    e = embeddings.detach().float()
    mean = e.mean(dim=0)
    variance = (e - mean).square().mean(dim=0).clamp(min=1e-6)
    unit = (e - mean) * variance.rsqrt()
    return unit / unit.norm(dim=1, keepdim=True).clamp(min=_EPS)


@dataclass
class TopWStats:
    """What one call learnt per row: passes run, whether S repeated, and the kept-set size."""

    passes: torch.Tensor
    converged: torch.Tensor
    kept: torch.Tensor


def _column(value, rows: int) -> torch.Tensor:
    """A float or [B] tensor as a [B, 1] float64 tensor."""
    if isinstance(value, (int, float)):
        return torch.full((rows, 1), float(value), dtype=torch.float64)
    return value.detach().to(device="cpu", dtype=torch.float64).reshape(rows, 1)


def _prefix_scan(p: torch.Tensor, log_p: torch.Tensor, f: torch.Tensor, lam, beta, geom_scale):
    """φ order and k* per row (see the module docstring): returns (order [B, m], k [B])."""
    phi = geom_scale * f + lam * log_p
    order = torch.sort(phi, dim=1, descending=True, stable=True).indices
    p_sorted = p.gather(1, order)
    mass = p_sorted.cumsum(1).clamp_(min=_EPS)
    score = (p_sorted * phi.gather(1, order)).cumsum(1).div_(mass) + (beta - lam) * mass.log()
    return order, score.argmax(1) + 1  # argmax returns the first maximiser


def _members(order: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, m] bool: the first ``k`` positions of each row's ``order``."""
    ranks = torch.arange(order.shape[1], device=order.device).unsqueeze(0)
    return torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, ranks < k.unsqueeze(1))


def _rows_at(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``table[b, positions[b, k]]`` for a [B, m, d] table and [B, K] positions: [B, K, d] (row copies)."""
    batch, m, width = table.shape
    flat = (positions + torch.arange(batch).unsqueeze(1) * m).reshape(-1)
    return table.reshape(batch * m, width).index_select(0, flat).view(batch, -1, width)


def _first_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row of ``mask`` [B, m], padded: ([B, K] positions, [B, K] valid)."""
    count = mask.sum(1)
    width = max(int(count.max()), 1)
    positions = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    valid = torch.arange(width).unsqueeze(0) < count.unsqueeze(1)
    return positions, valid


#: The first pass also computes full similarity columns for the pool's most likely tokens: the set after
#: it is usually among them, and then no later pass reads the pool's vectors again.
_SPECULATE = 4


def _groups(count: torch.Tensor, slack: float = 1.25, floor: int = 4) -> list[tuple[int, int]]:
    """Contiguous row ranges [a, b) of rows with count > 0, each padded to its largest count at a cost within
    ``slack`` times its real work (plus ``floor`` per row): one batched matmul per range."""
    counts = count.tolist()
    ranges, a = [], 0
    while a < len(counts):
        if counts[a] == 0:
            a += 1
            continue
        b, top, total = a + 1, counts[a], counts[a]
        while b < len(counts) and counts[b] > 0:
            wider, more = max(top, counts[b]), total + counts[b]
            if wider * (b + 1 - a) > slack * more + floor * (b + 1 - a):
                break
            top, total, b = wider, more, b + 1
        ranges.append((a, b))
        a = b
    return ranges


class _NearestPotential:
    """max_{j∈S} cos(e_i, e_j) for every pool token i ∉ S (1 on S), per row, exactly.

    The pool's unit vectors are gathered once per call, into a reused workspace. Only full similarity
    columns (one token against the whole pool) are computed, and each once per call. A token i ∉ S is
    exact if its own column is known (max over S of the column) or if every member of S has its column
    (max over those columns); the first pass computes columns for the smaller side of the warm start (the
    few tokens outside S₀ when S₀ holds most of the pool, else the members of S₀), later passes only for
    members of S whose columns are missing, and only where some token outside S lacks its own. Rows are
    ordered by their first-pass column count, so that rows of similar width share one matmul (``_groups``).
    """

    def __init__(self, unit: torch.Tensor, index: torch.Tensor, members: torch.Tensor):
        batch, m = index.shape
        wide = members.sum(1) > m // 2
        wanted = torch.where(wide.unsqueeze(1), ~members, members)
        wanted[:, :_SPECULATE] = True
        self.order = torch.sort(wanted.sum(1), stable=True).indices  # internal row order
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(batch)
        # Into the reused workspace: a fresh [B·m, d] allocation is page-faulted on every call (5x slower).
        workspace = _buffer((batch * m, unit.shape[1]), unit.device)
        rows = index.index_select(0, self.order).reshape(-1)
        self.vectors = torch.index_select(unit, 0, rows, out=workspace).view(batch, m, -1)
        self.blocks: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (a, b, [g, K] positions or -1, sims)
        self.have = torch.zeros(batch, m, dtype=torch.bool)
        self._add(wanted.index_select(0, self.order))

    def _add(self, new: torch.Tensor) -> None:
        """Full columns for the positions marked in ``new`` [B, m] (internal order), one matmul per range."""
        new = new & ~self.have
        count = new.sum(1)
        for a, b in _groups(count):
            positions, valid = _first_positions(new[a:b])
            vectors = self.vectors[a:b]
            columns = _rows_at(vectors, positions)
            sims = torch.bmm(vectors, columns.transpose(1, 2))  # [g, m, K]: cos(pool i, column token)
            self.blocks.append((a, b, positions.masked_fill(~valid, -1), sims))
        self.have |= new

    def __call__(self, members: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        """[B, m] max cosine to S (``members``, caller's row order); only ``running`` rows need be exact."""
        members = members.index_select(0, self.order)
        running = running.index_select(0, self.order)
        covered = (members | self.have).all(1)  # every token outside S has its own column
        self._add(members & ~(covered | ~running).unsqueeze(1))
        best = torch.full(members.shape, -torch.inf)
        for a, b, positions, sims in self.blocks:
            valid = positions >= 0
            in_s = members[a:b].gather(1, positions.clamp(min=0)) & valid  # [g, K]
            if bool((~covered[a:b] & running[a:b]).any()):  # max over the columns of S's members
                take, ok = _first_positions(in_s)
                picked = sims.gather(2, take.unsqueeze(1).expand(-1, sims.shape[1], -1))  # [g, m, K_in]
                picked.masked_fill_(~ok.unsqueeze(1), -torch.inf)
                best[a:b] = torch.maximum(best[a:b], picked.amax(2))
            if bool((covered[a:b] & running[a:b]).any()):  # each outside token's own column, max over S
                masked = torch.where(members[a:b].unsqueeze(2), sims, _NEG_INF,
                                     out=_buffer(tuple(sims.shape), sims.device, "top_w"))
                own = torch.where(valid & ~in_s, masked.amax(1), -torch.inf)  # [g, K]
                part = torch.full((b - a, members.shape[1]), -torch.inf)
                part.scatter_reduce_(1, positions.clamp(min=0), own, "amax")
                best[a:b] = torch.maximum(best[a:b], part)
        return best.masked_fill_(members, 1.0).index_select(0, self.inverse)


class _MatchingPotential:
    """The official, uncalled distance-matching potential (see the module docstring)."""

    def __init__(self, unit: torch.Tensor, index: torch.Tensor):
        vectors = unit.index_select(0, index.reshape(-1)).view(*index.shape, -1)
        cos = torch.bmm(vectors, vectors.transpose(1, 2)).clamp_(-1.0, 1.0)
        self.distance = (2.0 - 2.0 * cos).clamp_(min=0.0).sqrt_()  # float32, as the official code
        self.distance.diagonal(dim1=1, dim2=2).zero_()

    def potential(self, p: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        distance = self.distance.double()
        gamma = (p * members).sum(1, keepdim=True).clamp(_EPS, 1.0 - _EPS)
        a = torch.where(members, p / gamma, 0.0)
        b = torch.where(members, 0.0, p / (1.0 - gamma).clamp(_EPS, 1.0))
        g = torch.bmm(distance, (b - a).unsqueeze(2)).squeeze(2)
        f = (g.unsqueeze(1) + distance).amin(2)
        count = members.sum(1, keepdim=True)
        return torch.where((count == 0) | (count == members.shape[1]), 0.0, f)


def top_w_rule(top: TopN, unit: torch.Tensor, lam, beta, geom_scale, init_top_p, alt_iters: int,
               potential: str = "nearest", stats: TopWStats | None = None):
    """The Top-W keep rule over a :class:`TopN` with "mass" statistics: (φ order [B, m], k [B])."""
    batch, m = top.index.shape
    weight = torch.as_tensor(top.weight).cpu()
    shifted = torch.as_tensor(top.shifted).cpu()
    log_s = torch.log1p(weight[:, 1:].sum(1, keepdim=True) + torch.as_tensor(top.tail_mass).cpu())
    p = weight * torch.exp(-log_s)
    log_p = (shifted - log_s).clamp_(min=float(torch.log(torch.tensor(_EPS, dtype=torch.float64))))
    lam, beta, geom_scale = (_column(v, batch) for v in (lam, beta, geom_scale))
    # Warm start: the shortest p-ordered prefix with mass >= init_top_p·Σ_I p (searchsorted "left" + 1).
    cumulative = p.cumsum(1)
    target = _column(init_top_p, batch).clamp(0.0, 1.0) * cumulative[:, -1:]
    k = ((cumulative < target).sum(1) + 1).clamp_(1, m)
    order = torch.arange(m).repeat(batch, 1)
    members = _members(order, k)

    index = top.index.reshape(batch, m).to(unit.device)
    nearest = potential == "nearest"
    field = (_NearestPotential(unit.cpu(), index.cpu(), members) if nearest
             else _MatchingPotential(unit.cpu(), index.cpu()))
    passes = torch.zeros(batch, dtype=torch.long)
    converged = torch.zeros(batch, dtype=torch.bool)
    running = torch.ones(batch, dtype=torch.bool)
    for step in range(max(1, alt_iters)):
        if nearest:
            f = -(1.0 - field(members, running).clamp_(-1.0, 1.0).double())
        else:
            f = field.potential(p, members)
        new_order, new_k = _prefix_scan(p, log_p, f, lam, beta, geom_scale)
        new_members = _members(new_order, new_k)
        same = (new_members == members).all(1)
        passes += running
        converged |= running & same
        order = torch.where(running.unsqueeze(1), new_order, order)
        k = torch.where(running, new_k, k)
        members = torch.where(running.unsqueeze(1), new_members, members)
        running &= ~same
        if not bool(running.any()):
            break
    if stats is not None:
        stats.passes, stats.converged, stats.kept = passes, converged, k.clone()
    return order, k


def top_w(logits: torch.Tensor, unit: torch.Tensor, lam: torch.Tensor | float = 2.2,
          beta: torch.Tensor | float = 2.8, geom_scale: torch.Tensor | float = 0.6, top_m: int = 1200,
          init_top_p: torch.Tensor | float = 0.999, alt_iters: int = 9, potential: str = "nearest",
          stats: TopWStats | None = None) -> torch.Tensor:
    """Mask ``logits[B, V]`` (temperature-scaled) to each row's Top-W set, in place. Returns ``logits``.

    ``unit`` is :func:`unit_embeddings` of the model's input embeddings, [V, d]. Pass a :class:`TopWStats`
    as ``stats`` to learn the passes and kept-set sizes.
    """
    if potential not in POTENTIALS:
        raise ValueError(f"top_w potential must be one of {POTENTIALS}, got {potential!r}")
    if logits.dim() == 2 and unit.shape[0] != logits.shape[1]:
        raise ValueError(f"top_w: the embedding matrix has {unit.shape[0]} rows but the logits have "
                         f"{logits.shape[1]} columns; they must be the same vocabulary")
    return truncate_top_n(logits, top_m, lambda top: top_w_rule(top, unit, lam, beta, geom_scale, init_top_p,
                                                               alt_iters, potential, stats), "mass")
