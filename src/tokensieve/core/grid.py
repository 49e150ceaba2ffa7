"""Helpers for tokens laid out on a 2D patch grid (raster order)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.core.signals import Partitions


def target_grid(k: int, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The ``(h, w)`` with ``h * w == k``, ``h <= H``, ``w <= W`` closest in aspect to ``grid``.

    Returns ``None`` when no such factorisation exists within a factor 2 of the grid's
    aspect ratio (e.g. a prime ``k``).
    """
    big_h, big_w = grid
    best: tuple[float, tuple[int, int]] | None = None
    for h in range(1, min(k, big_h) + 1):
        if k % h:
            continue
        w = k // h
        if w > big_w:
            continue
        off = abs((h / w) / (big_h / big_w) - 1.0) if (h / w) >= (big_h / big_w) else abs(
            (big_h / big_w) / (h / w) - 1.0)
        if best is None or off < best[0]:
            best = (off, (h, w))
    if best is None or best[0] > 1.0:
        return None
    return best[1]


def valid_grid_counts(grid: tuple[int, int], around: int, n: int = 3) -> list[int]:
    """Up to ``n`` counts near ``around`` that ``target_grid`` accepts (for error hints)."""
    cands = [c for c in range(1, grid[0] * grid[1] + 1) if target_grid(c, grid) is not None]
    return sorted(sorted(cands, key=lambda c: abs(c - around))[:n])


def partition_budgets(partitions: Partitions, k: int, method: str) -> tuple[Tensor, Tensor]:
    """Split a budget of ``k`` over anyres partitions in proportion to their sizes.

    Tokens with id ``-1`` are always kept and count towards ``k``; the rest of the
    budget is shared by largest remainder, so the total is exactly ``k``.

    Returns:
        ``(budget [B, P+1], always [B, N] bool)``: the budget of partition ``p`` in
        column ``p`` (0 = overview image) and the always-kept mask.
    """
    ids = partitions.ids
    b = ids.shape[0]
    num = partitions.num_crops + 1
    always = ids < 0
    n_always = always.sum(dim=1)
    if bool((n_always > k).any()):
        raise ValueError(f"method {method!r}: keep={k} is smaller than the {int(n_always.max())} "
                         "always-kept tokens (e.g. image newlines) of the anyres layout")
    sizes = torch.zeros(b, num, dtype=torch.long, device=ids.device)
    sizes.scatter_add_(1, ids.clamp(min=0), (~always).long())
    rest = (k - n_always).float()
    share = sizes.float() * (rest / sizes.sum(dim=1).clamp(min=1)).unsqueeze(1)
    budget = share.floor().long()
    short = (rest.long() - budget.sum(dim=1))
    frac_order = torch.argsort(share - budget, dim=1, descending=True, stable=True)
    bonus = (torch.arange(num, device=ids.device).unsqueeze(0) < short.unsqueeze(1)).long()
    budget.scatter_add_(1, frac_order, bonus)
    return torch.minimum(budget, sizes), always


def topk_per_partition(scores: Tensor, budget: Tensor, partitions: Partitions,
                       always: Tensor) -> Tensor:
    """Ascending indices ``[B, K]`` keeping the top ``budget[b, p]`` scores of each partition
    plus every always-kept token. Every row must keep the same total ``K``."""
    keep = topk_per_partition_mask(scores, budget, partitions, always)
    total = keep.sum(dim=1)
    if bool((total != total[0]).any()):
        raise ValueError(
            f"per-partition budgets give different counts per sample: {total.tolist()}")
    return torch.nonzero(keep)[:, 1].reshape(keep.shape[0], -1)


def topk_per_partition_mask(scores: Tensor, budget: Tensor, partitions: Partitions,
                            always: Tensor) -> Tensor:
    """``[B, N]`` bool: the top ``budget[b, p]`` scores of each partition (ties: lower
    position) plus every always-kept token; rows may keep different counts."""
    # Always-kept tokens go to an extra bucket with no budget, so they never take a rank.
    ids = torch.where(always, partitions.num_crops + 1, partitions.ids)
    budget = torch.cat([budget, torch.zeros_like(budget[:, :1])], dim=1)
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    order = torch.gather(order, 1, torch.sort(torch.gather(ids, 1, order), dim=1,
                                              stable=True).indices)
    sorted_ids = torch.gather(ids, 1, order)
    counts = torch.zeros_like(budget)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    starts = torch.cumsum(counts, dim=1) - counts
    rank = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) - torch.gather(
        starts, 1, sorted_ids)
    keep_sorted = rank < torch.gather(budget, 1, sorted_ids)
    return torch.zeros_like(always).scatter(1, order, keep_sorted) & ~always | always
