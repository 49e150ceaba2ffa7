"""PyramidDrop: drop image tokens in stages inside the LLM, ranked by the last instruction
token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep
from tokensieve.core.ops import select, topk_indices
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import (
    LlmSchedule,
    ScoreSource,
    check_depth,
    check_layer_list,
    check_positions,
    geometric_counts,
    scaled_layers,
    solve_ratio,
)
from tokensieve.core.signals import Signals

#: The official stage boundaries (8, 16, 24) of the 32-layer LLaVA LLMs, as depth fractions.
OFFICIAL_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class PDropConfig(LlmSchedule):
    """Options (official defaults of the LLaVA-1.5 / LLaVA-NeXT configs).

    Attributes:
        layers: decoder layers at whose input a stage drops tokens; ``None``: the official
            (8, 16, 24) of a 32-layer LLM, i.e. a quarter, half and three quarters of the
            depth of the model at hand.
        ratio: lambda, the share of image tokens each stage keeps (0.5) when no ``keep``
            is given. With ``keep`` the ratio is solved so that the image keeps ``keep``
            tokens per LLM layer on average (the budget meaning of every multi-stage method).
        positions: "renumber" (official: the kept sequence gets contiguous position ids at
            every stage) or "keep" (original position ids with gaps).
    """

    scores: ClassVar[ScoreSource] = "own"

    layers: tuple[int, ...] | None = None
    ratio: float = 0.5
    positions: str = "renumber"

    def __post_init__(self) -> None:
        check_layer_list(self.layers, minimum=1)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (
                0 < self.ratio <= 1):
            raise ValueError(f"ratio={self.ratio!r}: expected a float in (0, 1]")
        check_positions(self.positions)

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        if self.layers is None:
            return scaled_layers(OFFICIAL_FRACTIONS, depth)
        return check_depth(self.layers, depth)

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        layers = self.cut_layers(depth)
        if keep is None:
            return geometric_counts(n, self.ratio, len(layers))
        target = resolve_keep(keep, n)
        return geometric_counts(n, solve_ratio(n, target, layers, depth), len(layers))


@register(
    "pdrop",
    paper="PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual "
          "Redundancy Reduction (Xing et al., CVPR 2025)",
    stage="llm", kind="subset", signals=("query_attn",), config=PDropConfig,
)
def pdrop(tokens: Tensor, k: int, signals: Signals, config: PDropConfig,
          generator: torch.Generator | None) -> Reduction:
    """One stage: the top-``k`` image tokens by the attention of the last instruction token.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` one image's remaining tokens per row.
        query_attn: ``[B, N]`` softmax(q_last k^T) of the stage's layer, from that layer's
            own input norm, q/k projections and rotary embedding (head-mean).

    In a model the stages run before each layer of ``layers``; each keeps
    ``round(N ratio^s)`` of the image's original ``N`` tokens.
    """
    scores = signals.layer("query_attn", "pdrop")
    if scores.dim() != 2:
        raise ValueError(f"query_attn: pdrop uses one query row ([B, N]); got shape "
                         f"{tuple(scores.shape)}")
    return select(tokens, topk_indices(scores, k))
