"""FoPru: focal pruning by encoder-attention token significance (rank or row strategy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokensieve.core.ops import select, topk_indices
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals, infer_grid

MODES = ("rank", "row")
SCORES = ("attn_received", "cls_attn")


@dataclass(frozen=True)
class FoPruConfig:
    """FoPru options.

    Attributes:
        mode: "rank" (global top-``k`` by significance) or "row" (keep whole grid rows).
        score: the token significance. "attn_received" (preferred): the attention each
            token receives, averaged over heads and queries, of the penultimate encoder
            layer. The paper averages the head-mean attention map along both axes and
            keeps the vector with the larger variance; for post-softmax attention the
            per-query mean is the constant 1/N, so that is the received attention.
            "cls_attn": the CLS row only. With ``[B, L, N]`` the last layer is used.
    """

    mode: Literal["rank", "row"] = "rank"
    score: Literal["attn_received", "cls_attn"] = "attn_received"

    def required_signals(self) -> tuple[str, ...]:
        """The ``score`` signal (``grid`` stays optional: a square grid is inferred)."""
        return (self.score,)


def row_indices(significance: Tensor, k: int, grid: tuple[int, int]) -> Tensor:
    """FoPru's row strategy: ascending indices ``[B, k]`` on an ``H x W`` raster grid.

    Rows are ranked by their summed significance; the ``k // W`` best rows are kept
    whole. The remaining ``k mod W`` tokens are the most significant single tokens of
    the other rows (so exactly ``k`` tokens are kept).
    """
    b = significance.shape[0]
    h, w = grid
    s = significance.float()
    full = k // w
    row_score = s.reshape(b, h, w).sum(dim=2)
    rows = topk_indices(row_score, full)  # [B, full]
    in_row = torch.zeros(b, h, dtype=torch.bool, device=s.device).scatter_(1, rows, True)
    keep_mask = in_row.repeat_interleave(w, dim=1)  # [B, N]
    # Kept rows rank first (+inf); the rest compete by significance for the remainder.
    return topk_indices(torch.where(keep_mask, float("inf"), s), k)


@register(
    "fopru",
    paper="FoPru: Focal Pruning for Efficient Large Vision-Language Models "
          "(Jiang et al., 2024)",
    stage="pre-llm", kind="subset", signals=("attn_received",),
    optional_signals=("cls_attn", "grid"),
    config=FoPruConfig, features="vision",
)
def fopru(tokens: Tensor, k: int, signals: Signals, config: FoPruConfig,
          generator: torch.Generator | None) -> Reduction:
    """Keep ``k`` of ``tokens`` ``[B, N, D]`` by encoder-attention significance ``[B, N]``.

    "rank": the ``k`` most significant tokens. "row": whole rows of the ``grid`` (square
    inferred when not given) with the highest summed significance, filled up to ``k``
    with the most significant tokens of the other rows (see :func:`row_indices`). Kept
    tokens are returned in their original order.
    """
    if config.mode not in MODES:
        raise ValueError(f"fopru: mode={config.mode!r}; expected one of {MODES}")
    if config.score not in SCORES:
        raise ValueError(f"fopru: score={config.score!r}; expected one of {SCORES}")
    significance = signals.layer(config.score, "fopru")
    if config.mode == "rank":
        return select(tokens, topk_indices(significance, k))
    grid = infer_grid(tokens.shape[1], signals.grid, "fopru")
    return select(tokens, row_indices(significance, k, grid))
