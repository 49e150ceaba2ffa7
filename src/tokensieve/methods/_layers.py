"""Picking one layer of a per-layer score signal ``[B, L, N]``."""

from __future__ import annotations

from torch import Tensor


def pick_layer(attn: Tensor, which: int, option: str, signal: str, method: str) -> Tensor:
    """Layer ``which`` of ``attn`` ``[B, L, N]`` as float32 ``[B, N]``; ``[B, N]`` as is.

    Raises ``ValueError`` naming ``option`` when ``which`` is out of range.
    """
    if attn.dim() == 2:
        return attn.float()
    n_layers = attn.shape[1]
    if not -n_layers <= which < n_layers:
        raise ValueError(f"{method}: {option}={which} is out of range for {signal} with "
                         f"{n_layers} layers (shape {tuple(attn.shape)})")
    return attn[:, which].float()
