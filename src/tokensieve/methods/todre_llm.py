"""ToDRE stage 2: drop all of an image's tokens late in the LLM when the text no longer
attends to them (relevance-driven visual token reduction).

No official code of ToDRE is public (no repository found; the paper's arXiv page links none):
this follows the paper, arXiv:2505.18757 v2, Sec. 4.2 and the supplementary Sec. 3.2-3.3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep
from tokensieve.core.ops import gather_tokens, topk_indices
from tokensieve.core.options import Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import (
    LlmSchedule,
    QueryRows,
    ScoreSource,
    check_layer,
    check_positions,
    single_cut,
)
from tokensieve.core.signals import Signals

#: The paper's layer: attention ratios measured at fractional depth 7L/8 (the 28th of 32
#: layers); the image is removed after it.
OFFICIAL_FRACTION = 7 / 8
#: The paper's threshold tau (supplementary Table 2).
OFFICIAL_THRESHOLD = 0.10


@dataclass(frozen=True)
class ToDRELlmConfig(LlmSchedule):
    """Options of ToDRE's second stage (the paper's defaults).

    Attributes:
        layer: K, the first decoder layer without the image when it is dropped; the ratio
            is measured on the attention of layer K-1. ``None``: the paper's 7L/8, i.e. the
            ratio of the layer at 7/8 of the depth (the 28th of 32, index 27) and the image
            gone from index 28 on.
        threshold: tau; the image is dropped when the text gives it less than this share
            of its attention (0.10).
        positions: "keep" (the remaining tokens keep their position ids, as removing tokens
            from a running decoder does; the paper does not say) or "renumber".

    Counts: without ``keep`` the whole image (the stage keeps all of it or none); with
    ``keep`` (tokensieve's extension) the image keeps the ``keep`` tokens the text attends to
    most when it is not dropped.
    """

    scores: ClassVar[ScoreSource] = "previous"
    query: ClassVar[QueryRows] = "text"

    layer: int | None = None
    threshold: Share = OFFICIAL_THRESHOLD
    positions: str = "keep"

    def __post_init__(self) -> None:
        if self.layer is not None:
            check_layer("layer", self.layer, minimum=1)
        check_positions(self.positions)

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        return single_cut(self.layer, depth, OFFICIAL_FRACTION)

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        return [n if keep is None else resolve_keep(keep, n)]


def text_to_image_ratio(query_attn: Tensor) -> Tensor:
    """``[B]`` alpha_{t->v}: the share of the text rows' attention that goes to the image,
    ``sum_{i in T, j in V} A_ij / sum_{i in T, j} A_ij`` (each row sums to 1 over the whole
    sequence, so it is the mean over the real rows of their mass on the image).

    Args:
        query_attn: ``[B, R, N]`` (all-zero rows are padding) or ``[B, N]`` (one row).
    """
    attn = query_attn.float()
    if attn.dim() == 2:
        attn = attn.unsqueeze(1)
    mass = attn.sum(dim=-1)  # [B, R]
    rows = (attn.abs().sum(dim=-1) > 0).float()
    return mass.sum(dim=1) / rows.sum(dim=1).clamp(min=1.0)


@register(
    "todre-llm",
    paper="ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large "
          "Vision-Language Models (Li et al., 2025), stage 2",
    stage="llm", kind="subset", signals=("query_attn",), config=ToDRELlmConfig,
)
def todre_llm(tokens: Tensor, k: int, signals: Signals, config: ToDRELlmConfig,
              generator: torch.Generator | None) -> Reduction:
    """Keep the image, or drop all of it when the text no longer attends to it.

    The paper measures, at the layer at 7L/8, the head-mean attention ratios
    ``alpha_{t->v}`` (text rows -> image columns over the text rows' whole attention) and
    ``alpha_{v->t}`` (image rows -> text columns), and removes all visual tokens after that
    layer when both are below tau = 0.10. With the paper's order (system prompt, image,
    text) and causal attention the image rows see no text, so ``alpha_{v->t}`` is 0 and
    the test is ``alpha_{t->v} < tau``; that is what runs here.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` one image's tokens per row (hidden states at layer K).
        query_attn: ``[B, R, N]`` the head-mean attention probabilities (softmax over the
            whole visible sequence) of layer K-1 from the ``R`` text tokens after the image
            (all-zero rows: padding) to the image's tokens; ``[B, N]``: one row.

    Returns:
        The ``k`` tokens the text attends to most (in the model ``k = N``: the whole image),
        in original order; a sample whose ratio is below ``threshold`` keeps none: its
        ``mask`` row is all False (``mask`` is ``None`` when no sample is dropped).
    """
    scores = signals.require("query_attn", "todre-llm")
    assert isinstance(scores, Tensor)
    attn = scores.float() if scores.dim() == 2 else scores.float().sum(dim=1)  # [B, N]
    idx = topk_indices(attn, k)
    drop = text_to_image_ratio(scores) < config.threshold  # [B]
    out = gather_tokens(tokens, idx)
    if not bool(drop.any()):
        return Reduction(tokens=out, indices=idx)
    mask = (~drop).unsqueeze(1).expand(-1, k).clone()
    return Reduction(tokens=out, indices=idx, mask=mask)
