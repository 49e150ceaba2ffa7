"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity."""

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

#: Official contextual share: (54, 10) for 64, (108, 20) for 128, (162, 30) for 192.
VISIONZIP_CONTEXTUAL_RATIO = 10 / 64


@dataclass(frozen=True)
class VisionZipConfig:
    """VisionZip options.

    Attributes:
        dominant: dominant tokens ``D`` (counting CLS when ``has_cls``); ``None``: the
            official split.
        contextual: contextual tokens ``C``; ``None``: the official split. By default
            ``C = round(keep * 10 / 64)`` and ``D = keep - C``, which gives the official
            (54, 10), (108, 20), (162, 30) at 64 / 128 / 192 and the same ratio elsewhere.
            ``D + C`` must equal ``keep`` when both are set.
        has_cls: ``tokens[:, 0]`` is the encoder's CLS token (always kept, output first;
            every signal is aligned with the tokens, so ``cls_attn[:, 0]`` is ignored).
        contextual_merge: "target+mean" (official: a contextual token is its target
            *plus* the mean of the tokens assigned to it) or "mean" (corrected: the
            average of the target and its assigned tokens).
    """

    dominant: Count | None = None
    contextual: Count | None = None
    has_cls: bool = False
    contextual_merge: Literal["target+mean", "mean"] = "target+mean"


@register(
    "visionzip",
    paper="VisionZip: Longer is Better but Not Necessary in Vision Language Models "
          "(Yang et al., CVPR 2025)",
    stage="pre-llm", kind="subset+merge", signals=("cls_attn", "keys"), config=VisionZipConfig,
    features="vision", cls_token=True,
)
def visionzip(tokens: Tensor, k: int, signals: Signals, config: VisionZipConfig,
              generator: torch.Generator | None) -> Reduction:
    """VisionZip on the ``select_layer=-2`` features ``tokens`` ``[B, N, D]``.

    Dominant: the ``D - 1`` patches with the highest CLS attention (the official code sums
    over heads; the head-mean ``cls_attn`` ``[B, N]`` gives the same order; with
    ``[B, L, N]`` the last layer is used) plus the CLS token when ``has_cls``; without CLS
    the top ``D`` patches. They are kept unchanged in raster order (CLS first).

    Contextual: the other tokens, compared by the L2-normalised head-mean ``keys``
    ``[B, N, Dk]`` of the same layer. Targets are every ``floor(N_rem / C)``-th remaining
    token (the first ``C``); every other remaining token joins its most similar target.

    The budget counts the CLS token: the official ``visionzip(model, dominant=54,
    contextual=10)`` keeps 53 patches + CLS + 10 contextual = 64 tokens, as here.

    Returns ``[B, D + C, D]`` tokens: dominant then contextual; ``indices`` are the
    dominant positions, ``positions`` the dominant then target positions.
    """
    d, c = split_budget(k, VISIONZIP_CONTEXTUAL_RATIO, config.dominant, config.contextual,
                        "visionzip")
    scores = signals.layer("cls_attn", "visionzip")
    keys = signals.require("keys", "visionzip")
    assert isinstance(keys, Tensor)
    return dominant_contextual(tokens, scores, keys, d, c, has_cls=config.has_cls,
                               merge=config.contextual_merge, method="visionzip")
