"""DPC-kNN: density-peak clustering over k nearest neighbours, then merging each cluster.

The clustering-and-merge step of SparseVLM's token recycling ("SparseVLM: Visual Token
Sparsification for Efficient Vision-Language Model Inference", Zhang et al., ICML 2025), the
one TCFormer introduced and HoliTom and PruneVid reuse on video tokens:

1. distances ``d_ij = ||x_i - x_j|| / sqrt(D)``;
2. density ``rho_i = exp(-mean of d_ij^2 over the knn nearest tokens j)`` (the token
   itself included, at distance 0), plus a tiny uniform noise ``u_i * 1e-6`` that breaks
   density ties; ties the float32 sum still leaves (the official code's fp16 sum leaves
   most) go by ``u_i``, then by the lower index, so "denser" is a strict order;
3. parent distance ``delta_i``: the distance to the nearest denser token (the largest
   distance of the whole set for the densest token);
4. centres: the ``cluster_num`` tokens of highest ``delta * rho`` (ties: the denser);
5. every token joins its nearest centre (each centre itself), and each cluster becomes the
   average of its members (weighted by ``weights`` when given).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tokensieve.core.ops import merge_into_slots


class Clusters(NamedTuple):
    """The result of :func:`dpc_knn` for ``tokens`` ``[B, N, D]`` and ``C`` clusters.

    Attributes:
        tokens: ``[B, C, D]`` the merged tokens (member average), in the tokens' dtype.
        centres: ``[B, C]`` long, the index of each cluster's centre token, clusters in
            descending order of the centre score ``delta * rho``.
        assignment: ``[B, N]`` long, the cluster (0..C-1) each token joined.
        sizes: ``[B, C]`` long, the number of member tokens of each cluster.
        mass: ``[B, C]`` float32, the total weight of each cluster's members (``sizes``
            when no weights are given).
    """

    tokens: Tensor
    centres: Tensor
    assignment: Tensor
    sizes: Tensor
    mass: Tensor


class Peaks(NamedTuple):
    """Steps 1-3 of DPC-kNN for ``tokens`` ``[B, N, D]`` (see :func:`density_peaks`).

    Attributes:
        dist: ``[B, N, N]`` float32 distances ``||x_i - x_j|| / sqrt(D)``.
        score: ``[B, N]`` the centre score ``delta * rho``.
        order: ``[B, N]`` the tokens densest first (the strict density order).
    """

    dist: Tensor
    score: Tensor
    order: Tensor


def density_peaks(tokens: Tensor, knn: int, *, generator: torch.Generator | None = None,
                  noise: float = 1e-6,
                  compute_mode: str = "donot_use_mm_for_euclid_dist") -> Peaks:
    """Distances, the strict density order and the centre scores ``delta * rho`` of the
    tokens of each row (steps 1-3 of the module docstring), for methods that pick density
    peaks without DPC-kNN's nearest-centre merge (FastVID's anchor tokens).

    ``knn`` counts the token itself; ``generator`` and ``noise`` as in :func:`dpc_knn` (one
    draw of ``N`` values serves every row). ``compute_mode``: ``torch.cdist``'s; the default
    takes exact differences (not the ``|a|^2 + |b|^2 - 2ab`` shortcut: equal tokens are at
    0), ``"use_mm_for_euclid_dist_if_necessary"`` is torch's own default (the shortcut
    above 25 tokens: one matrix product, far faster for wide tokens).
    """
    b, n, d = tokens.shape
    x = tokens.float()
    dist = torch.cdist(x, x, compute_mode=compute_mode) / math.sqrt(d)
    nearest = torch.topk(dist, knn, dim=-1, largest=False).values
    density = torch.exp(-(nearest ** 2).mean(dim=-1))
    where = tokens.device if generator is None else generator.device
    jitter = torch.rand(n, generator=generator, device=where).to(tokens.device).expand(b, -1)
    density = density + jitter * noise
    # A strict order, densest first: by density, then (ties the float32 sum leaves) by the
    # noise draw itself, then by index.
    order = torch.sort(jitter, dim=1, descending=True, stable=True).indices
    order = torch.gather(order, 1, torch.sort(torch.gather(density, 1, order), dim=1,
                                              descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device)
                                            .expand(b, -1))
    denser = rank.unsqueeze(1) < rank.unsqueeze(2)                 # [B, i, j]: j denser than i
    far = dist.flatten(1).amax(dim=1).view(b, 1, 1)
    parent = torch.where(denser, dist, far).amin(dim=-1)            # delta, [B, N]
    return Peaks(dist=dist, score=parent * density, order=order)


def peak_centres(peaks: Peaks, k: int) -> Tensor:
    """``[B, k]`` the ``k`` tokens of highest score ``delta * rho``, best first (ties: the
    denser)."""
    by_score = torch.sort(torch.gather(peaks.score, 1, peaks.order), dim=1, descending=True,
                          stable=True)
    return torch.gather(peaks.order, 1, by_score.indices[:, :k])


def dpc_knn(
    tokens: Tensor,
    cluster_num: int,
    *,
    weights: Tensor | None = None,
    knn: int | None = None,
    generator: torch.Generator | None = None,
    noise: float = 1e-6,
) -> Clusters:
    """Cluster the tokens of each row with DPC-kNN and merge every cluster.

    Args:
        tokens: ``[B, N, D]`` tokens (computed in float32).
        cluster_num: ``C``, the number of clusters, ``1 <= C <= N``.
        weights: optional ``[B, N]`` non-negative token weights (e.g. how many source
            tokens each stands for); clusters are weighted averages. ``None``: plain
            averages (the official code).
        knn: the neighbours (the token itself included) the density averages over;
            ``None``: ``cluster_num``, as the official SparseVLM code does.
        generator: the source of the density tie-breaking noise (``None``: torch's global
            RNG). One draw of ``N`` values serves every row, so a row gets the same result
            alone or in a batch.
        noise: the noise's scale: ``u * noise``, ``u ~ U(0, 1)``, is added to each density
            (1e-6); with ``noise=0`` the draw still breaks exact density ties.

    Returns:
        A :class:`Clusters` (merged tokens ``[B, C, D]``, centres ``[B, C]``, assignment
        ``[B, N]``, sizes ``[B, C]``, mass ``[B, C]``).

    Ties: of centres with equal scores the denser comes first; a token at equal distance
    from several centres joins the earlier one (the official code leaves both to
    ``torch.topk`` / ``argmin``).
    """
    b, n, d = tokens.shape
    if isinstance(cluster_num, bool) or not isinstance(cluster_num, int) or not (
            1 <= cluster_num <= n):
        raise ValueError(f"cluster_num={cluster_num!r}: expected an int in [1, {n}] "
                         "(the number of tokens)")
    knn = cluster_num if knn is None else knn
    if isinstance(knn, bool) or not isinstance(knn, int) or not 1 <= knn <= n:
        raise ValueError(f"knn={knn!r}: expected an int in [1, {n}]")
    if weights is not None and tuple(weights.shape) != (b, n):
        raise ValueError(f"weights: expected shape {(b, n)}, got {tuple(weights.shape)}")
    peaks = density_peaks(tokens, knn, generator=generator, noise=noise)
    dist = peaks.dist
    centres = peak_centres(peaks, cluster_num)
    to_centre = torch.gather(dist, 1, centres.unsqueeze(-1).expand(-1, -1, n))  # [B, C, N]
    assignment = to_centre.argmin(dim=1)
    slots = torch.arange(cluster_num, device=tokens.device).expand(b, -1)
    assignment.scatter_(1, centres, slots)
    merged, mass = merge_into_slots(tokens, assignment, cluster_num, weights=weights)
    sizes = torch.zeros(b, cluster_num, dtype=torch.long, device=tokens.device)
    sizes.scatter_add_(1, assignment, torch.ones_like(assignment))
    return Clusters(tokens=merged, centres=centres, assignment=assignment, sizes=sizes,
                    mass=mass)
