"""Per-frame spatial average pooling of a clip to a smaller grid (the video baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals, infer_grid
from tokensieve.methods.pool import pool_grid


@dataclass(frozen=True)
class FramePoolConfig:
    """No options: the per-frame grid is :func:`frame_pool_grid` of ``keep // T``."""


def frame_pool_grid(grid: tuple[int, int], per_frame: int) -> tuple[int, int]:
    """The pooled grid ``(h, w)`` of a frame of ``grid`` ``(H, W)`` for a budget of
    ``per_frame`` tokens: the largest ``h * w <= per_frame`` with ``h <= H`` and ``w <= W``
    whose aspect ratio is within a factor 1.5 of the frame's (so the pooled frame keeps
    about its shape; when tiny budgets allow none, of any aspect); ties go to the aspect
    closest to the frame's, then to the taller grid. 24x24 frames: 64 -> 8x8, 50 -> 7x7,
    47 -> 7x6, 48 -> 8x6; 27x27 to 196 -> 14x14.
    """
    big_h, big_w = grid
    if per_frame < 1:
        raise ValueError(f"per_frame={per_frame}: expected at least 1 token per frame")
    target = math.log(big_h / big_w)
    best: tuple[bool, int, float, int] | None = None
    best_hw = (1, 1)
    for h in range(1, min(big_h, per_frame) + 1):
        for w in range(1, min(big_w, per_frame // h) + 1):
            off = abs(math.log(h / w) - target)
            # the 1e-9 keeps an exact factor 1.5 (e.g. 2x3 of a square) inside despite rounding
            key = (off <= math.log(1.5) + 1e-9, h * w, -off, h)
            if best is None or key > best:
                best, best_hw = key, (h, w)
    return best_hw


def _bins(length: int, out: int) -> tuple[Tensor, Tensor]:
    """Start (inclusive) and end (exclusive) of adaptive pooling bins, as in PyTorch."""
    i = torch.arange(out)
    return (i * length) // out, ((i + 1) * length + out - 1) // out


@register("frame-pool", paper="Per-frame spatial average pooling (video baseline)",
          stage="pre-llm", kind="merge", signals=("frames",), optional_signals=("grid",),
          config=FramePoolConfig)
def frame_pool(tokens: Tensor, k: int, signals: Signals, config: FramePoolConfig,
               generator: torch.Generator | None) -> Reduction:
    """Average-pool every frame of a clip ``[B, T*H*W, D]`` (frame-major) to ``h x w``.

    The grid is :func:`frame_pool_grid` of ``keep // T`` (at most ``keep`` tokens in all:
    ``T h w``); the per-frame grid is the ``grid`` signal, else square. Bins are PyTorch's
    adaptive-average-pooling bins (overlapping when ``H`` is not a multiple of ``h``).
    ``keep < T`` (less than a token per frame) raises ``ValueError``.

    Returns ``[B, T*h*w, D]`` tokens, frame-major, raster order within a frame;
    ``positions`` the source token at each bin's centre (the lower middle row / column for
    even bin sizes); ``sizes`` the bin areas; ``assignment`` each source token's bin (the
    first one where bins overlap).
    """
    t = signals.require("frames", "frame-pool")
    assert isinstance(t, int)
    b, n, d = tokens.shape
    per = n // t
    if k < t:
        raise ValueError(f"frame-pool: keep={k} is less than one token per frame ({t} "
                         f"frames); expected keep >= {t}")
    grid = infer_grid(per, signals.grid, "frame-pool")
    out = frame_pool_grid(grid, k // t)
    pooled = pool_grid(tokens.reshape(b * t, per, d), grid, out).reshape(b, -1, d)
    row_lo, row_hi = _bins(grid[0], out[0])
    col_lo, col_hi = _bins(grid[1], out[1])
    centre = (((row_lo + row_hi - 1) // 2).unsqueeze(1) * grid[1]
              + ((col_lo + col_hi - 1) // 2).unsqueeze(0)).reshape(-1)
    sizes = ((row_hi - row_lo).unsqueeze(1) * (col_hi - col_lo).unsqueeze(0)).reshape(-1)
    rows = torch.bucketize(torch.arange(grid[0]), row_hi, right=True)
    cols = torch.bucketize(torch.arange(grid[1]), col_hi, right=True)
    slot = (rows.unsqueeze(1) * out[1] + cols.unsqueeze(0)).reshape(-1)
    frame = torch.arange(t).unsqueeze(1)
    cells = out[0] * out[1]
    dev = tokens.device
    return Reduction(
        tokens=pooled,
        indices=None,
        positions=(frame * per + centre).reshape(1, -1).expand(b, -1).to(dev),
        sizes=sizes.repeat(t).reshape(1, -1).expand(b, -1).to(dev),
        assignment=(frame * cells + slot).reshape(1, -1).expand(b, -1).to(dev),
    )
