"""ATS: adaptive token sampling by inverse transform sampling (Fayyaz et al., ECCV 2022).

"Adaptive Token Sampling For Efficient Vision Transformers" (ATS). Per image:

1. significance ``S_j = cls_attn_j * ||V_j||`` over the patch tokens (CLS excluded),
   normalised to sum 1 (the official code sums the CLS attention over heads; the head mean
   used here gives the same normalised scores);
2. sort ``S`` ascending, take the CDF and min-max normalise it;
3. place ``m`` targets evenly in ``[y0, 1]``, ``y0`` the smallest non-zero normalised CDF
   value (the official ``create_ys``); ``m = keep - 1`` with a CLS token, else ``keep``;
4. every target picks the token whose normalised CDF value is nearest (ties: the lowest
   sorted position, i.e. ``argmin``); duplicates are dropped, so the count adapts to the
   image: peaked significance gives few tokens, flat significance up to ``m``.

``keep = N`` returns every token (the contract of every subset method), whereas the
official DeiT-S setting samples with ``K = N`` targets in each ATS block and still drops
the duplicate picks; any ``keep < N`` samples as described. A ``keep`` below the official
minimum of 8 tokens is refused (option ``min_tokens``).

Inside a vision encoder (``ts.apply(model, "ats")``, :class:`ATSSchedule`): the official
ATS blocks 3..11 of 12 sample between attention and MLP; images keep different counts, so
the batch is padded and later layers mask the padding.

Without ``values`` the method refuses to run (the value norm is part of the score); pass
``use_values=False`` to sample by CLS attention alone (a documented variant, not the paper).

Batches: counts differ per image, so the result is padded to the largest count ``K'``
and ``mask`` ``[B, K']`` (True = real token) is always returned. Real tokens come first,
in original order (strictly ascending ``indices``); padded slots hold zero tokens and repeat
the row's last real index (valid for gathering, never a new position): ignore them through
``mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokensieve.core.encoder_schedule import (
    EncoderSchedule,
    LayerStep,
    encoder_layers,
    register_encoder_schedule,
)
from tokensieve.core.ops import pow2_rescale, select_mask
from tokensieve.core.options import PositiveCount
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._matching import check_flag


@dataclass(frozen=True)
class ATSConfig:
    """Options of ``ats``.

    Attributes:
        has_cls: ``tokens[:, 0]`` is a CLS token: always kept first, counted in ``keep``.
        use_values: weight the CLS attention by the value norms (official). ``False``:
            significance = CLS attention only (for callers without ``values``).
        min_tokens: the official lower bound on the budget (8, CLS included): a smaller
            ``keep`` is refused (unless it is the whole token set); set 1 to disable.
    """

    has_cls: bool = False
    use_values: bool = True
    min_tokens: PositiveCount = 8

    def __post_init__(self) -> None:
        check_flag(self.has_cls, "has_cls", "ats")
        check_flag(self.use_values, "use_values", "ats")
        if (isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int)
                or self.min_tokens < 1):
            raise ValueError(f"ats: min_tokens={self.min_tokens!r}: expected an int >= 1")

    def required_signals(self) -> tuple[str, ...]:
        """``cls_attn``, and ``values`` unless ``use_values=False``."""
        return ("cls_attn", "values") if self.use_values else ("cls_attn",)


def ats_significance(cls_attn: Tensor, values: Tensor | None) -> Tensor:
    """Normalised significance ``[B, P]`` (float32) of ``P`` patch tokens.

    Args:
        cls_attn: ``[B, P]`` CLS attention of the patches (head-mean or head-sum).
        values: ``[B, P, Dv]`` attention values (all heads concatenated), or ``None`` to
            score by attention alone.
    """
    # Exact per-sample powers of two keep the normalised scores and avoid over/underflow.
    s = pow2_rescale(cls_attn, dim=1).float()
    if values is not None:
        s = s * torch.linalg.vector_norm(pow2_rescale(values, dim=(1, 2)).float(), dim=-1)
    total = s.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        bad = torch.nonzero(total.squeeze(1) <= 0).flatten().tolist()
        raise ValueError(f"ats: significance (cls_attn * ||values||) sums to {float(total.min())}"
                         f" for sample(s) {bad}; expected a positive total")
    return s / total


def inverse_transform_sample(significance: Tensor, m: int) -> Tensor:
    """ATS's inverse transform sampling: which of ``P`` tokens the ``m`` targets pick.

    Args:
        significance: ``[B, P]`` non-negative scores summing to 1 per row.
        m: number of targets (``>= 1``).

    Returns:
        ``[B, P]`` bool, True for the sampled tokens (at most ``m`` per row).
    """
    b, p = significance.shape
    dev = significance.device
    order = torch.sort(significance, dim=1, stable=True).indices
    cdf = torch.cumsum(significance.gather(1, order), dim=1)
    lo, hi = cdf[:, :1], cdf[:, -1:]
    span = hi - lo
    ncdf = torch.where(span > 0, (cdf - lo) / span.clamp(min=torch.finfo(torch.float32).tiny),
                       torch.ones_like(cdf))
    start = torch.where(ncdf > 0, ncdf, torch.full_like(ncdf, torch.inf)).min(dim=1).values
    if m == 1:
        targets = torch.ones(b, 1, device=dev)
    else:
        step = torch.arange(m, device=dev, dtype=torch.float32) / (m - 1)
        targets = start.unsqueeze(1) + (1.0 - start).unsqueeze(1) * step.unsqueeze(0)
    # Nearest CDF value to each target (ncdf is sorted): compare the neighbours around the
    # insertion point, the lower one on ties, then take the first entry holding that value.
    right = torch.searchsorted(ncdf, targets).clamp(max=p - 1)
    left = (right - 1).clamp(min=0)
    v_left, v_right = ncdf.gather(1, left), ncdf.gather(1, right)
    nearest = torch.where((targets - v_left).abs() <= (v_right - targets).abs(), v_left, v_right)
    picked = torch.searchsorted(ncdf, nearest)
    chosen_sorted = torch.zeros(b, p, dtype=torch.bool, device=dev).scatter(1, picked, True)
    return torch.zeros_like(chosen_sorted).scatter(1, order, chosen_sorted)


def ats_select(tokens: Tensor, k: int, cls_attn: Tensor, values: Tensor | None, *,
               has_cls: bool = False) -> Reduction:
    """Adaptive token sampling of at most ``k`` tokens (CLS included) per sample.

    Args:
        tokens: ``[B, N, D]``.
        k: the budget (upper bound on the count); ``k = N`` keeps every token.
        cls_attn: ``[B, N]`` CLS attention aligned with the tokens.
        values: ``[B, N, Dv]`` attention values (or ``None``: attention-only significance).
        has_cls: ``tokens[:, 0]`` is CLS (always kept, not scored).

    Returns:
        ``Reduction`` with ``tokens`` ``[B, K', D]``, ``indices`` ``[B, K']``, ``mask``
        ``[B, K']`` (``K' <= k`` the largest count in the batch).
    """
    b, n, _ = tokens.shape
    c = int(has_cls)
    dev = tokens.device
    if k >= n:  # keeping every token: no sampling (the contract of every subset method)
        keep = torch.ones(b, n, dtype=torch.bool, device=dev)
        return select_mask(tokens, keep, always_mask=True)
    keep = torch.zeros(b, n, dtype=torch.bool, device=dev)
    keep[:, :c] = True
    if k - c > 0:
        sig = ats_significance(cls_attn[:, c:], None if values is None else values[:, c:])
        keep[:, c:] = inverse_transform_sample(sig, k - c)
    return select_mask(tokens, keep, always_mask=True)


@register(
    "ats",
    paper="Adaptive Token Sampling For Efficient Vision Transformers (ATS, Fayyaz et al., "
          "ECCV 2022)",
    stage="encoder", kind="subset", signals=("cls_attn", "values"),
    optional_signals=(),
    config=ATSConfig, features="vision", cls_token=True,
)
def ats_reduce(tokens: Tensor, k: int, signals: Signals, config: ATSConfig,
               generator: torch.Generator | None) -> Reduction:
    """Sample at most ``keep`` tokens by the inverse CDF of their significance.

    ``cls_attn`` ``[B, N]`` (or ``[B, L, N]``: last layer) and ``values`` ``[B, N, Dv]``
    (required unless ``use_values=False``) -> see :func:`ats_select`; ``mask`` is always set.
    """
    n = tokens.shape[1]
    floor = min(config.min_tokens, n)
    if k < floor:
        raise ValueError(f"ats: keep={k} is below the official minimum of {floor} tokens "
                         f"(option min_tokens={config.min_tokens})")
    if config.use_values:
        signals.require("values", "ats")
    values = signals.values if config.use_values else None
    return ats_select(tokens, k, signals.layer("cls_attn", "ats"), values,
                      has_cls=config.has_cls)


# -- inside the encoder ------------------------------------------------------------------------
#: ATS's official sampling blocks (0-based, of a 12-block DeiT) and its minimum token count.
OFFICIAL_LAYERS = tuple(range(3, 12))
OFFICIAL_DEPTH = 12


@dataclass(frozen=True)
class PaddedLayerStep(LayerStep):
    """A :class:`LayerStep` whose images keep different counts.

    Attributes:
        mask: ``[B, T']`` bool, True on real tokens (first in each row), False on padding
            (``None``: every image kept ``T'`` tokens).
    """

    mask: Tensor | None = None


def padded_subset_step(tokens: Tensor, sizes: Tensor | None, keep: Tensor) -> PaddedLayerStep:
    """The encoder step keeping the tokens of ``keep`` ``[B, T]`` (bool; counts may differ per
    image): real tokens first in original order, the batch padded to the largest count
    (:func:`~tokensieve.core.ops.select_mask`), dropped tokens' slot -1, sizes carried."""
    b, t, _ = tokens.shape
    r = select_mask(tokens, keep)
    dev = tokens.device
    kept = r.indices  # [B, T'] (padding repeats the row's last real index)
    width = kept.shape[1]
    mask = r.mask
    real_out = torch.ones(b, width, dtype=torch.bool, device=dev) if mask is None else mask
    ranks = torch.arange(width, device=dev).expand(b, -1)
    slot = torch.full((b, t + 1), -1, dtype=torch.long, device=dev).scatter(
        1, torch.where(real_out, kept, t), ranks)[:, :t]
    prior = torch.ones(b, t, device=dev) if sizes is None else sizes.float()
    new_sizes = torch.where(real_out, prior.gather(1, kept), 0.0)
    return PaddedLayerStep(tokens=r.tokens, sizes=new_sizes, slot=slot, kept=kept, mask=mask)


def ats_layer_keep(cls_attn: Tensor, values: Tensor | None, valid: Tensor | None,
                   tokens: int | None, min_tokens: int) -> Tensor:
    """Which tokens one ATS block keeps, ``[B, T]`` bool (CLS always, padding never).

    Per image, over its ``R`` real tokens (token 0: CLS): ``K = tokens`` (``None``: ``R``,
    the official ``num_tokens`` equal to the block's count), raised to ``min_tokens`` and
    capped at ``R``; ``K - 1`` targets are placed on the normalised CDF of the patches'
    significance (:func:`ats_significance`, :func:`inverse_transform_sample`) and
    duplicates dropped, so an image keeps at most ``K`` tokens.

    Args:
        cls_attn: ``[B, T]`` head-mean CLS attention (0 on padded keys).
        values: ``[B, T, H*Dh]`` value projections (``None``: attention-only significance).
        valid: ``[B, T]`` bool real tokens, first in each row (``None``: all real).
        tokens: the block's budget ``K`` (CLS included) or ``None``.
        min_tokens: ATS's lower bound on ``K`` (8).
    """
    b, t = cls_attn.shape
    counts = [t] * b if valid is None else valid.sum(dim=1).tolist()
    keep = torch.zeros(b, t, dtype=torch.bool, device=cls_attn.device)
    keep[:, 0] = True
    for i, real in enumerate(counts):  # each image over its own real tokens
        k = min(max(real if tokens is None else tokens, min_tokens), real)
        if k < 2 or real < 2:
            continue
        sig = ats_significance(cls_attn[i:i + 1, 1:real],
                               None if values is None else values[i:i + 1, 1:real])
        keep[i, 1:real] = inverse_transform_sample(sig, k - 1)[0]
    return keep


@register_encoder_schedule("ats")
@dataclass(frozen=True)
class ATSSchedule(EncoderSchedule):
    """In-encoder options of ``ats`` (official DeiT defaults: ATS blocks 3..11 of 12,
    ``num_tokens`` = the block's count, at least 8 tokens).

    In each ATS layer, between the attention residual and the MLP, every image keeps CLS and
    the patches picked by inverse transform sampling of ``S_j = cls_attn_j ||V_j||`` (the
    layer's own CLS attention row and value projections, all heads). The count adapts per
    image: the batch is padded to the largest count with a key padding mask that every
    later layer gets (``PaddedLayerStep.mask``); a padded token is never sampled and does
    not change a real token's output, so a batch gives each image's own result. The
    official code samples over the batch's padded width (zero-significance padding shifts
    the normalised CDF, so an image's picks depend on its batch); here each image samples
    over its own real tokens.

    Attributes:
        tokens: ``num_tokens`` of each ATS layer (targets + CLS, an upper bound on the
            count kept); ``None``: the layer's real count per image (official).
        layers: 0-based layers that sample; ``None``: 3..11 of 12 scaled to the depth
            (``l * depth // 12``).
        min_tokens: ATS's floor on ``tokens`` (8).
        use_values: weight the CLS attention by ``||V_j||`` (official); False: attention
            only.
    """

    tokens: int | None = None
    layers: tuple[int, ...] | None = None
    min_tokens: int = 8
    use_values: bool = True

    signals: ClassVar[tuple[str, ...]] = ("cls_attn", "values")
    needs_cls: ClassVar[bool] = True
    pads: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for name in ("tokens", "min_tokens"):
            v = getattr(self, name)
            if v is None and name == "tokens":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ats: {name}={v!r}: expected an int >= 1")
        if self.layers is not None:
            ok = isinstance(self.layers, (tuple, list)) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.layers)
            if not ok:
                raise ValueError(f"ats: layers={self.layers!r}: expected a tuple of 0-based "
                                 "encoder layer indices")
        check_flag(self.use_values, "use_values", "ats")

    def plan(self, depth: int) -> dict[int, Any]:
        layers = encoder_layers("ats", self.layers, OFFICIAL_LAYERS, OFFICIAL_DEPTH, depth)
        return {v: self.tokens for v in layers}

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        """The most tokens the layer keeps (its ``num_tokens`` cap); images keep fewer when
        their sampled targets collide (the stage records what they kept)."""
        return tokens if param is None else min(max(int(param), self.min_tokens), tokens)

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> ATSSchedule:
        """``num_tokens = keep`` (+ CLS) in every ATS layer: ``keep`` caps the patch tokens
        each image keeps (as for every adaptive method); the count adapts below it."""
        if "tokens" in options:
            raise ValueError("ats: keep and tokens both set; keep sets tokens (keep + CLS)")
        floor = options.get("min_tokens", 8)
        if keep + int(has_cls) < floor and keep < tokens - int(has_cls):
            raise ValueError(f"ats: keep={keep} is below ATS's floor of min_tokens={floor} "
                             "tokens (CLS included); pass min_tokens to lower it")
        return cls(tokens=keep + int(has_cls), **options)

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        """One ATS layer on ``tokens`` ``[B, T, D]`` (token 0: CLS; ``signals``:
        ``cls_attn`` ``[B, T]``, ``values`` ``[B, T, H*Dh]``, ``valid`` ``[B, T]`` when
        padded). Returns a :class:`PaddedLayerStep` (``mask`` None when every image keeps
        the same count); None when every image keeps every real token."""
        b, t, _ = tokens.shape
        valid = signals.get("valid")
        values = signals["values"] if self.use_values else None
        keep = ats_layer_keep(signals["cls_attn"], values, valid, param, self.min_tokens)
        real = torch.ones_like(keep) if valid is None else valid
        if bool((keep == real).all()):
            return None
        return padded_subset_step(tokens, sizes, keep)
