"""MCTF: multi-criteria token fusion (Lee, Choi & Kim, CVPR 2024).

"Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision
Transformers" (MCTF). ToMe's bipartite matching (set A: even positions, set B: odd) with
the edge weight between ``a`` and ``b`` the product of three criteria:

    W_sim  = ((cos(a, b) + 1) / 2) ^ (1 / tau_sim)                      similarity
    W_info = (ia * ib) ^ (1 / tau_info),  i = (1 / attn) / max(1 / attn)  informativeness
    W_size = (sa * sb) ^ (1 / tau_size),  s = (1 / size) / max(1 / size)  size

with ``attn`` the attention each token receives (mean over heads and queries) and
``size`` the tokens it already stands for; official ``tau_sim, tau_info, tau_size =
1, 20, 40``. Bidirectional matching: ``r // 2`` A tokens are merged into their best B
token first, then the ``r - r // 2`` B tokens (with what they received) whose best
weight towards a *remaining* A token is highest are merged into it (the weights are not
recomputed between the two steps). Merged tokens are pooled with weights ``attn * size /
max(size)`` (official ``pooling_type`` 1; ``pooling="size"``: ToMe's size-weighted mean).
The matching metric is the tokens themselves (the official code matches on ``x``, not on
keys). The CLS token is never merged. Output order: the surviving tokens in their original
order (the official code puts the A survivors, then the unmerged B tokens).

Inside a vision encoder (``ts.apply(model, "mctf")``, :class:`MCTFSchedule`): ``r`` tokens
per layer at layers 1..11 of 12 (the official DeiT evaluation, scaled to the depth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from tokensieve.core.encoder_schedule import (
    EncoderSchedule,
    LayerStep,
    encoder_layers,
    register_encoder_schedule,
    spread_merges,
)
from tokensieve.core.ops import normalize
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._matching import (
    Matching,
    MergeResult,
    check_cls_budget,
    check_flag,
    check_sizes,
    merge_reduction,
)

POOLINGS = ("attn", "size")


def _check_tau(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"mctf: {name}={value!r}: expected a finite number >= 0 (0: the "
                         "criterion is off)")


@dataclass(frozen=True)
class MCTFConfig:
    """Options of ``mctf`` (official defaults).

    Attributes:
        has_cls: ``tokens[:, 0]`` is a CLS token (never merged, kept first, counted).
        tau_sim, tau_info, tau_size: temperatures of the three criteria (0: off).
        bidirectional: the second matching step from B to the remaining A tokens.
        pooling: "attn" (weights ``attn * size / max size``, official) or "size".
    """

    has_cls: bool = False
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirectional: bool = True
    pooling: Literal["attn", "size"] = "attn"

    def __post_init__(self) -> None:
        check_flag(self.has_cls, "has_cls", "mctf")
        check_flag(self.bidirectional, "bidirectional", "mctf")
        for name in ("tau_sim", "tau_info", "tau_size"):
            _check_tau(getattr(self, name), name)
        if self.pooling not in POOLINGS:
            raise ValueError(f"mctf: pooling={self.pooling!r}: expected one of {POOLINGS}")

    def required_signals(self) -> tuple[str, ...]:
        """``attn_received`` unless neither the informativeness nor the pooling use it."""
        return ("attn_received",) if self.tau_info > 0 or self.pooling == "attn" else ()


def mctf_match(metric: Tensor, r: int, *, attn: Tensor | None = None,
               sizes: Tensor | None = None, tau_sim: float = 1.0, tau_info: float = 20.0,
               tau_size: float = 40.0, bidirectional: bool = True,
               protect_first: bool = False) -> Matching:
    """One MCTF matching over ``T`` tokens that removes ``r`` of them.

    Args:
        metric: ``[B, T, C]`` matching features (the tokens; normalised here, float32).
        r: tokens removed, ``0 <= r <= (T - protect_first) // 2``.
        attn: ``[B, T]`` attention each token receives (positive); ``None``: no W_info.
        sizes: ``[B, T]`` token sizes; ``None``: no W_size.
        tau_sim, tau_info, tau_size: the criteria's temperatures (0: off).
        bidirectional: ``r // 2`` A -> B merges, then ``r - r // 2`` B -> remaining A.
        protect_first: never merge token 0 (CLS).

    Returns:
        A :class:`~tokensieve.methods._matching.Matching` (``src``: every merged token,
        ``dst``: the surviving token its group ends in). Ties: the lower index first.
    """
    b, t, _ = metric.shape
    dev = metric.device
    limit = max((t - int(protect_first)) // 2, 0)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= limit:
        raise ValueError(f"mctf: r={r!r}: expected an int in [0, {limit}]")
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    m = normalize(metric)
    a, bb = m[:, ::2], m[:, 1::2]
    ta, tb = a.shape[1], bb.shape[1]
    if tau_sim:
        scores = ((a @ bb.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)  # [B, TA, TB]
    else:
        scores = torch.ones(b, ta, tb, device=dev)
    if tau_info and attn is not None:
        inv = 1 / attn.float()
        inv = inv / inv.amax(dim=1, keepdim=True)
        scores = scores * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau_info)
    if tau_size and sizes is not None:
        inv = 1 / sizes.float()
        inv = inv / inv.amax(dim=1, keepdim=True)
        scores = scores * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau_size)
    if protect_first:
        scores[:, 0, :] = -torch.inf
    best, best_b = scores.max(dim=-1)  # [B, TA]
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src_a = order[:, :r1]
    owner = torch.arange(t, device=dev).unsqueeze(0).repeat(b, 1)
    owner.scatter_(1, 2 * src_a, 2 * best_b.gather(1, src_a) + 1)
    if r2:
        unm = order[:, r1:].sort(dim=1).values  # remaining A tokens, ascending
        s2 = scores.gather(1, unm.unsqueeze(-1).expand(-1, -1, tb)).transpose(1, 2)
        best2, best_u = s2.max(dim=-1)  # [B, TB]: each B token's best remaining A
        src_b = torch.sort(best2, dim=-1, descending=True, stable=True).indices[:, :r2]
        owner.scatter_(1, 2 * src_b + 1, 2 * unm.gather(1, best_u.gather(1, src_b)))
    owner = owner.gather(1, owner)  # A -> B -> A chains end in a surviving A token
    ar = torch.arange(t, device=dev).unsqueeze(0)
    survive = owner == ar
    rank = survive.long().cumsum(dim=1) - 1
    slot = rank.gather(1, owner)
    kept = torch.nonzero(survive)[:, 1].reshape(b, t - r)
    src = torch.nonzero(~survive)[:, 1].reshape(b, r)
    return Matching(slot=slot, kept=kept, src=src, dst=owner.gather(1, src))


def mctf_pool(match: Matching, x: Tensor, sizes: Tensor | None, attn: Tensor | None,
              pooling: str = "attn") -> tuple[Tensor, Tensor, Tensor | None]:
    """MCTF's pooling of the groups of ``match``: ``x`` ``[B, T, C]``, ``sizes`` ``[B, T]``
    (ones if None), ``attn`` ``[B, T]`` received attention. Weights ``attn * size /
    max(size)`` ("attn", official) or ``size`` ("size"). Returns ``(x' [B, T', C] in x's
    dtype, sizes' [B, T'] float32, attn' [B, T']``: the same weighted mean of the received
    attention (one-step-ahead's merged key columns, up to a constant), or None)."""
    s = torch.ones(x.shape[:2], device=x.device) if sizes is None else sizes.float()
    if pooling == "attn":
        if attn is None:
            raise ValueError("mctf: pooling='attn' needs the attention each token receives")
        w = attn.float() * s / s.amax(dim=1, keepdim=True)
    else:
        w = s
    norm = match.merge(w.unsqueeze(-1), "sum")
    out = match.merge(x.float() * w.unsqueeze(-1), "sum") / norm
    new_sizes = match.merge(s.unsqueeze(-1), "sum").squeeze(-1)
    new_attn = None
    if attn is not None:
        new_attn = (match.merge((attn.float() * w).unsqueeze(-1), "sum") / norm).squeeze(-1)
    return out.to(x.dtype), new_sizes, new_attn


def mctf_merge(tokens: Tensor, k: int, *, attn: Tensor | None = None,
               sizes: Tensor | None = None, config: MCTFConfig = MCTFConfig()) -> MergeResult:
    """Merge ``tokens`` ``[B, N, D]`` to ``k`` tokens by rounds of MCTF matching.

    Each round removes ``min(T - k, (T - has_cls) // 2)`` tokens (the official 50 % cap);
    between rounds the received attention of a group is its pooled weighted mean.

    Args:
        tokens: ``[B, N, D]``.
        k: tokens kept, ``has_cls + 1 <= k <= N``.
        attn: ``[B, N]`` attention each token receives (needed by the default options).
        sizes: optional prior sizes ``[B, N]``.
        config: the criteria (``config.has_cls`` protects token 0).
    """
    b, n, _ = tokens.shape
    c = int(config.has_cls)
    check_cls_budget(k, n, 1 + c, "mctf", "a CLS token plus one merged token")
    s = None if sizes is None else check_sizes(sizes, b, n, "mctf")
    if attn is not None:
        attn = attn.float().clamp(min=torch.finfo(torch.float32).tiny)
    x = tokens
    positions = torch.arange(n, device=tokens.device).unsqueeze(0).expand(b, -1)
    assignment = positions
    t = n
    while t > k:
        r = min(t - k, (t - c) // 2)
        match = mctf_match(x, r, attn=attn, sizes=s, tau_sim=config.tau_sim,
                           tau_info=config.tau_info, tau_size=config.tau_size,
                           bidirectional=config.bidirectional, protect_first=config.has_cls)
        x, s, attn = mctf_pool(match, x, s, attn, config.pooling)
        positions = positions.gather(1, match.kept)
        assignment = match.slot.gather(1, assignment)
        t -= r
    final = torch.ones(b, n, device=tokens.device) if s is None else s
    return MergeResult(tokens=x, sizes=final, positions=positions, assignment=assignment)


@register(
    "mctf",
    paper="Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision "
          "Transformers (MCTF, Lee et al., CVPR 2024)",
    stage="encoder", kind="merge", signals=("attn_received",), config=MCTFConfig,
    features="vision", cls_token=True,
)
def mctf_reduce(tokens: Tensor, k: int, signals: Signals, config: MCTFConfig,
                generator: torch.Generator | None) -> Reduction:
    """Merge the token set to ``keep`` tokens by multi-criteria fusion.

    ``tokens`` ``[B, N, D]`` and ``attn_received`` ``[B, N]`` (or ``[B, L, N]``: the last
    layer) -> ``Reduction`` with ``tokens`` ``[B, keep, D]`` (surviving tokens in original
    order), ``positions``, ``sizes`` (counts) and ``assignment`` ``[B, N]``.
    """
    attn = None
    if config.required_signals():
        attn = signals.layer("attn_received", "mctf")
    return merge_reduction(mctf_merge(tokens, k, attn=attn, config=config))


# -- inside the encoder ------------------------------------------------------------------------
#: The official DeiT evaluation: r = 16 at blocks 1..11 of 12 (0-based).
OFFICIAL_LAYERS = tuple(range(1, 12))
OFFICIAL_DEPTH = 12


@register_encoder_schedule("mctf")
@dataclass(frozen=True)
class MCTFSchedule(EncoderSchedule):
    """In-encoder options of ``mctf`` (official DeiT evaluation: ``r = 16`` at layers 1..11
    of 12, taus 1 / 20 / 40, bidirectional, attention pooling, proportional attention).

    Where the merge runs (``one_step_ahead``): official 1 merges at the start of a layer
    from the attention of its unmerged input and re-uses that attention map, merged, for
    the layer (needs the attention matrix itself: not available under SDPA, refused);
    2 (official "precise" variant, default here) merges at the start of the layer from
    the attention of its unmerged input, then the layer's attention runs on the merged
    tokens; 0 merges after the layer's MLP from the layer's own attention.
    Per merge, ``r`` is the official rule: ``t - 10`` if fewer than 10 tokens would be
    left, a fraction of the patches if below 1, capped at half the patches.

    Attributes:
        r: tokens merged per layer (int, or a float in (0, 1): share of the patches).
        layers: 0-based merging layers; ``None``: 1..11 of 12 scaled to the depth.
        tau_sim, tau_info, tau_size, bidirectional, pooling: as :class:`MCTFConfig`.
        prop_attn: proportional attention (``log(size)`` on the keys; official on).
        one_step_ahead: 2 (default) or 0, see above.
    """

    r: int | float | list[int] = 16
    layers: tuple[int, ...] | None = None
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirectional: bool = True
    pooling: Literal["attn", "size"] = "attn"
    prop_attn: bool = True
    one_step_ahead: int = 2

    signals: ClassVar[tuple[str, ...]] = ("attn_received",)

    def __post_init__(self) -> None:
        def count(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        r = self.r
        if not (count(r) or (isinstance(r, float) and 0 <= r < 1)
                or (isinstance(r, list) and all(count(v) for v in r))):
            raise ValueError(f"mctf: r={r!r}: expected an int >= 0, a float in [0, 1) or a "
                             "list of ints >= 0 (one per merging layer)")
        if self.layers is not None:
            ok = isinstance(self.layers, (tuple, list)) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.layers)
            if not ok:
                raise ValueError(f"mctf: layers={self.layers!r}: expected a tuple of 0-based "
                                 "encoder layer indices")
        MCTFConfig(tau_sim=self.tau_sim, tau_info=self.tau_info, tau_size=self.tau_size,
                   bidirectional=self.bidirectional, pooling=self.pooling)
        check_flag(self.prop_attn, "prop_attn", "mctf")
        if self.one_step_ahead == 1 and not isinstance(self.one_step_ahead, bool):
            raise ValueError("mctf: one_step_ahead=1 applies the merged attention map itself "
                             "(no SDPA kernel takes it); use 2 (the official precise variant: "
                             "attention re-run on the merged tokens) or 0")
        if isinstance(self.one_step_ahead, bool) or self.one_step_ahead not in (0, 2):
            raise ValueError(f"mctf: one_step_ahead={self.one_step_ahead!r}: expected 2 or 0")

    @property
    def position(self) -> str:
        """Where the stage runs the step: before the layer (2) or after its MLP (0)."""
        return "pre" if self.one_step_ahead else "post"

    @property
    def proportional(self) -> bool:
        return self.prop_attn

    def plan(self, depth: int) -> dict[int, Any]:
        layers = encoder_layers("mctf", self.layers, OFFICIAL_LAYERS, OFFICIAL_DEPTH, depth)
        if isinstance(self.r, list):
            if len(self.r) != len(layers):
                raise ValueError(f"mctf: r={self.r!r} gives {len(self.r)} counts for the "
                                 f"{len(layers)} merging layers {layers}")
            return {v: r for v, r in zip(layers, self.r, strict=True) if r > 0}
        return {} if self.r == 0 else {v: self.r for v in layers}

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> MCTFSchedule:
        """``r`` per merging layer (its ``layers``, official 1..11 of 12 scaled) leaving ``keep``
        patch tokens, spread as ``tome`` spreads it
        (:func:`~tokensieve.core.encoder_schedule.spread_merges`) under MCTF's caps (half
        the patches, at least 10 tokens left); layers after ``until`` merge nothing."""
        if "r" in options:
            raise ValueError("mctf: keep and r both set; keep solves r (a per-layer list)")
        c = int(has_cls)
        layers = encoder_layers("mctf", options.get("layers"), OFFICIAL_LAYERS,
                                OFFICIAL_DEPTH, depth)
        rs = spread_merges("mctf", tokens, keep, has_cls, [v for v in layers if v <= until],
                           lambda t: max(min(t - 10, (t - c) // 2), 0))
        return cls(r=[rs.get(v, 0) for v in layers], **options)

    @staticmethod
    def layer_r(param: int | float, t: int, has_cls: bool) -> int:
        """The official per-merge count for ``t`` tokens (see the class doc)."""
        c = int(has_cls)
        r: int | float = param
        if t - r < 10:
            r = t - 10
        r = min(int((t - c) * r) if r < 1 else int(r), (t - c) // 2)
        return max(r, 0)

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        return tokens - self.layer_r(param, tokens, has_cls)

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        """One MCTF merge of ``tokens`` ``[B, T, D]`` matched on the tokens, with the
        layer's received attention ``signals["attn_received"]`` ``[B, T]``."""
        r = self.layer_r(param, tokens.shape[1], has_cls)
        if r <= 0:
            return None
        attn = signals["attn_received"].clamp(min=torch.finfo(torch.float32).tiny)
        match = mctf_match(tokens, r, attn=attn, sizes=sizes, tau_sim=self.tau_sim,
                           tau_info=self.tau_info, tau_size=self.tau_size,
                           bidirectional=self.bidirectional, protect_first=has_cls)
        merged, new_sizes, _ = mctf_pool(match, tokens, sizes, attn, self.pooling)
        return LayerStep(tokens=merged, sizes=new_sizes, slot=match.slot, kept=match.kept)
