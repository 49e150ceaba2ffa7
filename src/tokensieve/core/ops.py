"""Tensor operations shared by methods (gathering, top-k in original order, merging)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.core.reduction import Reduction


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b]]`` for ``x`` ``[B, N, ...]`` and ``idx`` ``[B, K]`` -> ``[B, K, ...]``."""
    # Advanced indexing copies whole rows; about 3x faster than gather with an expanded index.
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), idx]


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest ``scores`` ``[B, N]``, returned in ascending order.

    Ties are broken towards the lower index (a stable sort), so results do not depend
    on the backend's top-k implementation.
    """
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values


def select(tokens: Tensor, indices: Tensor) -> Reduction:
    """A subset reduction keeping ``indices`` ``[B, K]`` (sorted here to original order)."""
    indices = indices.sort(dim=-1).values
    return Reduction(tokens=gather_tokens(tokens, indices), indices=indices)


def normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """L2-normalise the last dimension, in float32."""
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=eps)


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
