"""VTC-CLS: keep the tokens with the highest CLS attention summed over encoder layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.ops import select, topk_indices
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals


@dataclass(frozen=True)
class VTCCLSConfig:
    """VTC-CLS options.

    Attributes:
        start_layer: first layer of ``cls_attn`` ``[B, L, N]`` in the sum.
        end_layer: end of the layer range (exclusive, Python slice semantics). The
            default ``-1`` drops the last layer, as the official code sums
            ``attentions[start_layer:-1]`` (the last layer does not feed the
            ``select_layer=-2`` features). ``None``: up to and including the last layer.
    The official code takes the start layer on the command line (no published default);
    pass the encoder's per-layer CLS attention with ``L`` = all layers.
    """

    start_layer: int = 0
    end_layer: int | None = -1


@register(
    "vtc-cls",
    paper="[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs "
          "(VTC-CLS, Wang et al., 2024)",
    stage="pre-llm", kind="subset", signals=("cls_attn",), config=VTCCLSConfig,
    features="vision",
)
def vtc_cls(tokens: Tensor, k: int, signals: Signals, config: VTCCLSConfig,
            generator: torch.Generator | None) -> Reduction:
    """Top-``k`` tokens by ``sum_{l in [start, end)} cls_attn[:, l]``, raster order kept.

    ``cls_attn``: ``[B, L, N]`` head-mean CLS attention of every encoder layer (no
    per-layer normalisation, as in the official code), or ``[B, N]`` for a single layer
    (used as is; the layer options then do not apply).
    """
    cls_attn = signals.require("cls_attn", "vtc-cls")
    assert isinstance(cls_attn, Tensor)
    if cls_attn.dim() == 2:
        return select(tokens, topk_indices(cls_attn, k))
    n_layers = cls_attn.shape[1]
    chosen = range(n_layers)[slice(config.start_layer, config.end_layer)]
    if len(chosen) == 0:
        raise ValueError(
            f"vtc-cls: start_layer={config.start_layer}, end_layer={config.end_layer} select "
            f"no layer of cls_attn with {n_layers} layers (shape {tuple(cls_attn.shape)})")
    score = cls_attn[:, list(chosen)].float().sum(dim=1)
    return select(tokens, topk_indices(score, k))
