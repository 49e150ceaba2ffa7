"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022).

"Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations" (EViT). In a block, the patch tokens are ranked by the head-mean attention
the CLS token pays them; the top ones are kept and the rest are fused into one token

    x_fused = sum_{j dropped} a_j x_j

with ``a_j`` the CLS attention of token ``j``. Official quirk: the weights are not
renormalised over the dropped tokens (they sum to the dropped attention mass, < 1), so the
fused token is shrunk towards zero; ``fuse_normalize=True`` divides by ``sum_j a_j``
(a proper weighted mean). The official code keeps the tokens in attention order; here they
keep their original order (project policy).

Inside a vision encoder (``ts.apply(model, "evit")``, :class:`EViTSchedule`): at layers
3, 6 and 9 of 12 (0-based, scaled to the depth), between the attention and the MLP, each
image keeps CLS + ``ceil(0.7 (T - 1))`` patch tokens (a fused token of an earlier layer
counts as a patch) and fuses the rest, as the official ``Block``.
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
    encoder_layers,
    register_encoder_schedule,
)
from tokensieve.core.ops import gather_tokens, topk_indices
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._matching import check_cls_budget, check_flag


@dataclass(frozen=True)
class EViTConfig:
    """Options of ``evit``.

    Attributes:
        has_cls: ``tokens[:, 0]`` is a CLS token: always kept first, counted in ``keep``;
            ``cls_attn[:, 0]`` (its self attention) is ignored.
        fuse: append the fused token of the dropped tokens (the paper's inattentive token
            fusion). ``False``: a pure subset (CLS + top tokens).
        fuse_normalize: corrected variant: fused token = attention-weighted *mean* of the
            dropped tokens (official: the unnormalised sum).
    """

    has_cls: bool = False
    fuse: bool = True
    fuse_normalize: bool = False

    def __post_init__(self) -> None:
        for name in ("has_cls", "fuse", "fuse_normalize"):
            check_flag(getattr(self, name), name, "evit")


def evit_select(tokens: Tensor, k: int, cls_attn: Tensor, *, has_cls: bool = False,
                fuse: bool = True, fuse_normalize: bool = False) -> Reduction:
    """Keep the top tokens by CLS attention and (optionally) fuse the rest into one token.

    The output has exactly ``k`` tokens: ``[CLS] + top-(k - has_cls - fuse) patches`` (in
    original order) ``+ [fused]``.

    Args:
        tokens: ``[B, N, D]`` (with ``has_cls``, ``tokens[:, 0]`` is CLS).
        k: output count, ``has_cls + fuse <= k <= N``.
        cls_attn: ``[B, N]`` head-mean CLS attention aligned with the tokens.
        has_cls: keep ``tokens[:, 0]`` first.
        fuse: append the fused token.
        fuse_normalize: divide the fused sum by the dropped attention mass (if that mass is
            0, the fused token is the plain mean of the dropped tokens).

    Returns:
        ``Reduction``: ``tokens`` ``[B, k, D]``; ``indices`` ``[B, k - fuse]`` kept source
        positions (ascending, CLS first); ``positions`` ``[B, k]`` (the fused token's is its
        most-attended dropped token); with ``fuse``, ``sizes`` ``[B, k]`` (1 for kept
        tokens, the dropped count for the fused one) and ``assignment`` ``[B, N]``.
    """
    b, n, _ = tokens.shape
    c, f = int(has_cls), int(fuse)
    if c + f:
        check_cls_budget(k, n, c + f, "evit",
                         " plus ".join(["a CLS token"] * c + ["the fused token"] * f))
    scores = cls_attn.float()[:, c:]
    top = topk_indices(scores, k - c - f) + c
    dev = tokens.device
    indices = torch.cat([torch.zeros(b, c, dtype=torch.long, device=dev), top], dim=1)
    kept = gather_tokens(tokens, indices)
    if not fuse:
        return Reduction(tokens=kept, indices=indices)
    drop = torch.ones(b, n - c, dtype=torch.bool, device=dev)
    drop.scatter_(1, top - c, False)
    weights = torch.where(drop, scores, torch.zeros_like(scores))
    if fuse_normalize:
        mass = weights.sum(dim=1, keepdim=True)
        uniform = drop.float() / drop.sum(dim=1, keepdim=True)
        weights = torch.where(mass > 0, weights / mass.clamp(min=torch.finfo(torch.float32).tiny),
                              uniform)
    fused = torch.einsum("bn,bnd->bd", weights, tokens[:, c:].float()).to(tokens.dtype)
    masked = torch.where(drop, scores, torch.full_like(scores, -torch.inf))
    fused_pos = masked.argmax(dim=1, keepdim=True) + c
    slots = torch.arange(k - 1, device=dev).unsqueeze(0).expand(b, -1)
    assignment = torch.full((b, n), k - 1, dtype=torch.long, device=dev).scatter(
        1, indices, slots)
    sizes = torch.ones(b, k, dtype=torch.long, device=dev)
    sizes[:, -1] = drop.sum(dim=1)
    return Reduction(
        tokens=torch.cat([kept, fused.unsqueeze(1)], dim=1),
        indices=indices,
        positions=torch.cat([indices, fused_pos], dim=1),
        sizes=sizes,
        assignment=assignment,
    )


@register(
    "evit",
    paper="Not All Patches are What You Need: Expediting Vision Transformers via Token "
          "Reorganizations (EViT, Liang et al., ICLR 2022)",
    stage="encoder", kind="subset+merge", signals=("cls_attn",), config=EViTConfig,
    features="vision", cls_token=True,
)
def evit_reduce(tokens: Tensor, k: int, signals: Signals, config: EViTConfig,
                generator: torch.Generator | None) -> Reduction:
    """Keep the most attended tokens plus one fused token, ``keep`` tokens in all.

    ``cls_attn`` ``[B, N]`` (or ``[B, L, N]``: the last layer is used) -> see
    :func:`evit_select`.
    """
    return evit_select(tokens, k, signals.layer("cls_attn", "evit"), has_cls=config.has_cls,
                       fuse=config.fuse, fuse_normalize=config.fuse_normalize)


# -- inside the encoder ------------------------------------------------------------------------
#: EViT's official reduction layers (0-based blocks of a 12-layer ViT) and keep rate.
OFFICIAL_LAYERS = (3, 6, 9)
OFFICIAL_DEPTH = 12


@register_encoder_schedule("evit")
@dataclass(frozen=True)
class EViTSchedule(EncoderSchedule):
    """In-encoder options of ``evit`` (official defaults: ``drop_loc`` (3, 6, 9) of 12
    blocks, ``base_keep_rate`` 0.7, inattentive token fusion).

    Attributes:
        keep_rate: share of the patch tokens (CLS excluded, an earlier fused token
            included) kept at each reduction layer: ``ceil(keep_rate * (T - 1))``.
        layers: 0-based encoder layers that reduce; ``None``: (3, 6, 9) scaled to the depth
            (``l * depth // 12``; 6, 12, 18 of 24 layers).
        fuse: add the fused token of the dropped ones (official default of EViT's runs).
        fuse_normalize: corrected variant of the fused token (a weighted mean).
    """

    keep_rate: float = 0.7
    layers: tuple[int, ...] | None = None
    fuse: bool = True
    fuse_normalize: bool = False

    signals: ClassVar[tuple[str, ...]] = ("cls_attn",)
    needs_cls: ClassVar[bool] = True

    def __post_init__(self) -> None:
        rate = self.keep_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f"evit: keep_rate={rate!r}: expected a float in (0, 1]")
        if self.layers is not None:
            ok = isinstance(self.layers, (tuple, list)) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.layers)
            if not ok:
                raise ValueError(f"evit: layers={self.layers!r}: expected a tuple of 0-based "
                                 "encoder layer indices")
        for name in ("fuse", "fuse_normalize"):
            check_flag(getattr(self, name), name, "evit")

    def plan_layers(self, depth: int) -> tuple[int, ...]:
        """The layers that reduce in a ``depth``-layer encoder (the option, or the official
        ones scaled)."""
        return encoder_layers("evit", self.layers, OFFICIAL_LAYERS, OFFICIAL_DEPTH, depth)

    def plan(self, depth: int) -> dict[int, Any]:
        layers = self.plan_layers(depth)
        return {} if self.keep_rate >= 1 else {v: self.keep_rate for v in layers}

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        """One EViT layer on ``tokens`` ``[B, T, D]`` (token 0: CLS) with the layer's CLS
        attention ``signals["cls_attn"]`` ``[B, T]``: :func:`evit_select` keeps CLS + the
        ``ceil(param * (T - 1))`` most attended tokens and fuses the rest."""
        b, t, _ = tokens.shape
        left = math.ceil(float(param) * (t - 1))
        if left >= t - 1:
            return None
        k = 1 + left + int(self.fuse)
        r = evit_select(tokens, k, signals["cls_attn"], has_cls=True, fuse=self.fuse,
                        fuse_normalize=self.fuse_normalize)
        dev = tokens.device
        if r.assignment is not None:
            slot = r.assignment
        else:
            slot = torch.full((b, t), -1, dtype=torch.long, device=dev).scatter(
                1, r.indices, torch.arange(k, device=dev).expand(b, -1))
        kept = r.positions if r.positions is not None else r.indices
        prior = torch.ones(b, t, device=dev) if sizes is None else sizes.float()
        new_sizes = torch.zeros(b, k + 1, device=dev).scatter_add_(
            1, torch.where(slot < 0, k, slot), prior)[:, :k]
        return LayerStep(tokens=r.tokens, sizes=new_sizes, slot=slot, kept=kept)

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        left = math.ceil(float(param) * (tokens - 1))
        return tokens if left >= tokens - 1 else 1 + left + int(self.fuse)

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> EViTSchedule:
        """The keep rate leaving ``keep`` patch tokens (the fused token counted) after the
        schedule's layers among ``layers``: the smallest rate that reaches ``keep``, found
        by bisection (every count between the smallest and ``tokens - 1`` is reachable: a
        rate step moves each layer's count by at most one)."""
        if "keep_rate" in options:
            raise ValueError("evit: keep and keep_rate both set; keep solves the keep rate")
        where = [i for i in cls(**options).plan_layers(depth) if i <= until]

        def patches(rate: float) -> int:
            sched = cls(keep_rate=rate, **options)
            t = tokens
            for _ in where:
                t = sched.count(rate, t, True)
            return t - 1

        if keep >= tokens - 1:
            return cls(keep_rate=1.0, **options)
        if not where or patches(1e-9) > keep:
            raise ValueError(f"evit: keep={keep} is out of reach: its {len(where)} reducing "
                             f"layer(s) leave at least {patches(1e-9) if where else tokens - 1} "
                             "patch tokens")
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if mid > 0 and patches(mid) >= keep:
                hi = mid
            else:
                lo = mid
        if patches(hi) != keep:  # pragma: no cover - see the docstring
            raise ValueError(f"evit: no keep rate leaves exactly {keep} patch tokens")
        return cls(keep_rate=hi, **options)
