"""CenterCLIP-style k-medoids: cluster the tokens and keep one token per cluster.

Two uses: ``kmedoids`` on a token set (``ts.reduce``) and inside a CLIP-like vision encoder
(``ts.apply(model, "kmedoids", clusters=49)``, :class:`KMedoidsSchedule`): as CenterCLIP's
``TokenClusterInter`` does, before the attention of one layer (block 8 of 12 in its
MSR-VTT evaluation runs, 0-based 7) the patch tokens of each image are clustered into
``clusters`` groups by k-medoids (KKZ start, at most 100 rounds, stop below a medoid shift
of 1e-6, Euclidean) and replaced by the medoids in ascending index order (``aggregation``
None); the CLS token stays first. That layer and the later ones run on ``1 + clusters``
tokens.
"""

from __future__ import annotations

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
from tokensieve.core.ops import gather_tokens, merge_into_slots, normalize, pow2_rescale
from tokensieve.core.options import Count, NonNegative
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._greedy import LazyRows, max_min_select, symmetric_gram

OUTPUTS = ("medoids", "means")
DISTANCES = ("euclidean", "cosine")
PAIR_BUDGET = 1 << 24  # within-cluster pairs gathered at once before a dense fallback


@dataclass(frozen=True)
class KMedoidsConfig:
    """Options (CenterCLIP's defaults).

    Attributes:
        iterations: at most this many assign/update rounds after the KKZ initialisation
            (50, CenterCLIP's ``kmedoids`` default; 0 keeps the KKZ centres).
        threshold: stop when the medoids move less than this in total (sum of the
            Euclidean distances between old and new medoid tokens; 1e-4).
        distance: "euclidean" (CenterCLIP's default) or "cosine" (``1 - cos``).
        output: "medoids" (keep the medoid tokens: a subset) or "means" (each cluster's
            mean token, placed at its medoid's position).
    """

    iterations: Count = 50
    threshold: NonNegative = 1e-4
    distance: Literal["euclidean", "cosine"] = "euclidean"
    output: Literal["medoids", "means"] = "medoids"

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or (
                self.iterations < 0):
            raise ValueError(f"iterations={self.iterations!r}: expected an int >= 0")
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold!r}: expected a value >= 0")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance={self.distance!r}: expected one of {DISTANCES}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output={self.output!r}: expected one of {OUTPUTS}")


def distance_matrix(x: Tensor, distance: str) -> Tensor:
    """``[N, N]`` float32 distances of ``x`` ``[N, D]`` with ``-1`` added on the diagonal
    (as CenterCLIP does, so that a token is always nearest to itself).

    Euclidean distances are in units of a power of two that brings the largest magnitude of
    ``x`` below 1 (exact, so the clustering is unchanged): squares of tokens near 1e30 would
    overflow float32 otherwise."""
    if distance == "euclidean":
        # As torch.cdist computes it for large inputs: |x|^2 + |y|^2 - 2 x.y, clamped, sqrt.
        xf = pow2_rescale(x, dim=(0, 1)).float()
        sq = (xf * xf).sum(dim=-1)

        def euclid(blk: Tensor, rows: slice, cols: slice) -> Tensor:
            blk.mul_(-2.0).add_(sq[rows].unsqueeze(1)).add_(sq[cols].unsqueeze(0))
            return blk.clamp_(min=0.0).sqrt_()

        dist = symmetric_gram(xf, transform=euclid)
    else:
        dist = symmetric_gram(normalize(x), transform=lambda blk, r, c: blk.neg_().add_(1.0))
    dist.diagonal().fill_(-1.0)  # 0 - 1 exactly (the matrix-product form is noisy at 0)
    return dist


def kkz_init(x: Tensor, dist: Tensor, k: int) -> Tensor:
    """KKZ initialisation (Katsavounidis, Kuo & Zhang, 1994): the token of largest L2 norm,
    then farthest-first on ``dist``. Returns ``[k]`` token indices in pick order."""
    seed = int(torch.argmax(pow2_rescale(x, dim=(0, 1)).float().norm(dim=-1)))
    rows = LazyRows(lambda idx: dist[idx], dist.shape[0], dist.device, block=1)
    return max_min_select(rows, k, seed)


def nearest(dist: Tensor, medoids: Tensor) -> Tensor:
    """``[N]``: for every token, the position in ``medoids`` of its nearest medoid (first on
    ties). ``dist`` is symmetric, so medoid rows are read instead of strided columns."""
    return torch.argmin(dist.index_select(0, medoids), dim=0)


def within_cluster_sums(dist: Tensor, assign: Tensor, k: int) -> Tensor:
    """``s_i = sum_{j: assign_j = assign_i} dist[i, j]`` for every token ``i`` (``[N]``)."""
    n, dev = dist.shape[0], dist.device
    counts = torch.bincount(assign, minlength=k)
    if int((counts * counts).sum()) > PAIR_BUDGET:
        out = torch.empty(n, device=dev)
        step = max(1, PAIR_BUDGET // n)
        for s in range(0, n, step):
            same = assign[s:s + step].unsqueeze(1) == assign.unsqueeze(0)
            out[s:s + step] = (dist[s:s + step] * same).sum(dim=1)
        return out
    order = torch.sort(assign, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    reps = counts[assign]
    i_idx = torch.repeat_interleave(torch.arange(n, device=dev), reps)
    offset = torch.arange(i_idx.numel(), device=dev) - torch.repeat_interleave(
        torch.cumsum(reps, 0) - reps, reps)
    j_idx = order[starts[assign][i_idx] + offset]
    return torch.zeros(n, device=dev).index_add_(0, i_idx, dist[i_idx, j_idx])


def kmedoids_one(x: Tensor, k: int, config: KMedoidsConfig) -> tuple[Tensor, Tensor]:
    """k-medoids of one sample ``x`` ``[N, D]``: ``(medoids [k] ascending, assignment [N])``
    where ``assignment[i]`` is the position in ``medoids`` of the medoid nearest token ``i``."""
    n, dev = x.shape[0], x.device
    dist = distance_matrix(x, config.distance)
    medoids = kkz_init(x, dist, k)
    xf = x.double() if x.device.type != "mps" else x.float()  # medoid shifts, in token units
    ar = torch.arange(n, device=dev)
    for _ in range(config.iterations):
        assign = nearest(dist, medoids)
        sums = within_cluster_sums(dist, assign, k)
        best = torch.full((k,), float("inf"), device=dev).scatter_reduce(
            0, assign, sums, "amin")
        cand = torch.where(sums == best[assign], ar, n)
        new = torch.full((k,), n, device=dev, dtype=torch.long).scatter_reduce(
            0, assign, cand, "amin")
        shift = (xf[new] - xf[medoids]).norm(dim=-1).sum()
        medoids = new
        if float(shift) < config.threshold:
            break
    medoids = medoids.sort().values
    return medoids, nearest(dist, medoids)


@register(
    "kmedoids",
    paper="CenterCLIP: Token Clustering for Efficient Text-Video Retrieval "
          "(Zhao et al., SIGIR 2022), k-medoids token clustering",
    stage="encoder", kind="subset", config=KMedoidsConfig, features="vision",
)
def kmedoids(tokens: Tensor, k: int, signals: Signals, config: KMedoidsConfig,
             generator: torch.Generator | None) -> Reduction:
    """Cluster ``tokens`` ``[B, N, D]`` into ``k`` clusters per sample with k-medoids.

    KKZ initialisation (largest-norm token, then farthest-first, Euclidean by default),
    then rounds of: assign every token to its nearest medoid; replace each medoid by the
    member with the smallest total distance to its cluster (lowest index on ties); stop
    when the medoids move less than ``threshold`` or after ``iterations`` rounds.
    CenterCLIP runs this per temporal segment over the patch tokens of its frames; pass
    one segment's tokens as one sample.

    Returns a :class:`Reduction` with the medoid tokens (``output="medoids"``; ``indices``
    ascending) or the cluster means (``output="means"``; ``indices`` None, ``positions`` the
    medoids), ``sizes`` ``[B, k]`` (cluster sizes) and ``assignment`` ``[B, N]``.
    """
    results = [kmedoids_one(tokens[b], k, config) for b in range(tokens.shape[0])]
    medoids = torch.stack([m for m, _ in results])
    assign = torch.stack([a for _, a in results])
    sizes = torch.zeros_like(medoids).scatter_add_(1, assign, torch.ones_like(assign))
    if config.output == "medoids":
        return Reduction(tokens=gather_tokens(tokens, medoids), indices=medoids,
                         sizes=sizes, assignment=assign)
    means, _ = merge_into_slots(tokens, assign, k)
    return Reduction(tokens=means, indices=None, positions=medoids, sizes=sizes,
                     assignment=assign)


# -- inside the encoder ------------------------------------------------------------------------
#: CenterCLIP clusters before block 8 (1-based) of CLIP ViT-B/32's 12 (msrvtt.sh, run 80).
OFFICIAL_LAYER = 7
OFFICIAL_DEPTH = 12


def cluster_step(tokens: Tensor, sizes: Tensor | None, k: int, has_cls: bool,
                 config: KMedoidsConfig) -> LayerStep:
    """k-medoids of each image's patch tokens (``tokens[:, has_cls:]``) into ``k`` clusters,
    as one encoder step: ``[CLS] + k`` medoid tokens (ascending) or cluster means; every
    patch goes to its cluster's slot, ``sizes`` add up the prior sizes of its members."""
    b, t, _ = tokens.shape
    c = int(has_cls)
    red = kmedoids(tokens[:, c:], k, Signals(), config, None)
    dev = tokens.device
    head = torch.zeros(b, c, dtype=torch.long, device=dev)
    slot = torch.cat([head, red.assignment + c], dim=1)
    medoids = red.indices if red.indices is not None else red.positions
    kept = torch.cat([head, medoids + c], dim=1)
    prior = torch.ones(b, t, device=dev) if sizes is None else sizes.float()
    new_sizes = torch.zeros(b, k + c, device=dev).scatter_add_(1, slot, prior)
    out = torch.cat([tokens[:, :c], red.tokens], dim=1)
    return LayerStep(tokens=out, sizes=new_sizes, slot=slot, kept=kept)


@register_encoder_schedule("kmedoids")
@dataclass(frozen=True)
class KMedoidsSchedule(EncoderSchedule):
    """In-encoder options of ``kmedoids`` (CenterCLIP's ``TokenClusterInter`` with
    ``cluster_algo='kmediods++'`` on one frame per segment).

    Before the attention of layer ``layer`` (position "pre"), each image's patch tokens are
    clustered into ``clusters`` groups (:func:`kmedoids`) and replaced by the medoids
    (ascending token index, ``id_sort``) or the cluster means; CLS stays first. The
    official code stops when the medoid shift averaged over its batch falls below
    ``threshold``; here each image stops on its own shift (a batch gives each image's own
    clusters).

    Attributes:
        clusters: patch tokens left (``cluster_num``; required: CenterCLIP's 49 per
            3-frame segment of ViT-B/32 leaves a single frame untouched).
        layer: 0-based layer before whose attention the tokens are clustered; ``None``: 7
            of 12 scaled to the depth (``7 * depth // 12``).
        iterations: at most this many rounds (``cluster_iter_limit`` 100 in the scripts).
        threshold: stop below this medoid shift (``cluster_threshold`` 1e-6).
        distance: "euclidean" (official) or "cosine".
        output: "medoids" (official ``aggregation`` None) or "means" (cluster means).
    """

    clusters: int | None = None
    layer: int | None = None
    iterations: int = 100
    threshold: float = 1e-6
    distance: Literal["euclidean", "cosine"] = "euclidean"
    output: Literal["medoids", "means"] = "medoids"

    position: ClassVar[str] = "pre"

    def __post_init__(self) -> None:
        c = self.clusters
        if c is None:
            raise ValueError("kmedoids inside the encoder needs clusters, the patch tokens "
                             "left (e.g. ts.apply(model, 'kmedoids', clusters=49)) or keep")
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"kmedoids: clusters={c!r}: expected an int >= 1")
        lay = self.layer
        if lay is not None and (isinstance(lay, bool) or not isinstance(lay, int) or lay < 0):
            raise ValueError(f"kmedoids: layer={lay!r}: expected a 0-based layer index")
        KMedoidsConfig(self.iterations, self.threshold, self.distance, self.output)

    @property
    def config(self) -> KMedoidsConfig:
        """The token-set options of the clustering."""
        return KMedoidsConfig(self.iterations, self.threshold, self.distance, self.output)

    def plan_layer(self, depth: int) -> int:
        """The layer that clusters in a ``depth``-layer encoder."""
        layers = None if self.layer is None else (self.layer,)
        return encoder_layers("kmedoids", layers, (OFFICIAL_LAYER,), OFFICIAL_DEPTH, depth)[0]

    def plan(self, depth: int) -> dict[int, Any]:
        return {self.plan_layer(depth): self.clusters}

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        """Cluster the patch tokens of ``tokens`` ``[B, T, D]`` into ``param`` medoids
        (:func:`cluster_step`); None when ``param`` is not below the patch count."""
        if int(param) >= tokens.shape[1] - int(has_cls):
            return None
        return cluster_step(tokens, sizes, int(param), has_cls, self.config)

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        return min(tokens, int(param) + int(has_cls))

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> KMedoidsSchedule:
        """``clusters = keep`` (the clustering layer must be one whose output is used)."""
        if "clusters" in options:
            raise ValueError("kmedoids: keep and clusters both set; keep is the cluster count")
        sched = cls(clusters=max(keep, 1), **options)
        if sched.plan_layer(depth) > until:
            raise ValueError(f"kmedoids: keep={keep}: the clustering layer "
                             f"{sched.plan_layer(depth)} is after the last layer whose "
                             f"output is used ({until})")
        return sched
