"""Shared pieces of the adaptive in-LLM methods (MustDrop, ZipVL): their attention rows,
the cap that ``keep`` puts on every cut, and the capped keep mask."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep


def rater_rows(query_attn: Tensor) -> Tensor:
    """``query_attn`` as float32 rows ``[B, R, N]``: ``[B, N]`` is one row. All-zero rows
    (padding) add nothing to a sum or a maximum of attention probabilities."""
    attn = query_attn.float()
    return attn.unsqueeze(1) if attn.dim() == 2 else attn


def uniform_cap(n: int, keep: int | float | None, cuts: tuple[int, ...], depth: int,
                method: str) -> list[int]:
    """Per-cut caps of an adaptive method for an image of ``n`` tokens.

    ``keep=None``: no cap (``n`` at every cut; the method's thresholds alone decide).
    Otherwise ``keep`` (a count or a fraction of ``n``) is an upper bound on the average
    image tokens per LLM layer (the budget meaning of every multi-stage method): every
    cut keeps at most ``c = floor((keep * depth - L0 * n) / (depth - L0))`` tokens, ``L0``
    the first cut (the layers before it see all ``n``), so a run averages at most ``keep``
    tokens per layer whatever the thresholds keep. Raises ``ValueError`` when ``keep`` is
    below what the first cut allows (``c < 1``).
    """
    if keep is None:
        return [n] * len(cuts)
    target = resolve_keep(keep, n)
    first = cuts[0]
    cap = math.floor((target * depth - first * n) / (depth - first) + 1e-9)
    if cap < 1:
        low = (first * n + depth - first) / depth
        raise ValueError(
            f"keep={keep!r}: {method} cuts first before layer {first} of {depth}, so an image "
            f"of {n} tokens averages at least {low:.4g} tokens per layer (1 token kept from "
            "the first cut on); pass a larger keep or earlier layers=(...)")
    return [min(n, cap)] * len(cuts)


def capped(keep: Tensor, score: Tensor, k: int, first: Tensor | None = None) -> Tensor:
    """At most ``k`` of the ``keep`` ``[B, N]`` tokens per row, and at least one.

    Rows keeping more than ``k`` keep the ``first`` ``[B, N]`` (bool, e.g. a protected key
    set) before the others, each group by ``score`` ``[B, N]`` descending (ties: the lower
    index). A row keeping nothing keeps its highest-scoring token.
    """
    b, n = keep.shape
    prio = first if first is not None else torch.zeros_like(keep)
    # sort key: kept before dropped, priority before the rest, then score descending
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    for group in (prio, keep):
        g = torch.gather(group, 1, order)
        order = torch.gather(order, 1, torch.sort((~g).long(), dim=1, stable=True).indices)
    count = keep.sum(dim=1).clamp(min=1, max=k)
    take = torch.arange(n, device=keep.device).unsqueeze(0) < count.unsqueeze(1)
    out = torch.zeros_like(keep)
    out.scatter_(1, order, take)
    return out
