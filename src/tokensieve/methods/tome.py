"""ToMe: merge similar tokens by bipartite soft matching (Bolya et al., ICLR 2023).

Two uses: ``tome`` on a token set (``ts.reduce``: rounds of matching down to ``keep``) and
inside a vision encoder (``ts.apply(model, "tome", r=16)``: :class:`ToMeSchedule`, ``r``
tokens merged in every layer between attention and MLP, proportional attention).
"""

from __future__ import annotations

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


# -- inside the encoder ------------------------------------------------------------------------
def r_plan(depth: int, r: Any) -> dict[int, int]:
    """The layers of a ``depth``-layer encoder that merge, with their ``r`` (ToMe's schedule
    forms, see :func:`parse_r`; layers merging nothing left out)."""
    return {i: v for i, v in enumerate(parse_r(depth, r)[:depth]) if v > 0}


def parse_r(depth: int, r: int | tuple[int, float] | list[int]) -> list[int]:
    """Per-layer merge counts of ToMe's schedules (its ``parse_r``) for ``depth`` layers.

    ``r`` is an int (the same ``r`` in every layer), a ``(r, inflection)`` pair (a linear
    ramp from ``int(r * (1 - inflection))`` to ``2 r`` minus that, each value truncated to
    an int: inflection -1 is the paper's decreasing schedule, 0 constant, +1 increasing) or a
    per-layer list (layers beyond it merge nothing).
    """
    if isinstance(r, list):
        return [*r, *([0] * max(depth - len(r), 0))]
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
    return [int(lo + step * i) for i in range(depth)]


def _check_r(r: object) -> None:
    def count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = count(r) or (isinstance(r, list) and all(count(v) for v in r)) or (
        isinstance(r, tuple) and len(r) == 2 and count(r[0])
        and isinstance(r[1], (int, float)) and not isinstance(r[1], bool) and -1 <= r[1] <= 1)
    if not ok:
        raise ValueError(f"tome: r={r!r}: expected tokens merged per layer: an int >= 0, an "
                         "(r, inflection) pair with inflection in [-1, 1], or a per-layer list "
                         "of ints >= 0")


@register_encoder_schedule("tome")
@dataclass(frozen=True)
class ToMeSchedule(EncoderSchedule):
    """In-encoder options of ``tome`` (the defaults of ToMe's official model patches).

    In every layer with ``r > 0``, between the attention (plus residual) and the MLP, the
    ``r`` most similar tokens of set A (even positions) are merged into their best match in
    set B (odd positions) by a size-weighted average (:func:`bipartite_soft_matching` and
    ``Matching.merge_wavg``); the CLS token is never merged; ``r`` is capped at half of the
    layer's tokens (CLS excluded), as the official code does.

    Attributes:
        r: tokens merged per layer: an int, an ``(r, inflection)`` schedule or a per-layer
            list (see :func:`parse_r`). Required (the official default 0 merges nothing).
        prop_attn: proportional attention: the attention logits of key ``j`` get
            ``log(size_j)`` (official default True).
        use_keys: match on the layer's head-mean keys (official); False: on the tokens.
    """

    r: int | tuple[int, float] | list[int] | None = None
    prop_attn: bool = True
    use_keys: bool = True

    signals: ClassVar[tuple[str, ...]] = ("keys",)

    def __post_init__(self) -> None:
        if self.r is None:
            raise ValueError("tome inside the encoder needs r, the tokens merged per layer "
                             "(e.g. ts.apply(model, 'tome', r=16))")
        _check_r(self.r)
        check_flag(self.prop_attn, "prop_attn", "tome")
        check_flag(self.use_keys, "use_keys", "tome")

    @property
    def proportional(self) -> bool:
        return self.prop_attn

    def plan(self, depth: int) -> dict[int, Any]:
        assert self.r is not None
        return r_plan(depth, self.r)

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        """One layer of ToMe on ``tokens`` ``[B, T, D]``: ``min(param, (T - has_cls) // 2)``
        tokens merged, matched on ``signals["keys"]`` ``[B, T, Dh]`` (or the tokens)."""
        r = min(int(param), (tokens.shape[1] - int(has_cls)) // 2)
        if r <= 0:
            return None
        metric = signals["keys"] if self.use_keys else tokens
        match = bipartite_soft_matching(metric, r, protect_first=has_cls)
        merged, new_sizes = match.merge_wavg(tokens, sizes)
        return LayerStep(tokens=merged, sizes=new_sizes, slot=match.slot, kept=match.kept)

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        return tokens - max(min(int(param), (tokens - int(has_cls)) // 2), 0)

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> ToMeSchedule:
        """``r`` per layer leaving ``keep`` patch tokens: the ``tokens - has_cls - keep``
        merges spread evenly over ``layers`` (each layer ``floor`` or ``ceil`` of the mean,
        the larger ones first; a constant ``r`` where it divides) over layers ``0..until``,
        each capped at half the layer's tokens as ToMe's code caps it; where the later
        layers' caps could not absorb their share, earlier layers merge more. ValueError
        when the caps cannot reach ``keep``."""
        if "r" in options:
            raise ValueError("tome: keep and r both set; keep solves r (a per-layer list)")
        c = int(has_cls)
        layers = range(min(until, depth - 1) + 1)
        rs = spread_merges("tome", tokens, keep, has_cls, layers, lambda t: (t - c) // 2)
        return cls(r=[rs[i] for i in layers], **options)
