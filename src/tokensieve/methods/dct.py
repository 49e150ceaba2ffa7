"""Fourier (DCT) low-pass: keep the low-frequency coefficients of the token grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._grid import output_grid


@dataclass(frozen=True)
class DCTConfig:
    """No options: the output grid is the ``h x w`` factorisation of ``keep`` closest in
    aspect to the input grid (as for ``pool``: 64 of 24x24 -> 8x8, 192 -> 12x16)."""


def dct_matrix(n: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal DCT-II matrix ``M`` ``[n, n]``: ``coeffs = M @ x``, ``x = M.T @ coeffs``.

    ``M[u, i] = s(u) cos(pi (2i + 1) u / (2n))`` with ``s(0) = sqrt(1/n)``, else ``sqrt(2/n)``.
    """
    i = torch.arange(n, dtype=dtype, device=device)
    u = i.unsqueeze(1)
    m = torch.cos(math.pi * (2 * i.unsqueeze(0) + 1) * u / (2 * n))
    scale = torch.full((n, 1), math.sqrt(2.0 / n), dtype=dtype, device=device)
    scale[0] = math.sqrt(1.0 / n)
    return m * scale


def dct_lowpass(tokens: Tensor, grid: tuple[int, int], out: tuple[int, int]) -> Tensor:
    """Low-pass resample ``[B, H*W, D]`` raster tokens to ``[B, h*w, D]`` via the 2D DCT.

    Per channel: ``C = M_H X M_W^T`` (orthonormal DCT-II), keep ``C[:h, :w]``, then
    ``X' = sqrt(h w / (H W)) M_h^T C[:h, :w] M_w`` (inverse DCT onto the small grid). The
    factor keeps amplitudes: a constant grid stays the same constant, and ``(h, w) ==
    (H, W)`` returns the input. Computed in float32, returned in the tokens' dtype.
    """
    b, _, d = tokens.shape
    (big_h, big_w), (h, w) = grid, out
    work = torch.float32
    dev = tokens.device
    m_h, m_w = dct_matrix(big_h, dev, work), dct_matrix(big_w, dev, work)
    i_h, i_w = dct_matrix(h, dev, work), dct_matrix(w, dev, work)
    x = tokens.to(work).reshape(b, big_h, big_w, d)
    coeff = torch.einsum("uh,bhwd,vw->buvd", m_h[:h], x, m_w[:w])  # [B, h, w, D]
    low = torch.einsum("uh,buvd,vw->bhwd", i_h, coeff, i_w)  # [B, h, w, D]
    low = low * math.sqrt((h * w) / (big_h * big_w))
    return low.reshape(b, h * w, d).to(tokens.dtype)


def _tiles(length: int, out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Even tiling of ``range(length)`` into ``out`` tiles: the tile of every position
    (``floor(i * out / length)``) and the centre position of every tile."""
    tile = torch.arange(length, device=device) * out // length
    i = torch.arange(out, device=device)
    start = (i * length + out - 1) // out
    end = ((i + 1) * length + out - 1) // out - 1
    return tile, (start + end) // 2


@register(
    "dct",
    paper="Fourier-VLM: Compressing Vision Tokens in the Frequency Domain for Large "
          "Vision-Language Models (2025); training-free DCT low-pass variant",
    stage="pre-llm", kind="merge", optional_signals=("grid",), config=DCTConfig,
)
def dct_reduce(tokens: Tensor, k: int, signals: Signals, config: DCTConfig,
               generator: torch.Generator | None) -> Reduction:
    """Keep the ``h x w = keep`` lowest 2D-DCT frequencies of the grid, as ``h x w`` tokens.

    ``tokens``: ``[B, H*W, D]`` on ``grid`` (square inferred). Returns ``[B, h*w, D]``.
    ``positions`` are the source tokens at the centres of an even ``h x w`` tiling, and
    ``assignment`` / ``sizes`` describe that tiling (each output token summarises its
    tile, though through the whole low-pass spectrum rather than a window average).
    """
    b, n, _ = tokens.shape
    grid, out = output_grid(n, k, signals.grid, "dct")
    dev = tokens.device
    tile_r, rows = _tiles(grid[0], out[0], dev)
    tile_c, cols = _tiles(grid[1], out[1], dev)
    centre = (rows.unsqueeze(1) * grid[1] + cols.unsqueeze(0)).reshape(-1)
    slot = (tile_r.unsqueeze(1) * out[1] + tile_c.unsqueeze(0)).reshape(-1)
    sizes = torch.bincount(slot, minlength=k)
    return Reduction(
        tokens=dct_lowpass(tokens, grid, out),
        indices=None,
        positions=centre.unsqueeze(0).expand(b, -1),
        sizes=sizes.unsqueeze(0).expand(b, -1),
        assignment=slot.unsqueeze(0).expand(b, -1),
    )
