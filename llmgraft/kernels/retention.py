"""Shared machinery of token retention (PromptDistill, GemFilter, last-k windows), pure torch.

A retention method only scores the prompt tokens of a layer (``llmgraft.Attention.score``); everything
else is here and is the same for every method:

* :func:`keep_counts`: how many tokens each row keeps, from a count ``k`` or a keep ratio;
* :func:`select_tokens`: each row's top-k scored valid tokens (plus its last one, for methods that always
  keep it), in their original order, padded to one width with the row's own padding positions;
* :func:`gather_tokens`: slice any per-token tensor (hidden states, rotary cos/sin, position ids, masks,
  cached keys) to the kept indices;
* :func:`last_query_logits` and :func:`pool_scores`: the grouped-query dot products and the average
  pooling that attention-based methods build their scores from.

Batches are left-padded: ``valid[b, t]`` is False on padding, and each row's last valid position is its
last prompt token.
"""

from __future__ import annotations

import torch


def last_valid(valid: torch.Tensor) -> torch.Tensor:
    """Index [B] of each row's last valid position (its last prompt token)."""
    length = valid.shape[1]
    return (length - 1) - valid.flip(1).to(torch.int8).argmax(1)


def keep_counts(valid: torch.Tensor, keep: int | float, keeps_last: bool = True) -> torch.Tensor:
    """Tokens [B] each row selects by score. A count ``keep`` (int) is taken as is: besides the forced last
    token when ``keeps_last`` (PromptDistill's k), else in total (GemFilter's k). A ratio (float in (0, 1])
    keeps ``ceil(keep * n)`` of a row's n prompt tokens in all. Capped at what the row has."""
    n = valid.sum(1)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int count or a float ratio, got {keep!r}")
    if isinstance(keep, int):
        k = torch.full_like(n, keep)
    else:
        k = torch.ceil(n.double() * keep - 1e-9).long() - int(keeps_last)
    return torch.minimum(k.clamp_min(0), n - int(keeps_last))


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor,
                  keeps_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per row, the ``k[b]`` best-scored valid tokens (other than the last one, which is then added,
    when ``keeps_last``).

    Returns ``(indices, kept)``, both [B, K] with K the widest row's count: ``indices`` are positions in
    [0, T), ascending in each row (original order); ``kept`` is False where a narrower row is padded with
    its own padding positions, which stay masked. Ties are broken by ``torch.topk``.
    """
    batch, length = scores.shape
    last = last_valid(valid)
    rows = torch.arange(batch, device=scores.device)
    ranked = scores.float().masked_fill(~valid, float("-inf"))
    if keeps_last:
        ranked[rows, last] = float("-inf")
    width = int(k.max()) + int(keeps_last)
    chosen = torch.zeros(batch, length, dtype=torch.bool, device=scores.device)
    picks = width - int(keeps_last)
    if picks > 0:
        top = ranked.topk(picks, dim=1).indices  # each position once per row, so scatter never un-sets one
        chosen.scatter_(1, top, torch.arange(picks, device=scores.device) < k[:, None])
    if keeps_last:
        chosen[rows, last] = True
    short = width - chosen.sum(1)
    if bool((short > 0).any()):
        # Fill the remaining slots with the row's first padding positions.
        pad_rank = (~valid).long().cumsum(1)
        fill = ~valid & (pad_rank <= short[:, None])
        if bool((fill.sum(1) < short).any()):
            raise ValueError("a row has too few padding positions to pad its kept tokens to the batch width")
        chosen |= fill
    indices = chosen.nonzero()[:, 1].view(batch, width)
    return indices, valid.gather(1, indices)


def pool_scores(scores: torch.Tensor, valid: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pool [B, T] scores along T (stride 1, padding kernel // 2, zeros counted in the divisor, as
    ``avg_pool1d``'s default), with padding positions read as 0: a left-padded row pools as it would alone."""
    x = scores.masked_fill(~valid, 0.0)[:, None]
    return torch.nn.functional.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)[:, 0]


def gather_tokens(x: torch.Tensor, indices: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` with its token dimension ``dim`` (size T) sliced to ``indices`` [B, K] (batch is dim 0; a
    batch-1 ``x`` is broadcast to B rows)."""
    batch, width = indices.shape
    shape = list(x.shape)
    shape[0], shape[dim] = batch, width
    view = [batch] + [1] * (x.dim() - 1)
    view[dim] = width
    index = indices.view(view).expand(shape)
    source = x.expand([batch] + list(x.shape[1:])) if x.shape[0] == 1 and batch > 1 else x
    return source.gather(dim, index)


def last_query_logits(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Dot products [B, H, Q, T] of queries [B, H, Q, D] with grouped keys [B, Hkv, T, D] (query head h
    reads kv head h // (H // Hkv), as ``repeat_kv`` lays them out), in float32 or wider; unscaled."""
    batch, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key heads")
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype).view(batch, kv_heads, heads // kv_heads, -1, dim)
    return (q @ keys.to(dtype).unsqueeze(2).transpose(-1, -2)).view(batch, heads, -1, keys.shape[2])
