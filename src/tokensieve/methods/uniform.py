"""Uniform (grid-strided) selection: a spatially even subsample of the patch grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.grid import target_grid
from tokensieve.core.ops import select
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals, infer_grid


@dataclass(frozen=True)
class UniformConfig:
    """No options."""


def strided_positions(length: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """``count`` positions spread evenly over ``range(length)``, centred in their strides."""
    return ((torch.arange(count, device=device) + 0.5) * length / count).floor().long()


def uniform_indices(n: int, k: int, grid: tuple[int, int],
                    device: torch.device | str = "cpu") -> Tensor:
    """Ascending raster indices ``[K]`` of a grid-strided subsample.

    When ``k`` factors into an ``h x w`` grid of about the patch grid's aspect, the kept
    tokens are the centres of an ``h x w`` tiling; otherwise they are evenly spaced
    along the raster order.
    """
    target = target_grid(k, grid)
    if target is None:
        return strided_positions(n, k, device)
    rows = strided_positions(grid[0], target[0], device)
    cols = strided_positions(grid[1], target[1], device)
    return (rows.unsqueeze(1) * grid[1] + cols.unsqueeze(0)).reshape(-1)


@register("uniform", paper="Grid-strided uniform subsampling (baseline)", stage="pre-llm",
          kind="subset", optional_signals=("grid",), config=UniformConfig)
def uniform_select(tokens: Tensor, k: int, signals: Signals, config: UniformConfig,
                   generator: torch.Generator | None) -> Reduction:
    """Keep an evenly strided subset of the grid (the same positions for every sample)."""
    b, n, _ = tokens.shape
    grid = infer_grid(n, signals.grid, "uniform")
    idx = uniform_indices(n, k, grid, tokens.device)
    return select(tokens, idx.unsqueeze(0).expand(b, -1))
