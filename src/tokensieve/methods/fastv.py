"""FastV: after layer K-1, keep the image tokens the last prompt token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.ops import select, topk_indices
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import (
    LlmSchedule,
    check_layer,
    check_positions,
    single_cut,
    single_cut_count,
)
from tokensieve.core.signals import Signals


@dataclass(frozen=True)
class FastVConfig(LlmSchedule):
    """Options (official defaults: K=2, R=50 %, original positions).

    Attributes:
        layer: K, the first decoder layer that sees only the kept image tokens; the scores
            are the attention of layer K-1 (as the official code reads it).
        ratio: R, the share of image tokens removed when no ``keep`` is given
            (``round(N (1 - R))`` stay).
        positions: "keep" (official: kept tokens keep their position ids, with gaps) or
            "renumber" (contiguous positions after the cut).
    """

    layer: int = 2
    ratio: float = 0.5
    positions: str = "keep"

    def __post_init__(self) -> None:
        check_layer("layer", self.layer, minimum=1)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (
                0 <= self.ratio < 1):
            raise ValueError(f"ratio={self.ratio!r}: expected a float in [0, 1)")
        check_positions(self.positions)

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        return single_cut(self.layer, depth)

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        return [single_cut_count(n, keep, self.ratio)]


@register(
    "fastv",
    paper="An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration "
          "for Large Vision-Language Models (FastV, Chen et al., ECCV 2024)",
    stage="llm", kind="subset", signals=("query_attn",), config=FastVConfig,
)
def fastv(tokens: Tensor, k: int, signals: Signals, config: FastVConfig,
          generator: torch.Generator | None) -> Reduction:
    """Top-``k`` image tokens by the attention the last prompt token gives them, order kept.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` one image's tokens per row (their hidden states at layer K).
        query_attn: ``[B, N]`` head-mean attention probability from the last prompt token
            at layer K-1 (over the whole sequence; the image's columns).

    In a model (``tokensieve.apply``) the cut happens before decoder layer K: layers before
    it see every token, layers from K on see the kept ones; the kept set is fixed at
    prefill and decoding reuses it.
    """
    scores = signals.layer("query_attn", "fastv")
    if scores.dim() != 2:
        raise ValueError(f"query_attn: fastv uses one query row ([B, N]); got shape "
                         f"{tuple(scores.shape)}")
    return select(tokens, topk_indices(scores, k))
