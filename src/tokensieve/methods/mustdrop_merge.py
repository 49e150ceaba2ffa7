"""MustDrop, vision-encoder stage: merge spatially adjacent windows of near-identical tokens.

"Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model"
(MustDrop, Liu et al., 2024). Official code: github.com/liuting20/MustDrop
(``conditional_pooling`` in ``llava/model/multimodal_encoder/local_merge.py``, called by
``CLIPVisionModelAcc.custom_forward`` after encoder layer 0 with threshold 0.8 and 3 x 3
windows). Per image:

1. the patch grid is tiled into non-overlapping ``window x window`` windows from the top
   left (the official code asserts that they tile the grid exactly; here windows cut by
   the grid's edge are never merged, so grids like 8 x 8 work too);
2. a window's similarity is the mean cosine similarity over its ordered pairs of distinct
   tokens (``sum_{i != j} cos(x_i, x_j) / (w^2 (w^2 - 1))``);
3. every window whose similarity is at least ``threshold`` merges into one token, the
   size-weighted mean of its tokens, represented by its last token (bottom right);
4. output order (official): CLS (in a tower), the merged windows by descending
   similarity (ties: lower window first), then the unmerged tokens in raster order.
   ``order="raster"`` puts each merged token at its window's last token instead.

The official code merges the same number of windows in every image of a batch (the
smallest count over the batch); here each image merges its own windows (the official
code runs batch 1, where the two agree), so counts differ and a batch is padded with a
mask. ``ts.apply(model, "mustdrop-merge")`` runs this stage after layer 0 of the vision
tower and, by default, MustDrop's prefill stage (``mustdrop``) in the LLM. The key set:
in a tower with a CLS token, the last layer's head-mean CLS attention row over the tokens
it gets (the features after the merge) picks ``ceil(0.08 * patches)`` tokens per image
(official ``keep_rate``), which MustDrop's prefill stage never drops.
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
)
from tokensieve.core.ops import merge_into_slots, normalize
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals, infer_grid
from tokensieve.methods.ats import PaddedLayerStep

ORDERS = ("official", "raster")


@dataclass(frozen=True)
class MustDropMergeConfig:
    """Options (official: threshold 0.8, 3 x 3 windows, the official output order).

    Attributes:
        threshold: a window merges when its mean pairwise cosine similarity is at least this.
        window: the window side, in tokens.
        order: "official" (merged windows first, by descending similarity, then the other
            tokens in raster order) or "raster" (each merged token at its window's last
            token).
    """

    threshold: float = 0.8
    window: int = 3
    order: Literal["official", "raster"] = "official"

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or not -1 <= t <= 1:
            raise ValueError(f"mustdrop-merge: threshold={t!r}: expected a cosine similarity "
                             "in [-1, 1]")
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int) or w < 2:
            raise ValueError(f"mustdrop-merge: window={w!r}: expected an int >= 2")
        if self.order not in ORDERS:
            raise ValueError(f"mustdrop-merge: order={self.order!r}: expected one of {ORDERS}")


def window_similarity(tokens: Tensor, grid: tuple[int, int], window: int) -> Tensor:
    """``[B, G]`` float32: the mean pairwise cosine similarity (distinct ordered pairs) of the
    tokens of every whole ``window x window`` window of ``tokens`` ``[B, H*W, D]`` (raster
    order), windows in raster order."""
    b, _, d = tokens.shape
    h, w = grid
    gh, gw = h // window, w // window
    x = normalize(tokens).view(b, h, w, d)[:, :gh * window, :gw * window]
    x = x.reshape(b, gh, window, gw, window, d).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, gh * gw, window * window, d)
    gram = x @ x.transpose(-1, -2)                              # [B, G, w^2, w^2]
    m = window * window
    return (gram.sum(dim=(-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (m * (m - 1))


def window_members(grid: tuple[int, int], window: int, device: torch.device) -> Tensor:
    """``[G, window^2]`` long: the raster indices of every whole window's tokens (raster
    order within the window; the last one is the window's representative)."""
    h, w = grid
    gh, gw = h // window, w // window
    idx = torch.arange(h * w, device=device).view(h, w)[:gh * window, :gw * window]
    idx = idx.reshape(gh, window, gw, window).permute(0, 2, 1, 3)
    return idx.reshape(gh * gw, window * window)


def merge_plan(sim: Tensor, grid: tuple[int, int], window: int, threshold: float,
               cap: int | None, order: str) -> tuple[Tensor, Tensor, list[int]]:
    """Which windows merge and where every token goes.

    Returns ``(assignment [B, N], positions [B, K'], counts)``: the output slot of each of
    the ``N = H*W`` tokens, the token representing each output slot (padding repeats the
    row's last one) and each image's output count. ``cap``: at most this many tokens per
    image (more windows merge, by descending similarity, when the threshold leaves more;
    ValueError when even every window merging leaves more).
    """
    b, g = sim.shape
    dev = sim.device
    n = grid[0] * grid[1]
    members = window_members(grid, window, dev)
    m = window * window
    assignment = torch.empty(b, n, dtype=torch.long, device=dev)
    rows: list[Tensor] = []
    for i in range(b):
        rank = torch.sort(-sim[i], stable=True).indices         # descending, ties: lower first
        r = int((sim[i] >= threshold).sum())
        if cap is not None and n - (m - 1) * r > cap:
            need = -(-(n - cap) // (m - 1))
            if need > g:
                raise ValueError(f"mustdrop-merge: keep={cap} is out of reach: merging all "
                                 f"{g} windows leaves {n - (m - 1) * g} of {n} tokens")
            r = need
        chosen = rank[:r]
        merged = torch.zeros(n, dtype=torch.bool, device=dev)
        merged[members[chosen].reshape(-1)] = True
        rest = torch.nonzero(~merged).squeeze(1)
        reps = members[chosen, -1]
        if order == "official":
            pos = torch.cat([reps, rest])
        else:
            pos = torch.sort(torch.cat([reps, rest])).values
        slot_of = torch.full((n,), -1, dtype=torch.long, device=dev)
        slot_of[pos] = torch.arange(len(pos), device=dev)
        assignment[i] = slot_of
        assignment[i, members[chosen].reshape(-1)] = slot_of[reps].repeat_interleave(m)
        rows.append(pos)
    counts = [len(p) for p in rows]
    width = max(counts)
    positions = torch.stack([torch.cat([p, p[-1:].expand(width - len(p))]) for p in rows])
    return assignment, positions, counts


def _check_cls(has_cls: object) -> bool:
    if not isinstance(has_cls, bool):
        raise ValueError(f"mustdrop-merge: has_cls={has_cls!r}: expected a bool")
    return has_cls


@register(
    "mustdrop-merge",
    paper="Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language "
          "Model (MustDrop, Liu et al., 2024), vision-encoder stage",
    stage="encoder", kind="merge", signals=(), optional_signals=("grid",),
    config=MustDropMergeConfig, llm_stage="mustdrop",
)
def mustdrop_merge(tokens: Tensor, k: int, signals: Signals, config: MustDropMergeConfig,
                   generator: torch.Generator | None) -> Reduction:
    """MustDrop's local spatial merging of a token grid -> at most ``k`` tokens per image.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` patch tokens in raster order (``grid`` ``(H, W)``, or a
            square grid).
        k: the most tokens an image keeps: ``k = N`` is the thresholds alone; a smaller
            ``k`` merges further windows by descending similarity (adaptive: an image may
            keep fewer).

    Returns:
        A merge :class:`Reduction`: tokens in the configured order, ``positions`` the
        representing token of each, ``sizes``, ``assignment``; ``mask`` when images keep
        different counts (padding last, zero tokens).
    """
    b, n, _ = tokens.shape
    grid = infer_grid(n, signals.grid, "mustdrop-merge")
    sim = window_similarity(tokens, grid, config.window)
    assignment, positions, counts = merge_plan(sim, grid, config.window, config.threshold,
                                               None if k >= n else k, config.order)
    width = positions.shape[1]
    out, sizes = merge_into_slots(tokens, assignment, width)
    mask = None
    if len(set(counts)) > 1:
        mask = torch.arange(width, device=tokens.device)[None] < torch.tensor(
            counts, device=tokens.device)[:, None]
    return Reduction(tokens=out, positions=positions, sizes=sizes, mask=mask,
                     assignment=assignment)


#: The official place: after the output of encoder layer 0 (of any depth).
OFFICIAL_LAYER = 0
#: The plan parameter of the layer that only picks the key set (the tower's last layer).
KEY_SET = "key-set"


def key_sets(cls_attn: Tensor, valid: Tensor | None, share: float) -> list[Tensor]:
    """MustDrop's key set per image: the ``ceil(share * patches)`` patch tokens with the
    largest CLS attention (``cls_attn`` ``[B, T]``, token 0 the CLS; ``valid`` ``[B, T]``
    real tokens first), as ascending patch indices (CLS excluded)."""
    out = []
    for i in range(cls_attn.shape[0]):
        real = cls_attn.shape[1] if valid is None else int(valid[i].sum())
        k = math.ceil(share * (real - 1))
        top = torch.topk(cls_attn[i, 1:real].float(), k).indices
        out.append(torch.sort(top).values)
    return out


@register_encoder_schedule("mustdrop-merge")
@dataclass(frozen=True)
class MustDropMergeSchedule(EncoderSchedule):
    """In-encoder options of ``mustdrop-merge`` (official: after layer 0, threshold 0.8, 3 x 3
    windows of the square patch grid).

    After the output of layer ``layer`` (position "post") each image's patch tokens merge
    as :func:`mustdrop_merge` describes (CLS stays first); the later layers run on what is
    left, images padded to the largest count with a key padding mask. The official later
    layers get no size bias (no proportional attention); neither do they here.

    Attributes:
        layer: the 0-based layer after whose output the windows merge (official 0).
        threshold, window, order: as :class:`MustDropMergeConfig`.
        tokens: the most patch tokens an image keeps (``keep``); ``None``: the threshold
            alone (official).
        key_share: the key set's share of each image's patch tokens (official 0.08),
            picked by the tower's last layer; 0: no key set.
    """

    layer: int = OFFICIAL_LAYER
    threshold: float = 0.8
    window: int = 3
    order: Literal["official", "raster"] = "official"
    tokens: int | None = None
    key_share: float = 0.08

    position: ClassVar[str] = "post"
    pads: ClassVar[bool] = True
    signals: ClassVar[tuple[str, ...]] = ("cls_attn",)
    protects: ClassVar[bool] = True

    def __post_init__(self) -> None:
        lay = self.layer
        if isinstance(lay, bool) or not isinstance(lay, int) or lay < 0:
            raise ValueError(f"mustdrop-merge: layer={lay!r}: expected a 0-based layer index")
        t = self.tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"mustdrop-merge: tokens={t!r}: expected an int >= 1 or None")
        MustDropMergeConfig(self.threshold, self.window, self.order)  # validates them
        k = self.key_share
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 <= k <= 1:
            raise ValueError(f"mustdrop-merge: key_share={k!r}: expected a share in [0, 1]")

    @property
    def config(self) -> MustDropMergeConfig:
        """The token-set options."""
        return MustDropMergeConfig(self.threshold, self.window, self.order)

    def plan(self, depth: int) -> dict[int, Any]:
        layer = encoder_layers("mustdrop-merge", (self.layer,), (OFFICIAL_LAYER,), 1, depth)[0]
        plan: dict[int, Any] = {layer: self.tokens}
        if self.key_share > 0 and depth - 1 > layer:
            plan[depth - 1] = KEY_SET
        return plan

    def observes(self, param: Any) -> bool:
        return param == KEY_SET

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        """The most tokens left (the cap; the threshold alone may merge nothing)."""
        if param is None or param == KEY_SET:
            return tokens
        return min(tokens, int(param) + int(has_cls))

    def run_step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
                 param: Any, has_cls: bool, state: dict[str, Any]) -> LayerStep | None:
        """The merge, or at the key-set layer (towers with a CLS token) the key set into
        ``state["protect"]`` (:func:`key_sets`; nothing reduced)."""
        if param != KEY_SET:
            return self.step(tokens, sizes, signals, param, has_cls)
        if has_cls:
            state["protect"] = key_sets(signals["cls_attn"], signals.get("valid"),
                                        self.key_share)
        return None

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> MustDropMergeSchedule:
        """``tokens = keep``: at most ``keep`` patch tokens per image."""
        if "tokens" in options:
            raise ValueError("mustdrop-merge: keep and tokens both set; keep is the cap")
        sched = cls(tokens=keep, **options)
        if sched.layer > until:
            raise ValueError(f"mustdrop-merge: layer={sched.layer} is after the last layer "
                             f"whose output is used ({until})")
        return sched

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        """Merge the patch tokens of ``tokens`` ``[B, T, D]`` (after layer ``layer``; they
        must form a square grid). None when no image merges a window."""
        if signals.get("valid") is not None:
            raise ValueError("mustdrop-merge: the tokens are already padded (an earlier "
                             "adaptive step); its windows need the whole grid")
        c = int(_check_cls(has_cls))
        b, t, _ = tokens.shape
        n = t - c
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"mustdrop-merge: {n} patch tokens are not a square grid")
        # the schedule's only reduction: no earlier step has given the tokens sizes
        assert sizes is None
        r = mustdrop_merge(tokens[:, c:], n if param is None else min(int(param), n),
                           Signals(grid=(side, side)), self.config, None)
        if r.mask is None and r.tokens.shape[1] == n:  # no image merged a window
            return None
        dev = tokens.device
        head = torch.zeros(b, c, dtype=torch.long, device=dev)
        assert r.assignment is not None and r.positions is not None and r.sizes is not None
        mask = None if r.mask is None else torch.cat(
            [torch.ones(b, c, dtype=torch.bool, device=dev), r.mask], dim=1)
        return PaddedLayerStep(
            tokens=torch.cat([tokens[:, :c], r.tokens], dim=1),
            sizes=torch.cat([torch.ones(b, c, device=dev), r.sizes], dim=1),
            slot=torch.cat([head, r.assignment + c], dim=1),
            kept=torch.cat([head, r.positions + c], dim=1), mask=mask)
