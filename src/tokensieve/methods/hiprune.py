"""HiPrune: anchors from a middle encoder layer, their grid neighbours, deep-layer registers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.ops import select, topk_indices
from tokensieve.core.options import Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals, infer_grid
from tokensieve.methods._layers import pick_layer


@dataclass(frozen=True)
class HiPruneConfig:
    """HiPrune options.

    Attributes:
        alpha: share of the budget spent on anchors and their buffers; there are
            ``round(keep * alpha / 5)`` anchors (each brings up to 4 buffers).
        object_layer: the layer of ``attn_received`` ``[B, L, N]`` that picks anchors
            (the object layer: CLIP layer 9, Qwen2.5-VL layer 16).
        deep_layer: the layer of ``attn_received`` that ranks registers (the feature
            layer). The default layout is ``[B, 2, N]`` = (object layer, deep layer).
        wrap: official neighbours ``idx +- 1, idx +- W`` clamped to ``[0, N-1]``, so
            ``+-1`` wraps across rows (and out-of-grid neighbours of border anchors
            become token 0 or N-1). ``False``: the true 4-neighbours on the grid only.
    """

    alpha: Share = 0.1
    object_layer: int = 0
    deep_layer: int = -1
    wrap: bool = True


def buffer_mask(anchors: Tensor, n: int, width: int, wrap: bool) -> Tensor:
    """``[B, N]`` bool: the anchors ``[B, A]`` and their 4-neighbours on a width-``W`` grid.

    ``wrap=True`` reproduces the official arithmetic (``a +- 1``, ``a +- W``, clamped to
    ``[0, N-1]``); ``wrap=False`` keeps only neighbours inside the grid, in the same row
    for ``+-1``.
    """
    b = anchors.shape[0]
    offsets = torch.tensor([0, -1, 1, -width, width], device=anchors.device)
    cand = anchors.unsqueeze(-1) + offsets  # [B, A, 5]
    if wrap:
        cand = cand.clamp(0, n - 1)
    else:
        col = (anchors % width).unsqueeze(-1)
        valid = (cand >= 0) & (cand < n)
        valid[..., 1] &= col[..., 0] > 0
        valid[..., 2] &= col[..., 0] < width - 1
        cand = torch.where(valid, cand, n)  # n = a dummy column dropped below
    mask = torch.zeros(b, n + 1, dtype=torch.bool, device=anchors.device)
    mask.scatter_(1, cand.reshape(b, -1), True)
    return mask[:, :n]


@register(
    "hiprune",
    paper="HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in "
          "Vision Encoders (2025)",
    stage="pre-llm", kind="subset", signals=("attn_received",), optional_signals=("grid",),
    config=HiPruneConfig, features="vision",
)
def hiprune(tokens: Tensor, k: int, signals: Signals, config: HiPruneConfig,
            generator: torch.Generator | None) -> Reduction:
    """HiPrune on ``tokens`` ``[B, N, D]`` laid out on ``grid`` (square inferred).

    ``attn_received``: ``[B, L, N]`` head- and query-mean attention each patch receives
    (CLS column excluded), per encoder layer; ``object_layer`` / ``deep_layer`` pick the
    two layers (default layout ``[B, 2, N]``; ``[B, N]`` serves both roles).

    Anchors: the top ``round(keep * alpha / 5)`` tokens by the object layer. Buffers:
    their 4-neighbours (see ``wrap``). Registers: the rest of the budget, the best
    deep-layer tokens not yet kept. Exactly ``keep`` tokens, in raster order.
    """
    if not 0.0 <= config.alpha <= 1.0:
        raise ValueError(f"hiprune: alpha={config.alpha!r}; expected a share in [0, 1]")
    n = tokens.shape[1]
    _, width = infer_grid(n, signals.grid, "hiprune")
    attn = signals.require("attn_received", "hiprune")
    assert isinstance(attn, Tensor)
    obj = pick_layer(attn, config.object_layer, "object_layer", "attn_received", "hiprune")
    deep = pick_layer(attn, config.deep_layer, "deep_layer", "attn_received", "hiprune")
    n_anchor = round(k * config.alpha / 5)  # Python round, as in the official code
    if n_anchor == 0:
        return select(tokens, topk_indices(deep, k))
    anchors = topk_indices(obj, n_anchor)
    chosen = buffer_mask(anchors, n, width, config.wrap)
    n_chosen = chosen.sum(dim=1)
    if bool((n_chosen > k).any()):
        raise ValueError(f"hiprune: keep={k} is smaller than the {int(n_chosen.max())} anchors "
                         f"and buffers that alpha={config.alpha} selects; lower alpha")
    return select(tokens, topk_indices(torch.where(chosen, float("inf"), deep), k))
