"""Expedit: token clustering + token reconstruction inside a ViT (Liang et al., NeurIPS 2022).

"Expediting Large-Scale Vision Transformer for Dense Prediction without Fine-tuning". After
encoder layer ``layer`` the patch tokens (an ``H x W`` grid) are clustered into ``h x w``
superpixel-like tokens (:func:`token_clustering`: centres initialised by average pooling,
then ``iters`` rounds of soft k-means where a token may only join the clusters within a
``window x window`` neighbourhood of its initial cell); the later layers run on the
clusters; after the last layer whose output is used the full grid is rebuilt
(:func:`token_reconstruction`): every original token is a weighted sum of the refined
clusters, weights ``exp(-temperature ||f_n - s_m||^2)`` between its features before the
clustering and the cluster centres at the clustering, the top ``k`` kept, L2-normalised.

The official code (``TokenClusteringBlock`` / ``TokenReconstructionBlock`` of the
Expedit repositories) is followed; its quirks are options: the reconstruction weights are
L2-normalised (they sum to 1 or more; ``normalize="l1"`` gives a weighted mean), and the
exponentials are computed relative to each token's nearest centre here (the same weights
after normalisation, without the official code's underflow to zero on large distances).

Inside a VLM the LLM gets the usual grid (``ts.apply(model, "expedit", clusters=144)``):
this is what lets the families whose later steps need the whole grid (LLaVA-NeXT's anyres
packing, OneVision's pooling, Gemma 3's pooling) run a reduced tower.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokensieve.core.encoder_schedule import EncoderSchedule, LayerStep, register_encoder_schedule
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._grid import output_grid


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 when its squared distances could overflow float32 (the
    clustering's softmax reads absolute squared distances, so it cannot be rescaled)."""
    xf = x.float()
    peak = float(xf.abs().amax()) if xf.numel() else 0.0
    return x.double() if peak > 1e15 else xf


def _pairwise(x: Tensor, c: Tensor) -> Tensor:
    """Squared distances ``[B, N, M]`` between ``x`` ``[B, N, C]`` and ``c`` ``[B, M, C]``."""
    d = (x * x).sum(-1, keepdim=True) + (c * c).sum(-1).unsqueeze(1) - 2 * x @ c.transpose(1, 2)
    return d.clamp(min=0)


def token_clustering(x: Tensor, grid: tuple[int, int], clusters: tuple[int, int],
                     iters: int = 5, temperature: float = 0.1, window: int = 5,
                     ) -> tuple[Tensor, Tensor]:
    """Cluster the ``H x W`` raster grid of tokens ``x`` ``[B, H*W, C]`` into ``h x w``
    centres (Expedit's token clustering layer).

    Centres start as the ``adaptive_avg_pool2d`` of the grid to ``(h, w)``; every token
    starts in the cell that nearest-neighbour resizing of the cluster ids gives it and may
    only join clusters within ``window // 2`` cells of it. Each round: affinities
    ``softmax_m(-temperature ||x_n - c_m||^2)`` over the allowed clusters, centres their
    affinity-weighted means. Computed in float32 (float64 for magnitudes above 1e15).

    Returns:
        ``(centres [B, h*w, C], labels [B, H*W])``: the refined centres and every token's
        nearest centre (over all centres, as the official code).
    """
    b, n, ch = x.shape
    hh, ww = grid
    h, w = clusters
    if hh * ww != n:
        raise ValueError(f"expedit: {n} tokens are not a {hh}x{ww} grid")
    xf = _wide(x)
    img = xf.transpose(1, 2).reshape(b, ch, hh, ww)
    centres = F.adaptive_avg_pool2d(img, (h, w)).reshape(b, ch, h * w).transpose(1, 2)
    ids = torch.arange(h * w, device=x.device, dtype=torch.float32).reshape(1, 1, h, w)
    init = F.interpolate(ids, size=(hh, ww), mode="nearest").reshape(n).long()  # [N]
    m = torch.arange(h * w, device=x.device)
    r = window // 2
    near = ((init[:, None] % w - m[None] % w).abs() <= r) & (
        (init[:, None] // w - m[None] // w).abs() <= r)  # [N, M]
    for _ in range(iters):
        dist = _pairwise(xf, centres).masked_fill(~near, float("inf"))
        aff = (-dist * temperature).softmax(dim=2)  # [B, N, M]
        centres = (aff.transpose(1, 2) @ xf) / aff.sum(1).unsqueeze(-1).clamp(min=1e-16)
    labels = _pairwise(xf, centres).argmin(dim=2)
    return centres, labels


def token_reconstruction(x: Tensor, before: Tensor, centres: Tensor, k: int = 20,
                         temperature: float = 0.1, normalize: str = "l2") -> Tensor:
    """Rebuild ``N`` tokens from the refined cluster tokens ``x`` ``[B, M, C]`` (Expedit's
    token reconstruction layer): ``out_n = sum_m W_nm x_m`` with
    ``W_nm ~ exp(-temperature ||before_n - centres_m||^2)`` on the ``k`` largest of each
    row (ties kept), L2-normalised per row (official) or ``"l1"`` (a weighted mean).
    ``before`` ``[B, N, C]``: the tokens at the clustering; ``centres`` ``[B, M, C]``: the
    cluster centres there. Returns ``[B, N, C]`` in ``x``'s dtype."""
    wide = _wide(before).dtype
    dist = _pairwise(before.to(wide), centres.to(wide))
    weight = torch.exp(-temperature * (dist - dist.amin(dim=2, keepdim=True)))
    if 0 <= k < weight.shape[2]:
        kth = weight.topk(k, dim=2).values[..., -1:]
        weight = torch.where(weight >= kth, weight, torch.zeros_like(weight))
    weight = F.normalize(weight, p=2 if normalize == "l2" else 1, dim=2)
    return (weight @ x.to(weight.dtype)).to(x.dtype)


@dataclass(frozen=True)
class ExpeditConfig:
    """Options of ``expedit`` on a token set (its clustering; the reconstruction needs the
    layers in between and runs inside the encoder only).

    Attributes:
        iters, temperature, window: as :func:`token_clustering`.
    """

    iters: int = 5
    temperature: float = 0.1
    window: int = 5


@register(
    "expedit",
    paper="Expediting Large-Scale Vision Transformer for Dense Prediction without "
          "Fine-tuning (Expedit, Liang et al., NeurIPS 2022)",
    stage="encoder", kind="merge", optional_signals=("grid",), config=ExpeditConfig,
    features="vision",
)
def expedit_reduce(tokens: Tensor, k: int, signals: Signals, config: ExpeditConfig,
                   generator: torch.Generator | None) -> Reduction:
    """Expedit's token clustering of the grid ``tokens`` ``[B, N, D]`` into ``keep``
    centres (the ``h x w`` factorisation of ``keep`` closest in aspect to the grid):
    ``tokens`` ``[B, keep, D]`` (the centres), ``assignment`` (nearest centre), ``sizes``,
    ``positions`` (the member nearest each centre)."""
    b, n, _ = tokens.shape
    grid, out = output_grid(n, k, signals.grid, "expedit")
    centres, labels = token_clustering(tokens, grid, out, config.iters, config.temperature,
                                       config.window)
    sizes = torch.zeros(b, k, dtype=torch.long, device=tokens.device).scatter_add_(
        1, labels, torch.ones_like(labels))
    near = _pairwise(centres, tokens.to(centres.dtype)).argmin(dim=2)
    return Reduction(tokens=centres.to(tokens.dtype), indices=None, positions=near,
                     sizes=sizes, assignment=labels)


@dataclass(frozen=True)
class ExpeditStep(LayerStep):
    """A clustering step plus the reconstruction to apply at the end of the tower.

    Attributes:
        restore: ``[B, T', D] -> [B, T, D]``, the reconstruction of the step's input tokens.
        anchors: ``[B, T']`` long, the input token whose position each output token takes
            (towers with per-token rotary positions, Qwen2-VL): the CLS token, and for a
            cluster the centre patch of its initial cell (:func:`cell_centres`).
    """

    restore: Callable[[Tensor], Tensor] | None = None
    anchors: Tensor | None = None


def cell_centres(grid: tuple[int, int], clusters: tuple[int, int],
                 device: torch.device | None = None) -> Tensor:
    """Raster index ``[h*w]`` in the ``H x W`` grid of the centre patch of every cluster's
    initial cell: the ``adaptive_avg_pool2d`` window rows ``floor(a H / h) ..
    ceil((a + 1) H / h) - 1`` (columns alike), their middle (the upper / left one of the
    two middles of an even span)."""
    (hh, ww), (h, w) = grid, clusters

    def middle(a: Tensor, full: int, n: int) -> Tensor:
        return (a * full // n + (-((-(a + 1) * full) // n)) - 1) // 2

    rows = middle(torch.arange(h, device=device), hh, h)
    cols = middle(torch.arange(w, device=device), ww, w)
    return (rows[:, None] * ww + cols[None, :]).reshape(-1)


def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        side = math.isqrt(v)
        if v <= 0 or side * side != v:
            raise ValueError(f"expedit: {name}={v!r}: expected a square count (e.g. 144) or "
                             "an (h, w) pair")
        return side, side
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in v):
        return int(v[0]), int(v[1])
    raise ValueError(f"expedit: {name}={v!r}: expected a square count (e.g. 144) or an "
                     "(h, w) pair")


@register_encoder_schedule("expedit")
@dataclass(frozen=True)
class ExpeditSchedule(EncoderSchedule):
    """In-encoder options of ``expedit`` (defaults of the official DPT backbone
    ``HourglassVisionTransformer``: 5 iterations, window 5, temperature 0.1, k = 20).

    Attributes:
        clusters: cluster tokens the later layers run on: a square count or ``(h, w)``;
            required (the official code has no single default: 256 in its DPT backbone,
            100 in its SAM one). At least the patch count: nothing is clustered.
        layer: the 0-based layer after whose output the tokens are clustered; ``None``:
            half the depth (``depth // 2``; the official DPT default clusters after layer 0,
            its SAM one not at all).
        iters, temperature, window: the clustering (rounds, softmax scale on squared
            distances, neighbourhood in cluster cells, odd).
        k, normalize: the reconstruction (clusters per token; ``"l2"`` official, ``"l1"``).
    """

    clusters: int | tuple[int, int] | None = None
    layer: int | None = None
    iters: int = 5
    temperature: float = 0.1
    window: int = 5
    k: int = 20
    normalize: str = "l2"

    #: The step runs on the layer's output (after its MLP) and needs no attention signal.
    position: ClassVar[str] = "post"
    #: The full token grid is rebuilt after the last layer whose output is used.
    restores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.clusters is None:
            raise ValueError("expedit inside the encoder needs clusters, the tokens the later "
                             "layers run on (e.g. ts.apply(model, 'expedit', clusters=144))")
        _pair(self.clusters, "clusters")
        for name in ("iters", "window", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"expedit: {name}={v!r}: expected an int >= 1")
        if self.window % 2 == 0:
            raise ValueError(f"expedit: window={self.window}: expected an odd size")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"expedit: temperature={t!r}: expected a float > 0")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(
                self.layer, int) or self.layer < 0):
            raise ValueError(f"expedit: layer={self.layer!r}: expected a 0-based layer index")
        if self.normalize not in ("l2", "l1"):
            raise ValueError(f"expedit: normalize={self.normalize!r}: expected 'l2' or 'l1'")

    def plan(self, depth: int) -> dict[int, Any]:
        layer = depth // 2 if self.layer is None else self.layer
        if layer >= depth - 1:
            raise ValueError(f"expedit: layer={layer}: clustering after it leaves no layer of "
                             f"this {depth}-layer encoder to run on the clusters")
        return {layer: _pair(self.clusters, "clusters")}

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        patches = tokens - int(has_cls)
        return tokens if param[0] * param[1] >= patches else int(has_cls) + param[0] * param[1]

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> ExpeditStep | None:
        """Cluster the patch tokens of a layer's output ``[B, c + H*W, D]`` (the CLS token,
        if any, set aside; raster order) into ``param = (h, w)`` tokens; the step's
        ``restore`` rebuilds ``c + H*W`` tokens from ``c + h*w`` ones. The grid is
        ``signals["grid"]`` ``(H, W)`` when given (non-square images, Qwen2-VL), else
        square."""
        b, t, _ = tokens.shape
        c = int(has_cls)
        n = t - c
        given = signals.get("grid")
        if given is not None:
            grid = (int(given[0]), int(given[1]))
            if grid[0] * grid[1] != n:
                raise ValueError(f"expedit: {n} patch tokens are not a {grid[0]}x{grid[1]} grid")
        else:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"expedit: {n} patch tokens are not a square grid")
            grid = (side, side)
        h, w = param
        if h * w >= n:
            return None
        patches = tokens[:, c:]
        centres, labels = token_clustering(patches, grid, (h, w), self.iters,
                                           self.temperature, self.window)
        dev = tokens.device
        slot = torch.cat([torch.zeros(b, c, dtype=torch.long, device=dev), labels + c], 1)
        counts = torch.zeros(b, h * w, device=dev).scatter_add_(
            1, labels, torch.ones(b, n, device=dev))
        new_sizes = torch.cat([torch.ones(b, c, device=dev), counts], 1)
        near = _pairwise(centres, patches.float()).argmin(dim=2) + c  # member nearest each centre
        kept = torch.cat([torch.zeros(b, c, dtype=torch.long, device=dev), near], 1)
        before = patches.detach()
        k, temp, norm = self.k, float(self.temperature), self.normalize

        def restore(x: Tensor) -> Tensor:
            out = token_reconstruction(x[:, c:], before, centres, k, temp, norm)
            return torch.cat([x[:, :c], out], dim=1)

        out = torch.cat([tokens[:, :c], centres.to(tokens.dtype)], dim=1)
        anchors = torch.cat([torch.zeros(c, dtype=torch.long, device=dev),
                             cell_centres(grid, (h, w), dev) + c]).expand(b, -1)
        return ExpeditStep(tokens=out, sizes=new_sizes, slot=slot, kept=kept, restore=restore,
                           anchors=anchors)
