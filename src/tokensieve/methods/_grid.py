"""The input and output grids of methods that resample the patch grid (pool, dct)."""

from __future__ import annotations

from tokensieve.core.grid import target_grid, valid_grid_counts
from tokensieve.core.signals import infer_grid


def output_grid(n: int, k: int, grid: tuple[int, int] | None, method: str,
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(grid, out)``: the grid of ``n`` tokens (``grid`` signal or square) and the
    ``h x w = k`` grid closest in aspect to it.

    Raises ``ValueError`` naming ``method`` when ``k`` does not factor into such a grid.
    """
    grid = infer_grid(n, grid, method)
    out = target_grid(k, grid)
    if out is None:
        raise ValueError(f"{method}: keep={k} does not factor into a grid of about the aspect of "
                         f"{grid}; try one of {valid_grid_counts(grid, k)}")
    return grid, out
