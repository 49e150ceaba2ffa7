"""ToDRE stage 1: a diverse subset of visual tokens by greedy k-centre selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokensieve.core.ops import select
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._greedy import max_min_indices

STARTS = ("isolated", "cls_attn", "first")
DISTANCES = ("cosine", "euclidean")


@dataclass(frozen=True)
class ToDREConfig:
    """Options of ToDRE's first stage (the paper's details are not public in code; see
    the ``todre`` docstring for what each choice means).

    Attributes:
        start: the first centre: "isolated" (the token whose nearest neighbour is farthest,
            as DivPrune), "cls_attn" (the token the CLS token attends to most; needs the
            ``cls_attn`` signal) or "first" (token 0, the textbook Gonzalez start).
        distance: "cosine" (``1 - cos``) or "euclidean".
    """

    start: Literal["isolated", "cls_attn", "first"] = "isolated"
    distance: Literal["cosine", "euclidean"] = "cosine"

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise ValueError(f"start={self.start!r}: expected one of {STARTS}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance={self.distance!r}: expected one of {DISTANCES}")


@register(
    "todre",
    paper="ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large "
          "Vision-Language Models (Li et al., 2025), stage 1",
    stage="pre-llm", kind="subset", optional_signals=("cls_attn",), config=ToDREConfig,
    features="vision", llm_stage="todre-llm",
)
def todre(tokens: Tensor, k: int, signals: Signals, config: ToDREConfig,
          generator: torch.Generator | None) -> Reduction:
    """Greedy k-centre (farthest-first) subset of ``tokens`` ``[B, N, D]`` -> ``k`` per sample.

    ToDRE (v1 of the paper) keeps about 10 % of the visual tokens after the vision encoder
    with the greedy k-centre algorithm: start from one centre, then repeatedly add the token
    farthest from its nearest centre. That is the DivPrune recurrence, and the code is
    shared with it. The paper does not pin down the first centre or the distance (its v2
    replaces the step by max-sum diversification); by default this uses DivPrune's seed and
    cosine distance, so ``todre`` with default options equals ``divprune`` (the paper selects
    right after the vision encoder, hence ``features="vision"``). Stage 2 (dropping
    all visual tokens late in the LLM when the text no longer attends to them) is the
    registered in-LLM method ``todre-llm`` (``tokensieve.apply(model, "todre", keep)`` runs
    both).
    """
    seeds = None
    if config.start == "cls_attn":
        seeds = torch.argmax(signals.layer("cls_attn", "todre").float(), dim=1)
    elif config.start == "first":
        seeds = torch.zeros(tokens.shape[0], dtype=torch.long)
    return select(tokens, max_min_indices(tokens, k, config.distance, seeds))
