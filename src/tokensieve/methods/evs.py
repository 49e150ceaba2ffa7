"""EVS (vLLM's Efficient Video Sampling): keep the tokens that changed most since the
previous frame, at the same spatial location; the first frame whole."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from tokensieve.core.ops import normalize, select, topk_indices
from tokensieve.core.options import Range
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals

#: The score vLLM gives the first frame's tokens: above any ``1 - cos`` (at most 2), so
#: they come first in the descending order.
FIRST_FRAME_SCORE = 255.0


def evs_retained_count(frames: int, height: int, width: int, rate: float) -> int:
    """How many tokens vLLM's EVS keeps of a clip of ``frames`` frames of ``height x width``
    tokens at pruning rate ``rate`` (``q`` in ``[0, 1)``).

    vLLM's rule (``compute_retained_tokens_count``): ``int(T * H * W * (1 - q))`` (Python
    float arithmetic, truncated), but never fewer than one frame (``H * W``), so the first
    frame always stays whole. ``H`` and ``W`` are the grid the LLM sees (after Qwen's 2x2
    merger: vLLM divides the patch grid by ``spatial_merge_size`` first).

    Raises:
        ValueError: a count that is not a positive int, or ``rate`` outside ``[0, 1)``.
    """
    for name, v in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name}={v!r}: expected a positive int")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate={rate!r}: expected a pruning rate q in [0, 1)")
    per_frame = int(height) * int(width)
    total = per_frame * int(frames)
    return max(per_frame, int(total * (1 - float(rate))))


@dataclass(frozen=True)
class EvsConfig:
    """EVS options.

    Attributes:
        rate: vLLM's pruning rate ``q`` (``video_pruning_rate``) in ``[0, 1)``. ``None``
            (default): ``keep`` is the count. Given: the count is vLLM's
            (:func:`evs_retained_count`: ``max(H*W, int(T*H*W*(1-q)))``) and ``keep`` only
            caps it (``keep=1.0`` is no cap); a cap below that count raises ``ValueError``.
    """

    rate: Annotated[float, Range(0.0, 1.0, hi_open=True)] | None = None


def evs_scores(tokens: Tensor, frames: int) -> Tensor:
    """EVS's per-token score ``[B, T*P]`` (float32) of a frame-major clip ``[B, T*P, D]``.

    Frame ``t > 0``: ``1 - cos(x[t, p], x[t-1, p])``, the cosine of the same position
    ``p`` in the previous frame; frame 0: :data:`FIRST_FRAME_SCORE`. The cosine is
    ``torch.nn.functional.cosine_similarity``'s formula (each vector divided by its norm,
    then the dot product: bit-identical in float32) on vectors first brought to a safe
    magnitude by an exact power of two (:func:`tokensieve.core.ops.normalize`), so tokens
    near 1e30 do not overflow the norms.
    """
    b, n, d = tokens.shape
    unit = normalize(tokens).view(b, frames, n // frames, d)
    dissim = 1.0 - (unit[:, 1:] * unit[:, :-1]).sum(dim=-1)
    first = torch.full_like(unit[:, :1, :, 0], FIRST_FRAME_SCORE)
    return torch.cat([first, dissim], dim=1).reshape(b, n)


@register(
    "evs",
    paper="Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM "
          "Inference (EVS, NVIDIA, arXiv:2510.14624, 2025), as in vLLM",
    stage="pre-llm", kind="subset", signals=("frames",), config=EvsConfig,
)
def evs(tokens: Tensor, k: int, signals: Signals, config: EvsConfig,
        generator: torch.Generator | None) -> Reduction:
    """EVS on a clip ``tokens`` ``[B, T*P, D]`` (frame-major, ``frames`` = ``T``).

    Scores: :func:`evs_scores` (first frame 255, else ``1 - cos`` to the previous frame's
    token at the same position). Kept: the ``k`` highest scores, ties to the lower index
    (vLLM's stable descending ``argsort``), returned in original order; with ``rate`` the
    count is vLLM's :func:`evs_retained_count` instead of ``keep``. Every sample of a
    batch is scored on its own.

    Agreement with vLLM (``vllm/multimodal/video_prune/evs.py``,
    ``compute_retention_mask``): the same indices on float32 features. Differences: the
    scores are computed in float32 (vLLM computes them in the embeddings' dtype, bf16 in
    serving, so near-ties may break differently on bf16 inputs); ``keep`` below one frame
    (which vLLM's count never is) keeps the first ``keep`` tokens of frame 0 in raster
    order, what vLLM's stable order gives for that count; batches (vLLM scores one video
    at a time).
    """
    t = signals.require("frames", "evs")
    assert isinstance(t, int)
    b, n, _ = tokens.shape
    if config.rate is not None:
        count = evs_retained_count(t, 1, n // t, config.rate)
        if count > k:
            raise ValueError(f"evs: keep={k} is below the {count} tokens vLLM's rate="
                             f"{config.rate} keeps of {t} frames x {n // t} tokens; expected "
                             f"keep >= {count} (keep=1.0: no cap)")
        k = count
    return select(tokens, topk_indices(evs_scores(tokens, t), k), ascending=True)
