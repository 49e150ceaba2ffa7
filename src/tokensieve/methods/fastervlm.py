"""FasterVLM: keep the visual tokens the [CLS] token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.grid import partition_budgets, topk_per_partition
from tokensieve.core.ops import select, topk_indices
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals


@dataclass(frozen=True)
class FasterVLMConfig:
    """No options: the score is the head-mean CLS attention of the feature layer
    (``select_layer``); pass that layer's ``cls_attn`` (or ``[B, L, N]``, last used)."""


@register(
    "fastervlm",
    paper="[CLS] Attention is All You Need for Training-Free Visual Token Pruning "
          "(FasterVLM, Zhang et al., 2024)",
    stage="pre-llm", kind="subset", signals=("cls_attn",), optional_signals=("partitions",),
    config=FasterVLMConfig, reads_tokens="kept",
)
def fastervlm(tokens: Tensor, k: int, signals: Signals, config: FasterVLMConfig,
              generator: torch.Generator | None) -> Reduction:
    """Top-``k`` tokens by CLS attention, raster order kept. With anyres ``partitions`` the
    budget is shared across the overview image and crops in proportion to their sizes and
    always-kept tokens (image newlines) are kept, as in the official LLaVA-NeXT variant.

    The tokens are read only where they are kept (``reads_tokens="kept"``: ``reduce`` checks
    the kept ones for NaN/inf, not all ``N``)."""
    scores = signals.layer("cls_attn", "fastervlm")
    if signals.partitions is None:
        return select(tokens, topk_indices(scores, k), ascending=True)
    budget, always = partition_budgets(signals.partitions, k, "fastervlm")
    return select(tokens, topk_per_partition(scores, budget, signals.partitions, always))
