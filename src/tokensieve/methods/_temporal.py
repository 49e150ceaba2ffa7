"""Pieces shared by the segment-based video methods (FastVID, PruneVid, HoliTom).

* per-position cosine similarity of consecutive frames and the segment lengths of a list
  of cut points or frame labels;
* :func:`apportion`: a clip budget ``keep`` split over token groups (segments, frames,
  static sets) so that it reproduces a ratio-driven official rounding;
* per-sample random streams (every sample gets the same draws alone or in a batch);
* :func:`pack`: per-sample outputs of different lengths as one :class:`Reduction`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokensieve.core.ops import normalize
from tokensieve.core.reduction import Reduction

#: ``offset`` of :func:`apportion` for each official rounding of ``ratio * size``.
FLOOR, ROUND, CEIL = 1.0, 0.5, 0.0


def consecutive_cosine(frames: Tensor) -> Tensor:
    """``[T - 1, n]`` float32: cosine of each token with the token at the same position of
    the next frame, for ``frames`` ``[T, n, D]``."""
    unit = normalize(frames)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def lengths_from_cuts(cuts: list[int], frames: int) -> list[int]:
    """Segment lengths of ``frames`` frames cut after each frame index in ``cuts``."""
    bounds = [-1, *sorted(set(cuts)), frames - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def run_lengths(labels: list[int]) -> list[int]:
    """Lengths of the runs of equal consecutive values of ``labels``."""
    out: list[int] = []
    for i, label in enumerate(labels):
        if i and label == labels[i - 1]:
            out[-1] += 1
        else:
            out.append(1)
    return out


def apportion(sizes: list[int], keep: int, offsets: list[float],
              whole: list[bool] | None = None) -> list[int]:
    """Counts ``c_i <= sizes[i]`` summing to ``min(keep, sum(sizes))``.

    The official methods give group ``i`` ``round_i(ratio * sizes[i])`` tokens for one ratio
    (``int`` -> offset :data:`FLOOR`, ``round`` -> :data:`ROUND`, ``ceil`` ->
    :data:`CEIL`). Its ``m``-th token appears once the ratio reaches
    ``(m - 1 + offset_i) / sizes[i]``; taking the ``keep`` tokens with the lowest such
    thresholds (ties: the earlier group, then the lower ``m``) gives exactly the official
    counts whenever some ratio makes them add up to ``keep``, and otherwise the counts of
    the nearest ratio with the difference given to the groups next in line. Groups marked
    ``whole`` (kept whole by the official code at any ratio) come before every other token.
    """
    if keep <= 0 or not sizes:
        return [0] * len(sizes)
    whole = whole or [False] * len(sizes)
    thresholds, owners = [], []
    for i, (size, offset, full) in enumerate(zip(sizes, offsets, whole, strict=True)):
        if size <= 0:
            continue
        m = torch.arange(size, dtype=torch.float64)
        thresholds.append((m + offset) / size - (2.0 if full else 0.0))
        owners.append(torch.full((size,), i, dtype=torch.long))
    if not thresholds:
        return [0] * len(sizes)
    order = torch.sort(torch.cat(thresholds), stable=True).indices[:keep]
    counts = torch.bincount(torch.cat(owners)[order], minlength=len(sizes))
    return counts.tolist()


def sample_seed(generator: torch.Generator | None) -> int | None:
    """One draw from ``generator`` seeding every per-sample stream (``None``: none)."""
    if generator is None:
        return None
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))


def stream(seed: int | None, key: int) -> torch.Generator | None:
    """A CPU generator for draw ``key`` of a sample, the same for every sample of a batch
    (``None`` when ``seed`` is: torch's global RNG)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed + 1_000_003 * key) % (2 ** 63))


def pack(parts: list[tuple[Tensor, Tensor, Tensor]], width: int, dtype: torch.dtype,
         indices: Tensor | None = None, groups: list[Tensor] | None = None) -> Reduction:
    """One reduction from per-sample ``(tokens [K_i, D], positions [K_i], sizes [K_i])``.

    Each sample's outputs are sorted by position. ``width`` columns: samples with fewer
    outputs are padded with zero tokens of size 0 repeating their last position, and
    ``mask`` marks the real ones (``None`` when every sample fills ``width``). ``groups``:
    per sample the group id of each output (``[K_i]``), kept as ``Reduction.groups``
    (``-1`` on padding).
    """
    b, d = len(parts), parts[0][0].shape[-1]
    dev = parts[0][0].device
    tokens = torch.zeros(b, width, d, dtype=dtype, device=dev)
    positions = torch.zeros(b, width, dtype=torch.long, device=dev)
    sizes = torch.zeros(b, width, dtype=torch.long, device=dev)
    mask = torch.zeros(b, width, dtype=torch.bool, device=dev)
    group_ids = None if groups is None else torch.full((b, width), -1, dtype=torch.long,
                                                       device=dev)
    for i, (tok, pos, size) in enumerate(parts):
        k = tok.shape[0]
        order = torch.sort(pos, stable=True).indices
        tokens[i, :k] = tok[order].to(dtype)
        positions[i, :k] = pos[order]
        sizes[i, :k] = size[order]
        mask[i, :k] = True
        if group_ids is not None:
            group_ids[i, :k] = groups[i][order]  # type: ignore[index]
        if 0 < k < width:
            positions[i, k:] = positions[i, k - 1]
    full = bool(mask.all())
    return Reduction(tokens=tokens, indices=indices, positions=positions, sizes=sizes,
                     mask=None if full else mask, groups=group_ids)
