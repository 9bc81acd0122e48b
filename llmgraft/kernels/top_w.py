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

from .truncation import TopN, truncate_top_n

POTENTIALS = ("nearest", "matching")
_EPS = 1e-12


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


def _gather_rows(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``table[b, positions[b, k]]`` for a [B, m, d] table and [B, K] positions: [B, K, d]."""
    return table.gather(1, positions.unsqueeze(-1).expand(-1, -1, table.shape[2]))


def _first_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row of ``mask`` [B, m], padded: ([B, K] positions, [B, K] valid)."""
    count = mask.sum(1)
    width = max(int(count.max()), 1)
    positions = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    valid = torch.arange(width).unsqueeze(0) < count.unsqueeze(1)
    return positions, valid


class _NearestPotential:
    """max_{j∈S} cos(e_i, e_j) for i ∉ S, reusing every similarity column computed in earlier passes."""

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors          # [B, m, d] unit rows of each row's pool
        self.columns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, positions, sims)
        self.have = torch.zeros(vectors.shape[:2], dtype=torch.bool)  # full columns known, per row

    def first(self, members: torch.Tensor) -> torch.Tensor:
        """The first pass: only the block (i ∉ S) × (j ∈ S) is computed."""
        inner, inner_ok = _first_positions(members)
        outer, outer_ok = _first_positions(~members)
        sims = torch.bmm(_gather_rows(self.vectors, outer), _gather_rows(self.vectors, inner).transpose(1, 2))
        sims.masked_fill_(~inner_ok.unsqueeze(1), -torch.inf)
        best = torch.full(members.shape, 1.0)  # members: cos(e_i, e_i) = 1
        best.scatter_(1, outer, torch.where(outer_ok, sims.amax(2), 1.0))
        return best

    def update(self, active: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Passes after the first, for the rows ``active`` (indices) with their new ``members`` [A, m]."""
        new = members & ~self.have[active]
        if bool(new.any()):
            positions, valid = _first_positions(new)
            vectors = self.vectors[active]
            sims = torch.bmm(vectors, _gather_rows(vectors, positions).transpose(1, 2))  # [A, m, K]
            self.columns.append((active, positions.masked_fill(~valid, -1), sims))
            self.have[active] |= new
        best = torch.full(members.shape, -torch.inf)
        slot = torch.full((self.have.shape[0],), -1, dtype=torch.long)
        slot[active] = torch.arange(active.numel())
        for rows, positions, sims in self.columns:
            here = slot[rows]
            keep = here >= 0
            if not bool(keep.any()):
                continue
            here, positions, sims = here[keep], positions[keep], sims[keep]
            in_s = members[here].gather(1, positions.clamp(min=0)) & (positions >= 0)  # [A', K]
            part = sims.masked_fill(~in_s.unsqueeze(1), -torch.inf).amax(2)
            best[here] = torch.maximum(best[here], part)
        return best.masked_fill_(members, 1.0)


class _MatchingPotential:
    """The official, uncalled distance-matching potential (see the module docstring)."""

    def __init__(self, vectors: torch.Tensor):
        cos = torch.bmm(vectors, vectors.transpose(1, 2)).clamp_(-1.0, 1.0)
        self.distance = (2.0 - 2.0 * cos).clamp_(min=0.0).sqrt_()  # float32, as the official code
        self.distance.diagonal(dim1=1, dim2=2).zero_()

    def potential(self, rows: torch.Tensor, p: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        distance = self.distance[rows].double()
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

    vectors = unit.index_select(0, top.index.reshape(-1).to(unit.device)).cpu().view(batch, m, -1)
    nearest = potential == "nearest"
    field = _NearestPotential(vectors) if nearest else _MatchingPotential(vectors)
    passes = torch.zeros(batch, dtype=torch.long)
    converged = torch.zeros(batch, dtype=torch.bool)
    active = torch.arange(batch)
    for step in range(max(1, alt_iters)):
        if nearest:
            best = field.first(members) if step == 0 else field.update(active, members[active])
            f = -(1.0 - best.clamp_(-1.0, 1.0).double())
        else:
            f = field.potential(active, p[active], members[active])
        new_order, new_k = _prefix_scan(p[active], log_p[active], f, lam[active], beta[active],
                                        geom_scale[active])
        new_members = _members(new_order, new_k)
        same = (new_members == members[active]).all(1)
        passes[active] += 1
        converged[active] = same
        order[active], k[active], members[active] = new_order, new_k, new_members
        active = active[~same]
        if active.numel() == 0:
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
