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

Cost model, per row, with m = ``top_m`` and d the embedding width. The official code pays, per pass, the
nearest-set potential over the whole pool, m·|S|·d multiply-adds (|S₀| is the 0.999-mass warm start, often
most of the pool), up to 9 passes, one row at a time. Here:

* selection: the top m of V (``torch.topk``) and exact float64 probabilities of the pool, as every
  truncation sampler;
* the potential, only where it can change the next S (``_settled``): members of S have f = 0 exactly, and
  the scan's answer is provably independent of the f of tokens far less likely than S. The first pass
  then needs no similarity at all, later passes a (16 × |S|), (128 × |S|) or (512 × |S|) block of the
  most likely tokens (each tried while |S| is at most a quarter of it); rows where that does not settle it get the exact potential of the whole pool, computed as full
  similarity columns of the smaller side ((m - |S|) or |S| columns, m·d each), each column once per call,
  rows of similar widths batched into one matmul;
* the prefix scan: a sort of m values per pass; rows stop as soon as S repeats.

On the bundled code LM (V = 4096, m = 1200) a step settles in 2 passes without touching the embedding
table in the first, so the cost is about one top-1200 selection plus a few small matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .truncation import TopN, truncate_top_n

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

    passes: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    kept: torch.Tensor | None = None


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


def _groups(count: torch.Tensor, slack: float = 1.25, floor: int = 4) -> list[tuple[int, int]]:
    """Contiguous ranges [a, b) of rows sorted by ``count`` (> 0), each padded to its largest count at a cost
    within ``slack`` times its real work (plus ``floor`` per row): one batched matmul per range."""
    counts = count.tolist()
    ranges, a = [], 0
    while a < len(counts):
        b, top, total = a + 1, counts[a], counts[a]
        while b < len(counts):
            wider, more = max(top, counts[b]), total + counts[b]
            if wider * (b + 1 - a) > slack * more + floor * (b + 1 - a):
                break
            top, total, b = wider, more, b + 1
        ranges.append((a, b))
        a = b
    return ranges


class _NearestPotential:
    """max_{j∈S} cos(e_i, e_j) for the pool tokens i ∉ S of the rows that need it, exactly (1 on S).

    Only full similarity columns (one token against its row's whole pool) are computed, each once per call.
    A token i ∉ S is exact if its own column is known (max over S of the column) or if every member of S
    has its column (max over those columns). A row that needs values gets the columns of the smaller of
    the two sides that lack them, and rows of similar column counts share one batched matmul.
    """

    def __init__(self, unit: torch.Tensor, index: torch.Tensor):
        self.unit, self.index = unit, index
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, [g, K] positions, sims)
        self.have = torch.zeros(index.shape, dtype=torch.bool)

    def _add(self, new: torch.Tensor) -> None:
        """Full columns for the positions marked in ``new`` [B, m]."""
        count = new.sum(1)
        needing = count.nonzero().squeeze(1)
        if needing.numel() == 0:
            return
        needing = needing[torch.sort(count[needing], stable=True).indices]
        m, width = self.index.shape[1], self.unit.shape[1]
        for a, b in _groups(count[needing]):
            rows = needing[a:b]
            # Fresh memory, not a kept workspace: this path is rare, and a workspace sized for its largest
            # batch would stay resident in a server for good.
            vectors = self.unit.index_select(0, self.index[rows].reshape(-1)).view(-1, m, width)
            positions, valid = _first_positions(new.index_select(0, rows))
            sims = torch.bmm(vectors, _rows_at(vectors, positions).transpose(1, 2))  # [g, m, K]
            self.blocks.append((rows, positions.masked_fill(~valid, -1), sims))
        self.have |= new

    def __call__(self, members: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
        """[B, m]: max cosine to S (``members``) for the rows ``needed`` [B]; other rows' values are -inf."""
        inside = members & ~self.have
        outside = ~members & ~self.have
        exact = ~(inside.any(1) & outside.any(1))  # one side already complete
        fill_outside = outside.sum(1) < inside.sum(1)
        todo = (needed & ~exact).unsqueeze(1)
        self._add(torch.where(fill_outside.unsqueeze(1), outside, inside) & todo)
        best = torch.full(members.shape, -torch.inf)
        for rows, positions, sims in self.blocks:
            want = needed.index_select(0, rows)
            if not bool(want.any()):
                continue
            here = members.index_select(0, rows)
            valid = positions >= 0
            in_s = here.gather(1, positions.clamp(min=0)) & valid  # [g, K]
            by_members = torch.full(here.shape, -torch.inf)
            if bool(in_s.any()):  # max over the columns of S's members
                take, ok = _first_positions(in_s)
                picked = sims.gather(2, take.unsqueeze(1).expand(-1, sims.shape[1], -1))  # [g, m, K_in]
                by_members = picked.masked_fill_(~ok.unsqueeze(1), -torch.inf).amax(2)
            part = torch.full(here.shape, -torch.inf)
            if bool((valid & ~in_s).any()):  # each outside token's own column, max over S
                masked = torch.where(here.unsqueeze(2), sims, _NEG_INF)
                own = torch.where(valid & ~in_s, masked.amax(1), -torch.inf)  # [g, K]
                part.scatter_reduce_(1, positions.clamp(min=0), own, "amax")
            best[rows] = torch.maximum(best[rows], torch.maximum(by_members, part))
        return best.masked_fill_(members, 1.0)


class _MatchingPotential:
    """The official, uncalled distance-matching potential (see the module docstring)."""

    def __init__(self, unit: torch.Tensor, index: torch.Tensor):
        vectors = unit.index_select(0, index.reshape(-1)).view(*index.shape, -1)
        cos = torch.bmm(vectors, vectors.transpose(1, 2)).clamp_(-1.0, 1.0)
        distance = (2.0 - 2.0 * cos).clamp_(min=0.0).sqrt_()  # float32, as the official code
        distance.diagonal(dim1=1, dim2=2).zero_()
        self.distance = distance.double()  # the official matching sums run in float64

    def potential(self, p: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        distance = self.distance
        gamma = (p * members).sum(1, keepdim=True).clamp(_EPS, 1.0 - _EPS)
        a = torch.where(members, p / gamma, 0.0)
        b = torch.where(members, 0.0, p / (1.0 - gamma).clamp(_EPS, 1.0))
        g = torch.bmm(distance, (b - a).unsqueeze(2)).squeeze(2)
        f = (g.unsqueeze(1) + distance).amin(2)
        count = members.sum(1, keepdim=True)
        return torch.where((count == 0) | (count == members.shape[1]), 0.0, f)


#: Pool prefixes tried, in order, before the exact potential of the whole pool (see ``_settled``).
_PREFIXES = (16, 128, 512)


def _settled(p: torch.Tensor, log_p: torch.Tensor, f: torch.Tensor, known: torch.Tensor, lam: torch.Tensor,
             beta: torch.Tensor, geom_scale: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows whose next S is the same for every f in [-2, 0] of the tokens not ``known``.

    ``f`` is exact where ``known`` (members of S have f = 0 exactly: their own cosine is 1). A token that is
    not known has φ ≤ λ log p ≤ φ_U, the bound of the most likely of them (the pool is in p order). The
    known tokens with φ > φ_U, call them K, sort before every other token whatever their f, and the scores
    of all prefixes within K are known. Let A be K's p-weighted mean φ, Γ its mass and P the pool's mass
    outside K (all of it with φ ≤ φ_U). Appending outside mass x to the whole of K changes the score by at
    most -(A - φ_U)·x/(Γ + P) + max(β - λ, 0)·x/Γ, never positive when A - φ_U ≥ max(β - λ, 0)·(Γ + P)/Γ.
    Then no prefix reaching outside K beats the best prefix within it, and the unknown f do not matter.

    For a real LM this holds at nearly every step, with K = the warm start itself in the first pass (no
    similarity at all) and K = S plus its most likely neighbours later (a few similarities), which removes
    the m·|S|·d work of the nearest-set potential.
    """
    m = p.shape[1]
    phi = geom_scale * f + lam * log_p
    unknown = ~known
    first_unknown = torch.where(unknown, torch.arange(m).unsqueeze(0), m).amin(1, keepdim=True)
    bound = lam * log_p.gather(1, first_unknown.clamp(max=m - 1))
    core = (known & (phi > bound)).double()
    mass = (p * core).sum(1, keepdim=True)
    rest = p.sum(1, keepdim=True) - mass
    mean_phi = (p * phi * core).sum(1, keepdim=True) / mass.clamp(min=_EPS)
    gain = (beta - lam).clamp(min=0.0) * (mass + rest) / mass.clamp(min=_EPS)
    holds = (mass > 0) & (mean_phi - bound >= gain * (1.0 + 1e-9) + 1e-12)
    return (first_unknown >= m).squeeze(1) | holds.squeeze(1)


def _head_potential(unit: torch.Tensor, index: torch.Tensor, members: torch.Tensor, head: int) -> torch.Tensor:
    """[R, head] max cosine to S of the first ``head`` pool tokens (1 on S): a (head × |S|) block per row."""
    positions, valid = _first_positions(members)
    width = unit.shape[1]
    rows = torch.arange(len(index)).unsqueeze(1)
    inner = unit.index_select(0, index[rows, positions].reshape(-1)).view(len(index), -1, width)
    outer = unit.index_select(0, index[:, :head].reshape(-1)).view(len(index), head, width)
    sims = torch.bmm(outer, inner.transpose(1, 2)).masked_fill_(~valid.unsqueeze(1), -torch.inf)
    return sims.amax(2).masked_fill_(members[:, :head], 1.0)


def _nearest_f(field: _NearestPotential, unit, index, p, log_p, members, running, lam, beta, geom_scale):
    """f of the nearest-set potential for the running rows: exact where it can change the next S.

    Members have f = 0; rows are first tried with the f of only the pool's first ``_PREFIXES`` tokens
    (``_settled``), and only the rows that stay unsettled get the exact potential of their whole pool.
    Tokens whose f cannot matter get -2 (any value in [-2, 0] gives the same next S)."""
    m = p.shape[1]
    best = torch.where(members, 1.0, -1.0)
    known = members.clone()
    open_rows = running & ~_settled(p, log_p, -(1.0 - best.double()), known, lam, beta, geom_scale)
    size = members.sum(1)
    for head in _PREFIXES:
        if head >= m or not bool(open_rows.any()):
            break
        # A head block only pays while S is small beside it; rows with large S go to the exact potential.
        rows = (open_rows & (size * 4 <= head)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        best[rows, :head] = _head_potential(unit, index[rows], members[rows], head)
        known[rows, :head] = True
        f = -(1.0 - best.double())
        open_rows[rows] = ~_settled(p[rows], log_p[rows], f[rows], known[rows], lam[rows], beta[rows],
                                    geom_scale[rows])
    if bool(open_rows.any()):
        exact = field(members, open_rows)
        best = torch.where(open_rows.unsqueeze(1), exact, best)
    return -(1.0 - best.clamp_(-1.0, 1.0).double())


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

    unit = unit.cpu()  # this reference kernel runs on the CPU whatever the logits' device (GPU path: issue #8)
    index = top.index.reshape(batch, m).cpu()
    nearest = potential == "nearest"
    field = _NearestPotential(unit, index) if nearest else _MatchingPotential(unit, index)
    passes = torch.zeros(batch, dtype=torch.long)
    converged = torch.zeros(batch, dtype=torch.bool)
    running = torch.ones(batch, dtype=torch.bool)
    for _ in range(max(1, alt_iters)):
        if nearest:
            f = _nearest_f(field, unit, index, p, log_p, members, running, lam, beta, geom_scale)
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
