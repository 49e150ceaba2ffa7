"""Shared fixtures: random token sets with every signal a method may ask for."""

from __future__ import annotations

import torch

from tokensieve.core.signals import Partitions


def make_inputs(b: int = 2, n: int = 576, d: int = 64, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, layers: int = 3, m: int = 7) -> dict:
    """Random tokens ``[B, N, D]`` on a square grid plus every per-token signal."""
    g = torch.Generator().manual_seed(seed)
    side = int(round(n ** 0.5))
    attn = torch.rand(b, layers, n, generator=g)
    attn = attn / attn.sum(-1, keepdim=True)
    text_mask = torch.ones(b, m, dtype=torch.bool)
    text_mask[-1, m - 2:] = False
    return {
        "tokens": torch.randn(b, n, d, generator=g).to(dtype),
        "cls_attn": attn.to(dtype),
        "attn_received": torch.rand(b, n, generator=g).to(dtype),
        "keys": torch.randn(b, n, 16, generator=g).to(dtype),
        "values": torch.randn(b, n, 16, generator=g).to(dtype),
        "text": torch.randn(b, m, d, generator=g).to(dtype),
        "text_mask": text_mask,
        "grid": (side, n // side),
        "query_attn": torch.rand(b, n, generator=g).softmax(-1).to(dtype),
        "text_keys": torch.randn(b, m, 16, generator=g).to(dtype),
        "groups": torch.randint(0, 9, (b, n), generator=g),
    }


def make_video_inputs(b: int = 2, frames: int = 4, side: int = 12, d: int = 64, *,
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """A clip: ``frames`` frames of ``side x side`` tokens, frame-major, with every signal
    (``grid`` is the per-frame grid, ``frames`` the frame count). Consecutive frames share
    most of their content (each frame is the previous one plus noise), as real videos do."""
    n = frames * side * side
    inputs = make_inputs(b, n, d, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, 1, side * side, d, generator=g)
    steps = 0.3 * torch.randn(b, frames, side * side, d, generator=g)
    steps[:, 0] = 0
    inputs["tokens"] = (x + steps.cumsum(1)).reshape(b, n, d).to(dtype)
    inputs["grid"] = (side, side)
    inputs["frames"] = frames
    return inputs


def inputs_for(method: str, **kw) -> dict:
    """The shared fixture a method runs on: anyres inputs for methods that need
    ``partitions``, a clip for video methods (``frames``), else :func:`make_inputs`."""
    from tokensieve import describe

    signals = describe(method).signals
    if "partitions" in signals:
        return make_anyres_inputs(**kw)
    if "frames" in signals:
        return make_video_inputs(**{k: v for k, v in kw.items() if k != "n"})
    return make_inputs(**kw)


#: Budgets of the generic tests (64 of the shared inputs) for the methods that cannot keep
#: 64 of the shared clip (4 frames of 144 tokens): their smallest output is whole frames.
GENERIC_KEEP = {"dycoke": 360, "frame-sample": 288}


def generic_keep(method: str) -> int:
    """The budget the generic tests give ``method`` on :func:`inputs_for`'s inputs."""
    return GENERIC_KEEP.get(method, 64)


def make_anyres_inputs(b: int = 2, side: int = 12, tiling: tuple[int, int] = (2, 2),
                       d: int = 64, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                       newlines: bool = False) -> dict:
    """An anyres token set: an overview image then ``rows*cols`` crops, each ``side x side``
    (optionally with one always-kept newline token after every crop row of the crops)."""
    per = side * side
    parts = [torch.zeros(per, dtype=torch.long)]
    for p in range(1, tiling[0] * tiling[1] + 1):
        parts.append(torch.full((per,), p, dtype=torch.long))
    ids = torch.cat(parts)
    if newlines:
        ids = torch.cat([ids, torch.full((side,), -1, dtype=torch.long)])
    n = ids.numel()
    inputs = make_inputs(b, n, d, seed=seed, dtype=dtype)
    inputs["grid"] = None
    inputs["partitions"] = Partitions(ids=ids.unsqueeze(0).expand(b, -1).clone(),
                                      tiling=tiling, grid=(side, side))
    return inputs
