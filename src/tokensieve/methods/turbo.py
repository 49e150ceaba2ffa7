"""Turbo: merge the least informative tokens (Ju et al., ECCV 2024).

"Turbo: Informativity-Driven Acceleration Plug-In for Vision-Language Large Models"
(Ju, Wang, Cheng, Chen, Zhai, Huang, Lan, Xiao, Zheng; ECCV 2024). The information degree
of a token combines its *mutual redundancy* (how similar it is to the other tokens) and its
*semantic value* (how much the CLS token attends to it). The understanding-model variant
(BLIP, LLaVA's CLIP tower) is ToMe's bipartite soft matching with the merge priority of an
A token set to

    E(a) = max_b cos(a, b) - 100 * alpha * cls_attn(a)

(the official code's ``scores_redund - alpha * 100 * attn_cls``, default ``alpha = 1``):
redundant tokens with little CLS attention are merged first, each into its most similar B
token, by size-weighted average. The factor 100 is the official scaling of the post-softmax
CLS attention. The generation variant (merge, then restore tokens for diffusion) is not
implemented here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.options import NonNegative
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._matching import (
    MergeResult,
    check_cls_budget,
    check_flag,
    check_sizes,
    merge_reduction,
    merge_to_budget,
)

#: The official code multiplies alpha by 100 before subtracting the CLS attention.
ATTN_SCALE = 100.0


@dataclass(frozen=True)
class TurboConfig:
    """Options of ``turbo``.

    Attributes:
        alpha: weight of the semantic value (CLS attention) against the redundancy; the
            penalty is ``100 * alpha * cls_attn`` (official default ``alpha = 1``).
            ``alpha = 0`` is plain ToMe.
        has_cls: ``tokens[:, 0]`` is a CLS token: never merged, kept first, counted in
            ``keep`` (so ``keep >= 2``).
        use_keys: match on the ``keys`` signal when given (the official BLIP code uses the
            layer's head-mean keys; its LLaVA code matches on the hidden states, i.e. the
            tokens: pass ``use_keys=False`` or no ``keys`` for that).
    """

    alpha: NonNegative = 1.0
    has_cls: bool = False
    use_keys: bool = True

    def __post_init__(self) -> None:
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha < 0):
            raise ValueError(f"turbo: alpha={self.alpha!r}: expected a finite number >= 0")
        check_flag(self.has_cls, "has_cls", "turbo")
        check_flag(self.use_keys, "use_keys", "turbo")


def turbo_merge(tokens: Tensor, k: int, cls_attn: Tensor, *, alpha: float = 1.0,
                metric: Tensor | None = None, sizes: Tensor | None = None,
                has_cls: bool = False) -> MergeResult:
    """Merge ``tokens`` ``[B, N, D]`` to ``k`` tokens by Turbo's informativity-driven matching.

    Rounds of bipartite soft matching (each removing at most half of the current tokens,
    see :func:`~tokensieve.methods._matching.merge_to_budget`) with the merge priority
    ``max_b cos(a, b) - 100 * alpha * cls_attn(a)``. Between rounds the CLS attention of a
    merged group is the plain mean of its members' (as the official multi-round code does).

    Args:
        tokens: ``[B, N, D]``.
        k: tokens to keep, ``has_cls + 1 <= k <= N``.
        cls_attn: ``[B, N]`` head-mean post-softmax CLS attention of the layer, aligned with
            the tokens (with ``has_cls``, entry 0 is CLS's self attention and is unused).
        alpha: semantic-value weight (official default 1).
        metric: ``[B, N, C]`` matching features (keys; default: the tokens).
        sizes: optional prior sizes ``[B, N]``.
        has_cls: protect ``tokens[:, 0]``.

    Note: the official code stops merging once a layer has fewer than 40 tokens
    (``r_threshold``); a budget here is always met exactly.
    """
    b, n, _ = tokens.shape
    check_cls_budget(k, n, 1 + int(has_cls), "turbo", "a CLS token plus one merged token")
    if sizes is not None:
        sizes = check_sizes(sizes, b, n, "turbo")
    return merge_to_budget(tokens, k, metric=metric, sizes=sizes, protect_first=has_cls,
                           attn=cls_attn, attn_weight=ATTN_SCALE * float(alpha))


@register(
    "turbo",
    paper="Turbo: Informativity-Driven Acceleration Plug-In for Vision-Language Large Models "
          "(Ju et al., ECCV 2024)",
    stage="encoder", kind="merge", signals=("cls_attn",), optional_signals=("keys",),
    config=TurboConfig, features="vision", cls_token=True,
)
def turbo_reduce(tokens: Tensor, k: int, signals: Signals, config: TurboConfig,
                 generator: torch.Generator | None) -> Reduction:
    """Merge the token set to ``keep`` tokens, least informative first.

    ``tokens`` ``[B, N, D]`` and ``cls_attn`` ``[B, N]`` (or ``[B, L, N]``: the last layer is
    used) -> ``Reduction`` with ``tokens`` ``[B, keep, D]`` in the original order of the
    surviving tokens, ``indices=None``, ``positions``, ``sizes`` (long counts) and
    ``assignment`` ``[B, N]``.
    """
    cls_attn = signals.layer("cls_attn", "turbo")
    metric = signals.keys if config.use_keys else None
    return merge_reduction(turbo_merge(tokens, k, cls_attn, alpha=config.alpha, metric=metric,
                                       has_cls=config.has_cls))
