"""Tensor operations shared by methods (gathering, top-k in original order, merging)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.core.reduction import Reduction


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b]]`` for ``x`` ``[B, N, ...]`` and ``idx`` ``[B, K]`` -> ``[B, K, ...]``."""
    b, n = x.shape[:2]
    if x.is_contiguous():
        # One index_select of whole rows of the flattened batch: measured on one CPU thread
        # (576 x 1,024, K=64) 2.8x faster than advanced indexing at B=1, 1.6x at B=8, and
        # 6x / 3.6x faster than gather with an expanded index.
        if b == 1:
            return x[0].index_select(0, idx[0]).unsqueeze(0)
        flat = idx + (torch.arange(b, device=x.device) * n).unsqueeze(1)
        return x.reshape(b * n, *x.shape[2:]).index_select(0, flat.reshape(-1)).view(
            b, idx.shape[1], *x.shape[2:])
    return x[torch.arange(b, device=x.device).unsqueeze(1), idx]


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest ``scores`` ``[B, N]``, returned in ascending order.

    Ties are broken towards the lower index (a stable sort), so results do not depend
    on the backend's top-k implementation. When no row ties at its ``k``-th value (the ``k``-th
    largest above the ``k+1``-th: then the set is unique), a top-``k + 1`` decides, 3-4x
    faster than the stable sort of all ``N`` from ``B = 8`` or ``N = 2,880`` on; otherwise
    (ties at the boundary, NaN) the stable sort does.
    """
    s = scores.float()
    b, n = s.shape
    if k >= n:
        return torch.arange(n, device=s.device).repeat(b, 1)
    if k <= 0:
        return torch.empty(b, 0, dtype=torch.long, device=s.device)
    vals, idx = s.topk(k + 1, dim=-1)
    if b == 1:
        kth, after = vals[0, k - 1:k + 1].tolist()
        unique = kth > after
    else:
        unique = bool((vals[:, k - 1] > vals[:, k]).all())
    if unique:
        return idx[:, :k].sort(dim=-1).values
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values


def select(tokens: Tensor, indices: Tensor, ascending: bool = False) -> Reduction:
    """A subset reduction keeping ``indices`` ``[B, K]`` (sorted here to original order,
    unless the caller says they are ``ascending`` already)."""
    if not ascending:
        indices = indices.sort(dim=-1).values
    return Reduction(tokens=gather_tokens(tokens, indices), indices=indices)


_SAFE_HI = 2.0 ** 40
_SAFE_LO = 2.0 ** -40


def pow2_rescale(x: Tensor, dim: int | tuple[int, ...] = -1) -> Tensor:
    """``x`` times a power of two per slice over ``dim`` so that each slice's largest
    magnitude lies in ``[0.5, 1)`` (all-zero slices unchanged).

    Scaling by a power of two is exact, so ratios, cosines, argmins of distances and the
    like are unchanged, while squares and sums of squares no longer overflow (values near
    1e30) or underflow (values near 1e-30) in float32.
    """
    peak = x.abs().amax(dim=dim, keepdim=True)
    exponent = torch.frexp(peak).exponent
    return torch.ldexp(x, -exponent.to(x.dtype if x.is_floating_point() else torch.float32))


def select_mask(tokens: Tensor, keep: Tensor, always_mask: bool = False) -> Reduction:
    """A subset reduction from a keep mask ``[B, N]`` whose counts may differ per sample.

    Equal counts: a plain :func:`select` (``mask`` None unless ``always_mask``). Otherwise
    real tokens come first in original order, padded to the largest count with zero tokens
    whose ``indices`` repeat the row's last real index (0 in a row that keeps none), and
    ``mask`` ``[B, K']`` is False on the padding.
    """
    b, n = keep.shape
    counts = keep.sum(dim=1)
    if bool((counts == counts[0]).all()) and not always_mask:
        return select(tokens, torch.nonzero(keep)[:, 1].reshape(b, -1))
    width = int(counts.max())
    pos = torch.arange(n, device=keep.device).unsqueeze(0)
    order = torch.sort(torch.where(keep, pos, pos + n), dim=1).values[:, :width]
    mask = torch.arange(width, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
    last = order.gather(1, (counts - 1).clamp(min=0).unsqueeze(1)) if width else order
    last = torch.where(counts.unsqueeze(1) > 0, last, 0)   # a row that keeps nothing
    indices = torch.where(mask, order, last)
    kept = gather_tokens(tokens, indices)
    kept = torch.where(mask.unsqueeze(-1), kept, torch.zeros_like(kept))
    return Reduction(tokens=kept, indices=indices, mask=mask)


def normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """L2-normalise the last dimension, in float32.

    Each vector is first brought to a largest magnitude in ``[0.5, 1)`` by an exact power of
    two (:func:`pow2_rescale`), so vectors of any finite magnitude (1e30, 1e-30, or mixed
    within a set) get their true direction; an all-zero vector stays zero.
    """
    xf = x.float()
    if not xf.numel():
        return xf.clone()
    # The norms as F.normalize computes them; when every one lies in [2^-40, 2^40] the
    # squares neither overflowed nor lost the direction (the largest entry of a vector is at
    # least its norm / sqrt(D), so its square is far above float32's smallest normal), and
    # the result is F.normalize's. Otherwise (overflow, tiny or zero vectors) rescale first.
    norm = xf.norm(2, -1, keepdim=True)
    lo, hi = torch.aminmax(norm)
    if not (float(hi) <= _SAFE_HI and float(lo) >= _SAFE_LO):
        return torch.nn.functional.normalize(pow2_rescale(x).float(), dim=-1, eps=eps)
    return xf / norm.clamp_min(eps)


def cosine_similarity(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Pairwise cosine similarity ``[B, N, M]`` (float32) of ``x`` ``[B, N, D]`` and ``y``."""
    xn = normalize(x)
    yn = xn if y is None else normalize(y)
    return xn @ yn.transpose(-1, -2)


def merge_into_slots(
    tokens: Tensor,
    assignment: Tensor,
    num_slots: int,
    weights: Tensor | None = None,
    mode: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Pool tokens into ``num_slots`` groups.

    Args:
        tokens: ``[B, N, D]``.
        assignment: ``[B, N]`` long, the slot of each token (``-1``: not pooled).
        num_slots: number of output slots.
        weights: optional ``[B, N]`` per-token weights (e.g. sizes) for a weighted mean.
        mode: "mean" (weighted average) or "sum".

    Returns:
        ``(pooled [B, num_slots, D], total_weight [B, num_slots])`` in the tokens' dtype
        (accumulated in float32).
    """
    b, n, d = tokens.shape
    w = torch.ones(b, n, device=tokens.device) if weights is None else weights.float()
    valid = assignment >= 0
    w = w * valid
    slot = assignment.clamp(min=0)
    acc = torch.zeros(b, num_slots, d, device=tokens.device, dtype=torch.float32)
    acc.scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, d), tokens.float() * w.unsqueeze(-1))
    total = torch.zeros(b, num_slots, device=tokens.device, dtype=torch.float32)
    total.scatter_add_(1, slot, w)
    if mode == "mean":
        acc = acc / total.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    elif mode != "sum":
        raise ValueError(f"mode={mode!r}: expected 'mean' or 'sum'")
    return acc.to(tokens.dtype), total
