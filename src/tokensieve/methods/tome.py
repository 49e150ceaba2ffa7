"""ToMe: merge similar tokens by bipartite soft matching (Bolya et al., ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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


@dataclass(frozen=True)
class ToMeConfig:
    """Options of ``tome``.

    Attributes:
        has_cls: ``tokens[:, 0]`` is a CLS token: it is never merged, stays first and
            counts towards ``keep`` (so ``keep >= 2``).
        use_keys: match on the ``keys`` signal (head-mean keys of the layer, as in the
            paper) when it is given; ``False`` (or no ``keys``) matches on the tokens.
    """

    has_cls: bool = False
    use_keys: bool = True

    def __post_init__(self) -> None:
        check_flag(self.has_cls, "has_cls", "tome")
        check_flag(self.use_keys, "use_keys", "tome")


def tome_merge(tokens: Tensor, k: int, *, metric: Tensor | None = None,
               sizes: Tensor | None = None, has_cls: bool = False) -> MergeResult:
    """Merge ``tokens`` ``[B, N, D]`` to ``k`` tokens with ToMe's bipartite soft matching.

    The official method removes ``r`` tokens in each encoder block (``r <= 50 %`` of the
    block's tokens). To reach a budget in one call, rounds of matching are applied, each
    removing ``min(T - k, (T - has_cls) // 2)`` of the current ``T`` tokens, until ``k``
    remain (576 -> 288 -> 144 -> 72 -> 64 for ``k = 64``). Merged tokens are size-weighted
    means; sizes accumulate, so ``sizes.sum(1) == N`` (or the sum of the prior sizes).

    Args:
        tokens: ``[B, N, D]``.
        k: tokens to keep, ``has_cls + 1 <= k <= N``.
        metric: ``[B, N, C]`` matching features, e.g. head-mean keys (default: the tokens).
        sizes: optional prior sizes ``[B, N]`` from earlier merges (positive); they weight
            the averages and add up. Proportional attention adds ``log(sizes)`` to the
            attention logits of the merged tokens.
        has_cls: protect ``tokens[:, 0]`` (a CLS token).

    Returns:
        A :class:`~tokensieve.methods._matching.MergeResult` (tokens ``[B, k, D]``, sizes,
        ascending surviving positions, source -> slot assignment).
    """
    b, n, _ = tokens.shape
    check_cls_budget(k, n, 1 + int(has_cls), "tome", "a CLS token plus one merged token")
    if sizes is not None:
        sizes = check_sizes(sizes, b, n, "tome")
    return merge_to_budget(tokens, k, metric=metric, sizes=sizes, protect_first=has_cls)


@register(
    "tome",
    paper="Token Merging: Your ViT But Faster (ToMe, Bolya et al., ICLR 2023)",
    stage="encoder", kind="merge", optional_signals=("keys",), config=ToMeConfig,
    features="vision", cls_token=True,
)
def tome_reduce(tokens: Tensor, k: int, signals: Signals, config: ToMeConfig,
                generator: torch.Generator | None) -> Reduction:
    """Merge the token set to ``keep`` tokens by rounds of bipartite soft matching.

    ``tokens`` ``[B, N, D]`` -> ``Reduction`` with ``tokens`` ``[B, keep, D]`` (original order
    of the surviving tokens), ``indices=None``, ``positions`` ``[B, keep]`` (surviving source
    positions), ``sizes`` ``[B, keep]`` (long counts) and ``assignment`` ``[B, N]``.
    """
    metric = signals.keys if config.use_keys else None
    return merge_reduction(tome_merge(tokens, k, metric=metric, has_cls=config.has_cls))
