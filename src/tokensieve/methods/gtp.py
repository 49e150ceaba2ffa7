"""GTP-ViT: graph-based token propagation (Xu et al., WACV 2024).

"GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation" (Xu, Tang, Chen,
Wu, Zhang, Lu; WACV 2024, official code ``Ackesnal/GTP-ViT``). Before the first layer a
graph over the patch tokens is built (the official default: the spatial 8-neighbourhood of
the patch grid; or a semantic k-nearest-neighbour graph of the tokens, or both) and
symmetrically normalised, ``G = D^-1/2 A D^-1/2``. In a GTP layer, between the attention
residual and the MLP, the ``num_prop`` patch tokens ranked lowest are removed and their
features are propagated to the kept ones over the graph,

    x_kept <- x_kept + alpha * G[kept, removed] @ x_removed

(``alpha`` 0.1), and the graph is restricted to the kept tokens (not renormalised). The
official ranking ``MixedAttnMax`` is, over the layer's attention map, the product of the
largest (over heads) self attention of a token and the largest (over heads) attention it
receives summed over the queries. Token "scales" (``prop_attn``, off in the official
evaluation command) follow the same propagation, ``s_kept + alpha * G[kept, removed] @
s_removed``, and enter the next layers' attention as ``log(s)``.

Two uses: ``gtp`` on a token set (``ts.reduce``: one propagation down to ``keep`` tokens,
ranked by the ``attn_received`` signal, official option ``IMGAttnMean``) and inside a vision
encoder (``ts.apply(model, "gtp", num_prop=4)``, :class:`GTPSchedule`). The official code
orders the kept tokens by rank; here they keep their original order (the same token set:
attention and MLP do not see the order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from tokensieve.core.encoder_schedule import EncoderSchedule, LayerStep, register_encoder_schedule
from tokensieve.core.ops import gather_tokens, normalize
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._matching import check_cls_budget, check_flag

SELECTIONS = ("MixedAttnMax", "MixedAttnMean", "IMGAttnMax", "IMGAttnMean")
GRAPHS = ("spatial", "semantic", "mixed")


def _check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(
            alpha) or alpha < 0:
        raise ValueError(f"gtp: alpha={alpha!r}: expected a finite number >= 0")


@dataclass(frozen=True)
class GTPConfig:
    """Options of ``gtp`` on a token set.

    Attributes:
        alpha: weight of the propagated features (official 0.1).
        has_cls: ``tokens[:, 0]`` is a CLS token: kept first, not in the graph, counted in
            ``keep``.
    """

    alpha: float = 0.1
    has_cls: bool = False

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        check_flag(self.has_cls, "has_cls", "gtp")


def spatial_graph(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """``[h*w, h*w]`` float32 adjacency of the 8-neighbourhood on an ``h x w`` grid (row
    major), without self loops (GTP's ``Spatial`` graph)."""
    r = torch.arange(h * w, device=device) // w
    c = torch.arange(h * w, device=device) % w
    near = ((r[:, None] - r[None]).abs() <= 1) & ((c[:, None] - c[None]).abs() <= 1)
    return near.float() - torch.eye(h * w, device=device)


def semantic_graph(x: Tensor, neighbours: int) -> Tensor:
    """``[B, P, P]`` float32: each token's ``neighbours`` most cosine-similar other tokens
    (GTP's ``Semantic`` graph: similarities at or above the row's ``(P - neighbours)``-th
    smallest, itself removed; not symmetric)."""
    p = x.shape[1]
    xn = normalize(x)
    sim = xn @ xn.transpose(-1, -2)
    k = max(p - neighbours, 1)
    thresh = torch.kthvalue(sim, k, dim=-1, keepdim=True).values
    return (sim >= thresh).float() - torch.eye(p, device=x.device)


def normalize_graph(adj: Tensor) -> Tensor:
    """``D^-1/2 A D^-1/2`` with ``D`` the row sums (a row without edges stays zero)."""
    deg = adj.sum(dim=-1)
    inv = torch.where(deg > 0, deg.clamp(min=1e-12).rsqrt(), torch.zeros_like(deg))
    return inv.unsqueeze(-1) * adj * inv.unsqueeze(-2)


def build_graph(kind: str, patches: Tensor, grid: tuple[int, int] | None,
                neighbours: int) -> Tensor:
    """The normalised graph ``[B, P, P]`` of GTP's ``graph_type`` over ``patches``
    ``[B, P, D]`` (``grid``: the patch grid, default square)."""
    b, p, _ = patches.shape
    if kind == "semantic":
        adj = semantic_graph(patches, neighbours)
    else:
        h, w = grid if grid is not None else (math.isqrt(p), math.isqrt(p))
        if h * w != p:
            raise ValueError(f"gtp: {p} patch tokens are no square grid; pass the grid")
        adj = spatial_graph(h, w, patches.device).expand(b, -1, -1)
        if kind == "mixed":
            adj = torch.maximum(adj, semantic_graph(patches, neighbours))
    return normalize_graph(adj)


def gtp_ranking(self_heads: Tensor, received_heads: Tensor, selection: str) -> Tensor:
    """GTP's token rank ``[B, T]`` (higher: kept) from the per-head self attention and the
    query-summed attention each token receives (``[B, H, T]``)."""
    reduce = (lambda t: t.amax(dim=1)) if selection.endswith("Max") else (
        lambda t: t.mean(dim=1))
    img = reduce(received_heads.float())
    return reduce(self_heads.float()) * img if selection.startswith("Mixed") else img


@dataclass(frozen=True)
class Propagation:
    """One GTP propagation: ``tokens`` ``[B, T', D]``, ``kept`` ``[B, T']`` input indices
    (ascending, CLS first), ``graph`` ``[B, P', P']`` over the kept patches, ``sizes``
    ``[B, T']`` float32 token scales."""

    tokens: Tensor
    kept: Tensor
    graph: Tensor
    sizes: Tensor


def gtp_propagate(tokens: Tensor, num_prop: int, scores: Tensor, graph: Tensor, *,
                  alpha: float, has_cls: bool, sizes: Tensor | None = None) -> Propagation:
    """Remove the ``num_prop`` lowest-ranked patch tokens of ``tokens`` ``[B, T, D]`` and
    propagate them over ``graph`` ``[B, P, P]`` (``P = T - has_cls``, aligned with the
    patches) to the kept patches: ``x_kept + alpha * G[kept, removed] @ x_removed``; the
    same for the token scales ``sizes`` (ones when None); CLS is kept as it is.

    ``scores`` ``[B, T]`` rank the tokens (the CLS entry is ignored); ties keep the earlier
    token."""
    b, t, d = tokens.shape
    c = int(has_cls)
    p = t - c
    order = torch.sort(scores[:, c:].float(), dim=1, descending=True, stable=True).indices
    keep = order[:, :p - num_prop].sort(dim=1).values  # patch indices, ascending
    gone = order[:, p - num_prop:]
    rows = graph.float().gather(1, keep.unsqueeze(-1).expand(-1, -1, p))  # [B, P', P]
    w_prop = rows.gather(2, gone.unsqueeze(1).expand(-1, keep.shape[1], -1))  # [B, P', R]
    new_graph = rows.gather(2, keep.unsqueeze(1).expand(-1, keep.shape[1], -1))
    x = tokens[:, c:].float()
    x_kept = gather_tokens(x, keep) + alpha * (w_prop @ gather_tokens(x, gone))
    s = torch.ones(b, t, device=tokens.device) if sizes is None else sizes.float()
    sp = s[:, c:]
    s_kept = sp.gather(1, keep) + alpha * (w_prop @ sp.gather(1, gone).unsqueeze(-1))[..., 0]
    head = torch.zeros(b, c, dtype=torch.long, device=tokens.device)
    return Propagation(
        tokens=torch.cat([tokens[:, :c], x_kept.to(tokens.dtype)], dim=1),
        kept=torch.cat([head, keep + c], dim=1),
        graph=new_graph,
        sizes=torch.cat([s[:, :c], s_kept], dim=1),
    )


@register(
    "gtp",
    paper="GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation "
          "(Xu et al., WACV 2024)",
    stage="encoder", kind="subset+merge", signals=("attn_received",),
    optional_signals=("grid",), config=GTPConfig, features="vision", cls_token=True,
)
def gtp_reduce(tokens: Tensor, k: int, signals: Signals, config: GTPConfig,
               generator: torch.Generator | None) -> Reduction:
    """Keep the ``keep`` tokens receiving the most attention (``attn_received`` ``[B, N]``
    or ``[B, L, N]``: the last layer; GTP's ``IMGAttnMean``) and propagate the removed
    patches to them over the spatial graph of ``grid`` (default square).

    Returns ``tokens`` ``[B, keep, D]``, ``indices`` (kept positions, ascending, CLS first)
    and ``positions``."""
    b, n, _ = tokens.shape
    c = int(config.has_cls)
    if c:
        check_cls_budget(k, n, 2, "gtp", "a CLS token plus one patch")
    scores = signals.layer("attn_received", "gtp")
    graph = build_graph("spatial", tokens[:, c:], signals.grid, 0)
    prop = gtp_propagate(tokens, n - k, scores, graph, alpha=config.alpha, has_cls=bool(c))
    return Reduction(tokens=prop.tokens, indices=prop.kept, positions=prop.kept)


# -- inside the encoder ------------------------------------------------------------------------
def spread(total: int, layers: int) -> list[int]:
    """``total`` split over ``layers`` as evenly as possible, the larger shares first."""
    base, extra = divmod(total, layers)
    return [base + (i < extra) for i in range(layers)]


@register_encoder_schedule("gtp")
@dataclass(frozen=True)
class GTPSchedule(EncoderSchedule):
    """In-encoder options of ``gtp`` (the official evaluation command: ``--selection
    MixedAttnMax --propagation GraphProp --alpha 0.1 --sparsity 1.0``, which builds the
    spatial graph, without token scales).

    In every layer with ``num_prop > 0``, between the attention residual and the MLP,
    :func:`gtp_propagate` removes that many patch tokens (capped so one is left), ranked by
    the layer's own attention (:func:`gtp_ranking` of the per-head self attention and
    received attention, computed from its q / k); the graph of the pass (built on the
    first GTP layer from the layer-0 input, then restricted) carries over.

    Attributes:
        num_prop: patch tokens removed per layer: an int (every layer) or a per-layer
            list. Required (the official default 0 removes nothing; its example uses 4).
        alpha: weight of the propagated features (0.1).
        selection: the ranking (official names; ``MixedAttnMax`` default).
        graph: ``"spatial"`` (official default), ``"semantic"`` or ``"mixed"`` (the union).
        neighbours: neighbours per token of the semantic graph (official 8).
        prop_attn: token scales and proportional attention (official ``--token_scale``,
            off by default).

    The official ``sparsity < 1`` (zeroing small attention weights inside the attention)
    needs the eager attention map and is not offered.
    """

    num_prop: int | list[int] | None = None
    alpha: float = 0.1
    selection: Literal["MixedAttnMax", "MixedAttnMean", "IMGAttnMax", "IMGAttnMean"] = \
        "MixedAttnMax"
    graph: Literal["spatial", "semantic", "mixed"] = "spatial"
    neighbours: int = 8
    prop_attn: bool = False

    signals: ClassVar[tuple[str, ...]] = ("attn_self_heads", "attn_received_heads")

    def __post_init__(self) -> None:
        def count(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if self.num_prop is None:
            raise ValueError("gtp inside the encoder needs num_prop, the patch tokens removed "
                             "per layer (e.g. ts.apply(model, 'gtp', num_prop=4)) or keep")
        if not (count(self.num_prop) or isinstance(self.num_prop, list) and all(
                count(v) for v in self.num_prop)):
            raise ValueError(f"gtp: num_prop={self.num_prop!r}: expected an int >= 0 or a "
                             "per-layer list of them")
        _check_alpha(self.alpha)
        if self.selection not in SELECTIONS:
            raise ValueError(f"gtp: selection={self.selection!r}: expected one of {SELECTIONS}")
        if self.graph not in GRAPHS:
            raise ValueError(f"gtp: graph={self.graph!r}: expected one of {GRAPHS}")
        if not count(self.neighbours) or self.neighbours < 1:
            raise ValueError(f"gtp: neighbours={self.neighbours!r}: expected an int >= 1")
        check_flag(self.prop_attn, "prop_attn", "gtp")

    @property
    def proportional(self) -> bool:
        return self.prop_attn

    def plan(self, depth: int) -> dict[int, Any]:
        per = self.num_prop if isinstance(self.num_prop, list) else [self.num_prop] * depth
        return {i: v for i, v in enumerate(per[:depth]) if v}

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        raise ValueError("gtp: the step needs the pass's graph (run_step)")

    def run_step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
                 param: Any, has_cls: bool, state: dict[str, Any]) -> LayerStep | None:
        """One GTP layer on ``tokens`` ``[B, T, D]``: rank by the layer's attention, remove
        ``min(param, P - 1)`` patches, propagate them over the pass's graph."""
        b, t, _ = tokens.shape
        c = int(has_cls)
        r = min(int(param), t - c - 1)
        if r <= 0:
            return None
        if "gtp_graph" not in state:
            first = state["input"][:, c:].float()
            state["gtp_graph"] = build_graph(self.graph, first, None, self.neighbours)
        graph = state["gtp_graph"]
        if graph.shape[-1] != t - c:
            raise ValueError("gtp: the tokens were reduced by something else than gtp")
        scores = gtp_ranking(signals["attn_self_heads"], signals["attn_received_heads"],
                             self.selection)
        prop = gtp_propagate(tokens, r, scores, graph, alpha=float(self.alpha),
                             has_cls=has_cls, sizes=sizes)
        state["gtp_graph"] = prop.graph
        dev = tokens.device
        slot = torch.full((b, t), -1, dtype=torch.long, device=dev).scatter(
            1, prop.kept, torch.arange(t - r, device=dev).expand(b, -1))
        return LayerStep(tokens=prop.tokens, sizes=prop.sizes, slot=slot, kept=prop.kept)

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        return tokens - max(min(int(param), tokens - int(has_cls) - 1), 0)

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> GTPSchedule:
        """``num_prop`` per layer leaving ``keep`` patch tokens after layers ``0..until``:
        the removals spread evenly (floor or ceil of the mean, the larger first)."""
        if "num_prop" in options:
            raise ValueError("gtp: keep and num_prop both set; keep solves num_prop")
        layers = min(until, depth - 1) + 1
        return cls(num_prop=spread(tokens - int(has_cls) - keep, layers), **options)
