"""Anyres helpers shared by the budget-allocating methods (HiRED, GlobalCom2).

An anyres token set holds an overview image (partition 0) and ``P = rows * cols`` crops
(partitions ``1..P``, raster order of the tiling), each an ``H x W`` grid in raster
order, plus always-kept tokens (id ``-1``, e.g. image newlines); see ``Partitions``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.core.signals import Partitions


def partition_positions(partitions: Partitions, method: str) -> Tensor:
    """Source positions ``[B, P+1, H*W]`` of every partition's tokens, in raster order.

    Raises ``ValueError`` unless ids are in ``[-1, P]`` and every partition holds exactly
    ``H * W`` tokens.
    """
    ids = partitions.ids
    b, n = ids.shape
    num = partitions.num_crops + 1
    per = partitions.grid[0] * partitions.grid[1]
    if bool(((ids < -1) | (ids > num - 1)).any()):
        raise ValueError(f"{method}: partitions.ids must be in [-1, {num - 1}] for tiling "
                         f"{partitions.tiling}, got values in [{int(ids.min())}, "
                         f"{int(ids.max())}]")
    counts = torch.zeros(b, num + 1, dtype=torch.long, device=ids.device)
    counts.scatter_add_(1, torch.where(ids < 0, num, ids), torch.ones_like(ids))
    if bool((counts[:, :num] != per).any()):
        raise ValueError(f"{method}: every partition must hold grid {partitions.grid} = {per} "
                         f"tokens; got counts {counts[:, :num].tolist()}")
    # Group by partition (always-kept last), ascending position inside each group.
    key = torch.where(ids < 0, num, ids) * n + torch.arange(n, device=ids.device)
    order = torch.argsort(key, dim=1)
    return order[:, :num * per].reshape(b, num, per)


def crop_regions(grid: tuple[int, int], tiling: tuple[int, int], mode: str,
                 device: torch.device | str = "cpu") -> Tensor:
    """The crop (``0..P-1``) whose area each overview token ``[H*W]`` covers.

    ``mode="2d"``: true 2D regions of the tiling; row ``i`` falls in tile row
    ``min(i // max(H // rows, 1), rows - 1)`` (columns likewise), as GlobalCom2 computes
    them. ``mode="rowmajor"``: the raster sequence is cut into ``P`` equal consecutive
    chunks (``token * P // (H*W)``), which is what HiRED's reshape of the flat overview
    map into ``(rows, cols, -1)`` does.
    """
    h, w = grid
    rows, cols = tiling
    if mode == "rowmajor":
        return torch.arange(h * w, device=device) * (rows * cols) // (h * w)
    if mode != "2d":
        raise ValueError(f"mode={mode!r}: expected '2d' or 'rowmajor'")
    r = (torch.arange(h, device=device) // max(h // rows, 1)).clamp(max=rows - 1)
    c = (torch.arange(w, device=device) // max(w // cols, 1)).clamp(max=cols - 1)
    return (r.unsqueeze(1) * cols + c.unsqueeze(0)).reshape(-1)


def fill_to_total(target: Tensor, cap: Tensor, total: Tensor) -> Tensor:
    """Integer budgets ``[B, P]`` that add up to ``total`` ``[B]`` exactly.

    Starts from ``min(floor(target), cap)``; the missing tokens go to the partitions
    with spare capacity: first an even share each when many are missing (tokens a full
    partition cannot take), then one each in order of the largest fractional part of
    ``target`` (ties: lower partition first). Requires ``sum(cap) >= total``.
    """
    target = target.double()
    budget = torch.minimum(target.floor().long(), cap)
    frac = target - target.floor()
    order = torch.argsort(-frac, dim=1, stable=True)
    for _ in range(target.shape[1] + 2):
        deficit = (total - budget.sum(dim=1)).clamp(min=0)
        if not bool((deficit > 0).any()):
            break
        spare = cap - budget
        n_spare = (spare > 0).sum(dim=1).clamp(min=1)
        budget = budget + torch.minimum(spare, (deficit // n_spare).unsqueeze(1))
        deficit = (total - budget.sum(dim=1)).clamp(min=0)
        spare_sorted = torch.gather(cap - budget, 1, order) > 0
        rank = torch.cumsum(spare_sorted.long(), dim=1)
        bonus_sorted = (spare_sorted & (rank <= deficit.unsqueeze(1))).long()
        budget = budget.scatter_add(1, order, bonus_sorted)
    if bool((budget.sum(dim=1) != total).any()):
        raise ValueError(f"budget {total.tolist()} exceeds the partitions' capacity "
                         f"{cap.sum(dim=1).tolist()}")
    return budget


def scatter_partition_scores(scores: Tensor, positions: Tensor, n: int) -> Tensor:
    """Per-partition scores ``[B, P+1, H*W]`` back to token positions ``[B, N]`` (float32;
    positions not covered, i.e. always-kept tokens, get 0)."""
    b = scores.shape[0]
    out = torch.zeros(b, n, dtype=torch.float32, device=scores.device)
    return out.scatter(1, positions.reshape(b, -1), scores.float().reshape(b, -1))
