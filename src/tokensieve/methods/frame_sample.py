"""Uniform temporal sampling: keep whole frames, evenly spaced (the video baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.ops import select
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals


@dataclass(frozen=True)
class FrameSampleConfig:
    """No options: as many whole frames as ``keep`` holds, evenly spaced."""


def sampled_frames(frames: int, count: int) -> list[int]:
    """``count`` of ``frames`` frame indices evenly spaced from the first to the last:
    ``floor(i (T - 1) / (count - 1))`` for ``i = 0 .. count - 1`` (``[0]`` for one): the
    frame sampler of LLaVA-OneVision / lmms-eval, ``np.linspace(0, T - 1, count,
    dtype=int)``, in exact integers (numpy's float steps can land just below an integer
    and floor one frame lower, e.g. frame 14 instead of 15 for 23 of 31 frames)."""
    if not 1 <= count <= frames:
        raise ValueError(f"count={count}: expected 1 <= count <= frames={frames}")
    if count == 1:
        return [0]
    return [i * (frames - 1) // (count - 1) for i in range(count)]


@register("frame-sample", paper="Uniform temporal frame sampling (video baseline)",
          stage="pre-llm", kind="subset", signals=("frames",), config=FrameSampleConfig)
def frame_sample(tokens: Tensor, k: int, signals: Signals, config: FrameSampleConfig,
                 generator: torch.Generator | None) -> Reduction:
    """Keep ``min(T, keep // P)`` whole frames of a clip ``[B, T*P, D]`` (frame-major),
    evenly spaced (:func:`sampled_frames`), in order: at most ``keep`` tokens (the budget is
    spent in whole frames). ``keep < P`` (less than one frame) raises ``ValueError``.
    Reads no token values, so every sample keeps the same positions.
    """
    t = signals.require("frames", "frame-sample")
    assert isinstance(t, int)
    b, n, _ = tokens.shape
    per = n // t
    if k < per:
        raise ValueError(f"frame-sample: keep={k} is less than one frame ({per} tokens); "
                         f"expected keep >= {per}")
    kept = torch.tensor(sampled_frames(t, min(t, k // per)), device=tokens.device)
    idx = (kept.unsqueeze(1) * per + torch.arange(per, device=tokens.device)).reshape(1, -1)
    return select(tokens, idx.expand(b, -1), ascending=True)
