"""VisionDrop, LLM stages: dominant tokens by visual-to-visual attention plus contextual merges,
after layers 8, 16 and 24 of the LLM.

Follows the official code (github.com/Ruixxxx/VisionDrop, ``visiondrop_rank_drop`` in
``llava/model/modeling_llama_visiondrop.py``), read for its computations, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep
from tokensieve.core.ops import select
from tokensieve.core.options import Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import (
    LlmSchedule,
    QueryRows,
    ScoreSource,
    check_depth,
    check_layer_list,
    check_positions,
    geometric_counts,
    scaled_layers,
    solve_ratio,
)
from tokensieve.core.signals import Signals
from tokensieve.methods._dominant import dominant_contextual, split_budget

#: The official stage layers (8, 16, 24) of the 32-layer LLaVA-1.5 LLM, as depth fractions.
OFFICIAL_FRACTIONS = (0.25, 0.5, 0.75)
#: The official schedule: ``--image_token_list [[30,5],[22,4],[16,3]]`` (dominant,
#: contextual per stage) for the 48 = 42 + 6 tokens stage 1 brings into the LLM.
OFFICIAL_SCHEDULE = ((30, 5), (22, 4), (16, 3))
OFFICIAL_INPUT = 48
#: The contextual share that splits every official stage count: round(35 / 7) = 5,
#: round(26 / 7) = 4, round(19 / 7) = 3.
OFFICIAL_CONTEXTUAL_SHARE = 1 / 7


@dataclass(frozen=True)
class VisionDropLlmConfig(LlmSchedule):
    """Options of VisionDrop's LLM stages (official defaults of the LLaVA-1.5 scripts).

    Attributes:
        layers: decoder layers at whose input a stage reduces the image; ``None``: the
            official (8, 16, 24) of a 32-layer LLM (the official code cuts after layer
            index 7, 15, 23 and scores with the next layer's own q/k), i.e. a quarter, half
            and three quarters of the depth of the model at hand.
        contextual_share: the share of a stage's count that becomes contextual (merged)
            tokens, ``C = round(k * share)``, ``D = k - C``; the default 1/7 gives the
            official (30, 5), (22, 4), (16, 3) from the counts 35, 26, 19.
        positions: "renumber" (official: contiguous position ids after every stage) or
            "keep" (each output token keeps the position of the token it stands for).
        contextual_merge: "target+mean" (official: target + mean of the tokens assigned to
            it) or "mean" (corrected: mean of the target and its assigned tokens).

    Counts (image tokens from each stage on, for an image of ``n`` tokens at the LLM input):
    without ``keep`` the official schedule 35, 26, 19 of 48 scaled to ``n``
    (``round(n * c / 48)``; with other than three ``layers``: a geometric schedule at the
    official per-stage ratio ``(19 / 48) ** (1/3)``); with ``keep`` the geometric schedule
    whose average image tokens per LLM layer is ``keep`` (the project's multi-stage budget;
    ``keep=32`` on 48 tokens of a 32-layer LLM gives the official 35, 26, 19 exactly: the
    official README's "average token retention of 32 tokens").
    """

    scores: ClassVar[ScoreSource] = "own"
    query: ClassVar[QueryRows] = "image"

    layers: tuple[int, ...] | None = None
    contextual_share: Share = OFFICIAL_CONTEXTUAL_SHARE
    positions: str = "renumber"
    contextual_merge: Literal["target+mean", "mean"] = "target+mean"

    def __post_init__(self) -> None:
        check_layer_list(self.layers, minimum=1)
        check_positions(self.positions)

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        if self.layers is None:
            return scaled_layers(OFFICIAL_FRACTIONS, depth)
        return check_depth(self.layers, depth)

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        layers = self.cut_layers(depth)
        if keep is not None:
            target = resolve_keep(keep, n)
            return geometric_counts(n, solve_ratio(n, target, layers, depth), len(layers))
        if len(layers) == len(OFFICIAL_SCHEDULE):
            return [max(1, min(n, round(n * (d + c) / OFFICIAL_INPUT)))
                    for d, c in OFFICIAL_SCHEDULE]
        last = sum(OFFICIAL_SCHEDULE[-1]) / OFFICIAL_INPUT
        return geometric_counts(n, last ** (1 / len(OFFICIAL_SCHEDULE)), len(layers))


def received_attention(query_attn: Tensor) -> Tensor:
    """``[B, N]`` the attention each image token receives from the image's own tokens,
    averaged over the query rows (all-zero rows are padding and do not count); a
    ``[B, N]`` signal is taken as already averaged."""
    attn = query_attn.float()
    if attn.dim() == 2:
        return attn
    rows = (attn.abs().sum(dim=-1) > 0).float()  # [B, Q]
    return attn.sum(dim=1) / rows.sum(dim=1, keepdim=True).clamp(min=1.0)


@register(
    "visiondrop-llm",
    paper="Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment "
          "(VisionDrop, AAAI 2026), LLM stages",
    stage="llm", kind="subset+merge", signals=("query_attn",), optional_signals=("keys",),
    config=VisionDropLlmConfig,
)
def visiondrop_llm(tokens: Tensor, k: int, signals: Signals, config: VisionDropLlmConfig,
                   generator: torch.Generator | None) -> Reduction:
    """One LLM stage of VisionDrop: ``D`` dominant tokens by visual-to-visual attention, the
    rest merged into ``C`` contextual tokens (``D + C = k``), VisionZip's scheme
    (``_dominant.dominant_contextual``) on the image's hidden states.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` one image's current tokens per row (hidden states at the cut).
        query_attn: ``[B, N, N]`` the attention the image's tokens (rows, causal) give the
            image's tokens (columns): softmax over the whole visible sequence of the stage
            layer's own q/k (its input norm and rotary embedding), averaged over heads, as
            the official code computes it; the score of a token is the mean over the rows
            (the official ``attention_avg_image``). ``[B, N]``: already averaged.
        keys: ``[B, N, Dk]`` optional, the similarity metric of the contextual merge: the
            stage layer's rotary-embedded keys averaged over heads, as the official code
            uses them (the in-LLM stage passes them); without them the image's hidden
            states (``tokens``) are the metric.

    Returns:
        ``[B, D + C, D]`` tokens: the dominant ones in their order, then the contextual ones
        in target order (the official output order); ``indices`` the dominant positions,
        ``positions`` dominant then target positions. ``k = N`` keeps the image unchanged.
    """
    scores = signals.require("query_attn", "visiondrop-llm")
    assert isinstance(scores, Tensor)
    b, n, _ = tokens.shape
    if k >= n:  # a stage that keeps every token changes nothing (no reordering)
        return select(tokens, torch.arange(n, device=tokens.device).expand(b, n))
    d, c = split_budget(k, config.contextual_share, None, None, "visiondrop-llm")
    keys = signals.keys if signals.keys is not None else tokens
    return dominant_contextual(tokens, received_attention(scores), keys, d, c, has_cls=False,
                               merge=config.contextual_merge, method="visiondrop-llm")
