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

Inside a vision encoder (``ts.apply(model, "turbo", r=16)``, :class:`TurboSchedule`): ToMe's
per-layer merge with Turbo's priority, between attention and MLP of every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokensieve.core.encoder_schedule import (
    EncoderSchedule,
    LayerStep,
    register_encoder_schedule,
    spread_merges,
)
from tokensieve.core.options import NonNegative
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._matching import (
    MergeResult,
    bipartite_soft_matching,
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


# -- inside the encoder ------------------------------------------------------------------------
#: The official code stops merging in a layer that has fewer tokens than this.
R_THRESHOLD = 40


@register_encoder_schedule("turbo")
@dataclass(frozen=True)
class TurboSchedule(EncoderSchedule):
    """In-encoder options of ``turbo`` (the official BLIP / CLIP-tower patch: ToMe's blocks
    with Turbo's merge priority).

    In every layer with ``r > 0``, between the attention residual and the MLP, ToMe's
    bipartite soft matching on the head-mean keys ranks the A tokens by ``max_b cos(a, b) -
    100 * alpha * cls_attn(a)`` (the layer's own head-mean CLS attention row, with the
    proportional-attention bias) and merges the ``r`` first into their best B token by
    size-weighted average; CLS is never merged; ``r`` is capped at half the layer's tokens;
    a layer with fewer than ``min_tokens`` tokens merges nothing (official ``r_threshold``
    40).

    Attributes:
        r: tokens merged per layer: an int, an ``(r, inflection)`` schedule or a per-layer
            list (as ``tome``). Required.
        alpha: weight of the semantic value (official 1).
        prop_attn: proportional attention (official on).
        use_keys: match on the head-mean keys (official BLIP); False: on the tokens.
        min_tokens: no merge in a layer with fewer tokens (official 40).
    """

    r: int | tuple[int, float] | list[int] | None = None
    alpha: float = 1.0
    prop_attn: bool = True
    use_keys: bool = True
    min_tokens: int = R_THRESHOLD

    signals: ClassVar[tuple[str, ...]] = ("keys", "cls_attn")
    needs_cls: ClassVar[bool] = True

    def __post_init__(self) -> None:
        from tokensieve.methods.tome import _check_r

        if self.r is None:
            raise ValueError("turbo inside the encoder needs r, the tokens merged per layer "
                             "(e.g. ts.apply(model, 'turbo', r=16))")
        _check_r(self.r)
        TurboConfig(alpha=self.alpha)
        check_flag(self.prop_attn, "prop_attn", "turbo")
        check_flag(self.use_keys, "use_keys", "turbo")
        v = self.min_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"turbo: min_tokens={v!r}: expected an int >= 0")

    @property
    def proportional(self) -> bool:
        return self.prop_attn

    def plan(self, depth: int) -> dict[int, Any]:
        from tokensieve.methods.tome import r_plan

        assert self.r is not None
        return r_plan(depth, self.r)

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        if tokens < self.min_tokens:
            return tokens
        return tokens - min(int(param), (tokens - int(has_cls)) // 2)

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> TurboSchedule:
        """``r`` per layer leaving ``keep`` patch tokens, spread as ``tome`` spreads it
        (:func:`~tokensieve.core.encoder_schedule.spread_merges`), a layer with fewer than
        ``min_tokens`` tokens merging nothing."""
        if "r" in options:
            raise ValueError("turbo: keep and r both set; keep solves r (a per-layer list)")
        c = int(has_cls)
        floor = options.get("min_tokens", R_THRESHOLD)
        layers = range(min(until, depth - 1) + 1)
        rs = spread_merges("turbo", tokens, keep, has_cls, layers,
                           lambda t: (t - c) // 2 if t >= floor else 0)
        return cls(r=[rs[i] for i in layers], **options)

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        """One Turbo layer on ``tokens`` ``[B, T, D]`` with ``signals["keys"]``
        ``[B, T, Dh]`` and ``signals["cls_attn"]`` ``[B, T]``."""
        t = tokens.shape[1]
        r = min(int(param), (t - int(has_cls)) // 2)
        if r <= 0 or t < self.min_tokens:
            return None
        metric = signals["keys"] if self.use_keys else tokens
        penalty = ATTN_SCALE * float(self.alpha) * signals["cls_attn"]
        match = bipartite_soft_matching(metric, r, protect_first=has_cls, penalty=penalty)
        merged, new_sizes = match.merge_wavg(tokens, sizes)
        return LayerStep(tokens=merged, sizes=new_sizes, slot=match.slot, kept=match.kept)
