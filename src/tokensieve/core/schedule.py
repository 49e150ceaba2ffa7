"""Schedules of in-LLM methods: at which decoder layers image tokens are cut, how many stay.

An in-LLM method's config (a frozen dataclass) derives from :class:`LlmSchedule` and says
where its cuts are and how its ``keep`` maps to per-cut counts; the model layer does the
cutting, the method's function only picks tokens at one cut (a pure function over
tensors, like every other method).

Budget meaning (``keep``, a count or a fraction of each image's tokens):

- one cut (FastV, DART, ...): the image keeps ``keep`` tokens from the cut layer on;
- several cuts (PyramidDrop, SparseVLM, ...): ``keep`` is the average number of image
  tokens per LLM layer over all layers (equal linear FLOPs to a single cut before layer 0
  at ``keep`` tokens), so every method compares at one budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep

ScoreSource = Literal["previous", "own", "none"]
QueryRows = Literal["last", "text", "image"]
Positions = Literal["keep", "renumber"]


@dataclass(frozen=True)
class ScoreForm:
    """How the attention rows a cut ranks with are computed from the layer's q and k.

    Attributes:
        rotary: apply the layer's rotary embedding to q and k (as attention runs).
        causal: a query row sees the keys at or before it (as attention runs); ``False``:
            every valid key of the sequence.
        heads: how the heads' probabilities combine: ``"mean"`` or ``"max"``.
    """

    rotary: bool = True
    causal: bool = True
    heads: Literal["mean", "max"] = "mean"


#: The layer's attention as it runs, averaged over heads: what most in-LLM methods rank by.
AS_RUN = ScoreForm()


def check_positions(value: object) -> None:
    if value not in ("keep", "renumber"):
        raise ValueError(f"positions={value!r}: expected 'keep' (kept tokens keep their "
                         "original position ids) or 'renumber' (contiguous positions)")


def check_layer(name: str, value: object, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int decoder layer index >= {minimum}")


def single_cut(layer: int | None, depth: int, fraction: float | None = None,
               ) -> tuple[int, ...]:
    """The cut of a one-cut schedule in a ``depth``-layer LLM: ``layer`` (``1 <= layer <
    depth``), or, when it is ``None``, the official layer as a ``fraction`` of the depth."""
    if layer is None:
        if fraction is None:
            raise ValueError("layer=None: this method needs a decoder layer index")
        return scaled_layers((fraction,), depth)
    if layer >= depth:
        raise ValueError(f"layer={layer}: the LLM has {depth} decoder layers; "
                         f"expected 1 <= layer < {depth}")
    return (layer,)


def check_layer_list(layers: object, minimum: int = 1, name: str = "layers") -> None:
    """Validate an optional ``layers`` option: ``None`` or a non-empty, strictly ascending
    tuple of decoder layer indices ``>= minimum``."""
    if layers is None:
        return
    if not isinstance(layers, (tuple, list)) or not layers:
        raise ValueError(f"{name}={layers!r}: expected a non-empty tuple of ascending decoder "
                         "layer indices")
    for layer in layers:
        check_layer(name, layer, minimum=minimum)
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"{name}={layers!r}: expected strictly ascending layers")


def check_depth(layers: tuple[int, ...], depth: int, name: str = "layers") -> tuple[int, ...]:
    """``layers`` if all lie inside a ``depth``-layer LLM, else a ValueError."""
    if layers[-1] >= depth:
        raise ValueError(f"{name}={tuple(layers)}: the LLM has {depth} decoder layers; "
                         f"expected layers below {depth}")
    return tuple(layers)


@dataclass(frozen=True)
class LlmSchedule:
    """Base of in-LLM method configs.

    Class attributes (not options):
        scores: where the attention rows a cut needs come from: ``"previous"`` (the layer
            before the cut, as it runs: FastV), ``"own"`` (the cut layer's own norm and q/k
            projections applied to its input: PyramidDrop), ``"none"``.
        query: which query rows: ``"last"`` (each row's last prompt token), ``"text"``
            (the text tokens after the image that :meth:`raters` picks; ``query_attn``
            ``[1, R, N]``) or ``"image"`` (the image's own tokens: ``[1, N, N]``).
        adaptive: the counts are caps (the method decides how many stay); a cut whose cap
            exceeds the tokens an image has left keeps at most those.
    """

    scores: ClassVar[ScoreSource] = "previous"
    query: ClassVar[QueryRows] = "last"
    adaptive: ClassVar[bool] = False

    @property
    def score_form(self) -> ScoreForm:
        """How the attention rows are computed (default: as the layer runs, head-mean)."""
        return AS_RUN

    @property
    def hides_dropped_before_cut(self) -> bool:
        """Whether decoding after the prefill also hides the dropped image tokens from the
        layers before the (single) cut, as if their cache had been pruned too (default: no,
        those layers keep their whole cache)."""
        return False

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        """Decoder layers (ascending) before which image tokens are cut."""
        raise NotImplementedError

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        """Image tokens kept from each cut on, for an image of ``n`` tokens (0: the image
        is dropped whole at that cut; adaptive methods may keep fewer than the count)."""
        raise NotImplementedError

    def image_tokens(self, n: int, counts: list[int]) -> list[int]:
        """The image's tokens from each cut on, when ``n`` enter and the cuts keep
        ``counts`` (default: the counts; methods that add merged tokens add them). What the
        FLOPs accounting counts."""
        return list(counts)

    @property
    def position_mode(self) -> Positions:
        return getattr(self, "positions", "keep")

    def raters(self, image: Tensor, text: Tensor) -> Tensor:
        """For ``query="text"``: which text tokens rate an image, ``[M]`` bool, from the LLM
        input embeddings of the image ``[N, D]`` and of the text after it ``[M, D]``
        (default: all of them). The model layer calls it once per image at prefill and
        passes the attention rows of the chosen tokens as ``query_attn`` ``[1, R, N]``."""
        return torch.ones(text.shape[0], dtype=torch.bool, device=text.device)


def single_cut_count(n: int, keep: int | float | None, ratio: float) -> int:
    """One cut: ``keep`` resolved on ``n``; without it the official ratio ``R`` removed
    (``round(n (1 - R))``, at least 1)."""
    if keep is None:
        return max(1, round(n * (1 - ratio)))
    return resolve_keep(keep, n)


def layer_average(n: int, counts: list[int], layers: tuple[int, ...], depth: int) -> float:
    """Average image tokens per layer when ``n`` tokens enter and ``counts[i]`` stay from
    ``layers[i]`` on."""
    total, prev_layer, current = 0, 0, n
    for layer, c in zip(layers, counts, strict=True):
        total += (layer - prev_layer) * current
        prev_layer, current = layer, c
    total += (depth - prev_layer) * current
    return total / depth


def geometric_counts(n: int, ratio: float, stages: int) -> list[int]:
    """``round(n * ratio^s)`` for ``s = 1..stages`` (at least 1)."""
    return [max(1, round(n * ratio ** s)) for s in range(1, stages + 1)]


def solve_ratio(n: int, target: float, layers: tuple[int, ...], depth: int) -> float:
    """The per-stage keep ratio ``r`` whose geometric schedule ``n r^s`` averages
    ``target`` image tokens per layer (bisection on the continuous schedule)."""
    lo_avg = layers[0] * n / depth
    if target < lo_avg - 1e-9 or target > n:
        raise ValueError(
            f"keep={target:g}: with cuts at layers {layers} of {depth} an image of {n} tokens "
            f"averages between {math.ceil(lo_avg)} and {n} tokens per layer; pass a keep in "
            "that range or earlier layers=(...)")

    def avg(r: float) -> float:
        total, prev, cur = 0.0, 0, float(n)
        for s, layer in enumerate(layers):
            total += (layer - prev) * cur
            prev, cur = layer, n * r ** (s + 1)
        return (total + (depth - prev) * cur) / depth

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < target else (lo, mid)
    return (lo + hi) / 2


def scaled_layers(fractions: tuple[float, ...], depth: int) -> tuple[int, ...]:
    """Layers at the given fractions of the depth (rounded, distinct, >= 1)."""
    out: list[int] = []
    for f in fractions:
        layer = max(1, min(depth - 1, round(depth * f)))
        if not out or layer > out[-1]:
            out.append(layer)
    return tuple(out)
