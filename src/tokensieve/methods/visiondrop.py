"""VisionDrop (stage 1): dominant tokens by visual-to-visual attention plus contextual merges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokensieve.core.options import Count
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._dominant import dominant_contextual, split_budget

#: Default split (D, C) = (42, 6) at 48 tokens; other budgets keep the ratio.
VISIONDROP_CONTEXTUAL_RATIO = 6 / 48
SCORES = ("attn_received", "cls_attn")


@dataclass(frozen=True)
class VisionDropConfig:
    """VisionDrop stage-1 options.

    Attributes:
        dominant: dominant tokens ``D`` (counting CLS when ``has_cls``); ``None``: default.
        contextual: contextual tokens ``C``; ``None``: default. By default
            ``C = round(keep / 8)``, ``D = keep - C`` ((42, 6) at 48, (56, 8) at 64).
        score: "attn_received" (the paper: visual-to-visual attention, the head- and
            query-mean attention each token receives) or "cls_attn" (the released
            stage-1 code, which reuses VisionZip's CLS-attention ranking).
        has_cls: ``tokens[:, 0]`` is the encoder's CLS token (see ``visionzip``).
        contextual_merge: "target+mean" (as in VisionZip's code) or "mean" (corrected).
    """

    dominant: Count | None = None
    contextual: Count | None = None
    score: Literal["attn_received", "cls_attn"] = "attn_received"
    has_cls: bool = False
    contextual_merge: Literal["target+mean", "mean"] = "target+mean"

    def required_signals(self) -> tuple[str, ...]:
        """``keys`` (the contextual merge) and the ``score`` signal."""
        return ("keys", self.score)


@register(
    "visiondrop",
    paper="Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment "
          "(VisionDrop, AAAI 2026)",
    stage="pre-llm", kind="subset+merge", signals=("keys", "attn_received"),
    optional_signals=("cls_attn",), config=VisionDropConfig,
    features="vision", cls_token=True, llm_stage="visiondrop-llm",
)
def visiondrop(tokens: Tensor, k: int, signals: Signals, config: VisionDropConfig,
               generator: torch.Generator | None) -> Reduction:
    """VisionDrop's pre-LLM stage on encoder features ``tokens`` ``[B, N, D]``.

    The same dominant + contextual scheme as VisionZip (see ``visionzip``), but dominant
    tokens are ranked by intra-visual attention: ``attn_received`` ``[B, N]`` (or the last
    layer of ``[B, L, N]``), the attention every token receives from all visual tokens,
    averaged over heads and queries. ``keys`` ``[B, N, Dk]`` drive the contextual merge.
    The LLM-side stages of VisionDrop are the registered in-LLM method ``visiondrop-llm``
    (``tokensieve.apply(model, "visiondrop", keep)`` runs both).
    """
    if config.score not in SCORES:
        raise ValueError(f"visiondrop: score={config.score!r}; expected one of {SCORES}")
    d, c = split_budget(k, VISIONDROP_CONTEXTUAL_RATIO, config.dominant, config.contextual,
                        "visiondrop")
    scores = signals.layer(config.score, "visiondrop")
    keys = signals.require("keys", "visiondrop")
    assert isinstance(keys, Tensor)
    return dominant_contextual(tokens, scores, keys, d, c, has_cls=config.has_cls,
                               merge=config.contextual_merge, method="visiondrop")
