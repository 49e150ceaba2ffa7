"""HiRED: share an anyres token budget by where the overview image's CLS attention falls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokensieve.core.grid import topk_per_partition_mask
from tokensieve.core.ops import select, select_mask, topk_indices
from tokensieve.core.options import Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Partitions, Signals
from tokensieve.methods._anyres import crop_regions, fill_to_total, partition_positions
from tokensieve.methods._layers import pick_layer

REGIONS = ("rowmajor", "2d")


@dataclass(frozen=True)
class HiREDConfig:
    """HiRED options (the official ``rate`` is ``keep`` here).

    Attributes:
        alpha: the overview image's share of the budget (capped at its token count); the
            allocation map is the top ``floor(H*W*(1 - alpha))`` overview tokens.
        alloc_layer: layer of ``cls_attn`` ``[B, L, N]`` that allocates the crop budgets
            (official: CLIP layer 0).
        select_layer: layer of ``cls_attn`` that selects tokens inside every partition
            (official: CLIP layer 22). Default layout ``[B, 2, N]`` = (layer 0, layer 22).
        regions: how overview tokens map to crops. "rowmajor" (official quirk: the flat
            overview map is reshaped row-major into ``(rows, cols, -1)``, so crop ``i``
            gets the ``i``-th band of ``H*W / P`` consecutive raster tokens) or "2d"
            (corrected: the crop's true 2D area of the overview).
        exact_budget: ``False`` (official): every share is floored as in the official code
            (``int(T * alpha)`` for the overview, ``int(share * sub_budget)`` per crop, the
            crops' budget capped at their capacity), so fewer than ``keep`` tokens may come
            out (per sample; a batch is then padded, see ``Reduction.mask``). ``True``: the
            floors are completed to exactly ``keep`` by largest remainder, and a crop
            budget the crops cannot hold goes back to the overview.
    """

    alpha: Share = 0.5
    alloc_layer: int = 0
    select_layer: int = -1
    regions: Literal["rowmajor", "2d"] = "rowmajor"
    exact_budget: bool = False


def hired_budgets(early: Tensor, partitions: Partitions, k: int, alpha: float,
                  regions: str, exact_budget: bool = False) -> tuple[Tensor, Tensor]:
    """Per-partition budgets ``[B, P+1]`` (column 0: overview) and the always-kept mask.

    ``early``: ``[B, N]`` early-layer CLS attention. With ``T = k - #always-kept``:
    overview ``min(floor(T * alpha), H*W)``; the crops share ``min(T - overview, P*H*W)``
    in proportion to how many of the overview's top ``floor(H*W*(1 - alpha))``
    early-attention tokens fall in their region.

    Rounding (``exact_budget=False``, official): each crop gets ``int(ratio * share)``
    computed in float32 as the official torch code does, capped at ``H*W``; tokens lost
    to the floors or the caps are not kept. ``exact_budget=True``: the shares are
    completed to exactly ``T`` by :func:`fill_to_total` (largest remainder, each crop
    capped at ``H*W``, overflow back to the overview).
    """
    ids = partitions.ids
    always = ids < 0
    n_always = always.sum(dim=1)
    if bool((n_always > k).any()):
        raise ValueError(f"hired: keep={k} is smaller than the {int(n_always.max())} "
                         "always-kept tokens (e.g. image newlines) of the anyres layout")
    pos = partition_positions(partitions, "hired")
    per, n_crops = pos.shape[2], partitions.num_crops
    total = k - n_always
    full = (total.double() * alpha).floor().long().clamp(max=per)
    sub = total - full
    overflow = (sub - n_crops * per).clamp(min=0)
    sub = sub - overflow
    if exact_budget:
        full = full + overflow
    overview_early = torch.gather(early, 1, pos[:, 0])  # [B, H*W]
    n_map = int(per * (1.0 - alpha))
    in_map = torch.zeros_like(overview_early, dtype=torch.bool)
    in_map.scatter_(1, topk_indices(overview_early, n_map), True)
    region = crop_regions(partitions.grid, partitions.tiling, regions, early.device)
    counts = torch.zeros(ids.shape[0], n_crops, dtype=torch.float64, device=early.device)
    counts.scatter_add_(1, region.expand_as(in_map), in_map.double())
    area = torch.bincount(region, minlength=n_crops).double().expand_as(counts)
    # An empty map (alpha = 1) carries no preference: share by region area instead.
    weight = torch.where(counts.sum(dim=1, keepdim=True) > 0, counts, area)
    if not exact_budget:
        ratio = weight.float() / weight.float().sum(dim=1, keepdim=True)
        crops = (ratio * sub.float().unsqueeze(1)).long().clamp(max=per)
        return torch.cat([full.unsqueeze(1), crops], dim=1), always
    target = weight / weight.sum(dim=1, keepdim=True) * sub.unsqueeze(1)
    cap = torch.full_like(full, per).unsqueeze(1).expand(-1, n_crops)
    crops = fill_to_total(target, cap, sub)
    return torch.cat([full.unsqueeze(1), crops], dim=1), always


@register(
    "hired",
    paper="HiRED: Attention-Guided Token Dropping for Efficient Inference of "
          "High-Resolution Vision-Language Models (Arif et al., AAAI 2025)",
    stage="pre-llm", kind="subset", signals=("partitions", "cls_attn"), config=HiREDConfig,
    features="vision",
)
def hired(tokens: Tensor, k: int, signals: Signals, config: HiREDConfig,
          generator: torch.Generator | None) -> Reduction:
    """HiRED on an anyres token set ``tokens`` ``[B, N, D]`` with ``partitions``.

    ``cls_attn``: ``[B, L, N]`` head-mean CLS attention of every token within its own
    partition's encoder pass; ``alloc_layer`` (early) allocates budgets (see
    :func:`hired_budgets`) and ``select_layer`` (deep) picks the top tokens of every
    partition. ``[B, N]`` serves both roles. Always-kept tokens are kept and count
    towards ``keep``. Kept tokens come out in original order.

    Count: by default (official rounding) at most ``keep`` tokens, fewer when the floors
    lose some; samples with different counts are padded (``mask``). ``exact_budget=True``:
    exactly ``keep``. ``keep = N`` keeps every token (the official code skips selection at
    rate 1.0).
    """
    if not 0.0 <= config.alpha <= 1.0:
        raise ValueError(f"hired: alpha={config.alpha!r}; expected a share in [0, 1]")
    if config.regions not in REGIONS:
        raise ValueError(f"hired: regions={config.regions!r}; expected one of {REGIONS}")
    partitions = signals.require("partitions", "hired")
    cls_attn = signals.require("cls_attn", "hired")
    assert isinstance(partitions, Partitions) and isinstance(cls_attn, Tensor)
    early = pick_layer(cls_attn, config.alloc_layer, "alloc_layer", "cls_attn", "hired")
    deep = pick_layer(cls_attn, config.select_layer, "select_layer", "cls_attn", "hired")
    if k >= tokens.shape[1]:
        return select(tokens, torch.arange(k, device=tokens.device).expand(tokens.shape[0], -1))
    budget, always = hired_budgets(early, partitions, k, config.alpha, config.regions,
                                   config.exact_budget)
    return select_mask(tokens, topk_per_partition_mask(deep, budget, partitions, always))
