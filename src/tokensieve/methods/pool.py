"""2D average pooling of the patch grid to a smaller grid (the LLaVolta-style baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._grid import output_grid


@dataclass(frozen=True)
class PoolConfig:
    """No options: the output grid is the ``h x w`` factorisation of ``keep`` closest in
    aspect to the input grid (64 of 24x24 -> 8x8, 144 -> 12x12, 192 -> 12x16)."""


def _bins(length: int, out: int) -> tuple[Tensor, Tensor]:
    """Start (inclusive) and end (exclusive) of adaptive pooling bins, as in PyTorch."""
    i = torch.arange(out)
    return (i * length) // out, ((i + 1) * length + out - 1) // out


def pool_grid(tokens: Tensor, grid: tuple[int, int], out: tuple[int, int]) -> Tensor:
    """Average-pool ``[B, H*W, D]`` raster tokens to ``[B, h*w, D]`` (adaptive bins)."""
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    pooled = F.adaptive_avg_pool2d(x.float(), out).to(tokens.dtype)
    return pooled.reshape(b, d, -1).transpose(1, 2)


@register("pool", paper="2D average pooling of visual tokens (LLaVolta / LLaVA-style baseline)",
          stage="pre-llm", kind="merge", optional_signals=("grid",), config=PoolConfig)
def pool_reduce(tokens: Tensor, k: int, signals: Signals, config: PoolConfig,
                generator: torch.Generator | None) -> Reduction:
    """Average-pool the grid to ``keep`` tokens; each output stands for one window."""
    b, n, _ = tokens.shape
    grid, out = output_grid(n, k, signals.grid, "pool")
    row_lo, row_hi = _bins(grid[0], out[0])
    col_lo, col_hi = _bins(grid[1], out[1])
    centre = ((row_lo + row_hi - 1) // 2).unsqueeze(1) * grid[1] + (
        (col_lo + col_hi - 1) // 2).unsqueeze(0)
    sizes = (row_hi - row_lo).unsqueeze(1) * (col_hi - col_lo).unsqueeze(0)
    # Each source token's slot: the bin its row/column falls in (first bin on overlaps).
    rows = torch.bucketize(torch.arange(grid[0]), row_hi, right=True)
    cols = torch.bucketize(torch.arange(grid[1]), col_hi, right=True)
    slot = (rows.unsqueeze(1) * out[1] + cols.unsqueeze(0)).reshape(-1)
    dev = tokens.device
    return Reduction(
        tokens=pool_grid(tokens, grid, out),
        indices=None,
        positions=centre.reshape(1, -1).expand(b, -1).to(dev),
        sizes=sizes.reshape(1, -1).expand(b, -1).to(dev),
        assignment=slot.unsqueeze(0).expand(b, -1).to(dev),
    )
