"""PruneVid (pre-LLM part): frame clusters as segments, static tokens merged over time,
DPC-kNN merging of the static and of each frame's dynamic tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from tokensieve.core.ops import normalize
from tokensieve.core.options import Count, PositiveCount, Range
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals, frame_grid
from tokensieve.methods._dpc import dpc_knn
from tokensieve.methods._temporal import FLOOR, apportion, pack, run_lengths, sample_seed, stream


@dataclass(frozen=True)
class PruneVidConfig:
    """PruneVid options (official defaults of ``scripts/eval.sh`` and the PLLaVA code).

    Attributes:
        tau: a position is static in a segment when the mean cosine over all pairs of its
            frames exceeds ``tau`` (0.8).
        segment_ratio: the frames are clustered into ``int(T * ratio)`` clusters (at least
            one) before segmenting (temporal_segment_ratio, 0.25).
        knn: DPC-kNN density neighbours, of frames and of tokens (7; at most the count).
        min_cluster: token groups of at most this many tokens are kept whole (14).
    """

    tau: Annotated[float, Range(-1.0, 1.0)] = 0.8
    segment_ratio: Annotated[float, Range(0.0, 1.0, lo_open=True)] = 0.25
    knn: PositiveCount = 7
    min_cluster: Count = 14


def refine_labels(labels: list[int]) -> list[int]:
    """PruneVid's smoothing of frame cluster labels: of each label only its longest runs
    stay (none when they are single frames); every cleared run takes the label of its
    longer neighbouring run (ties and no right neighbour: the left one; none: label 0),
    filled left to right."""
    n = len(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for length in run_lengths(labels):
        runs.setdefault(labels[start], []).append((start, start + length - 1))
        start += length
    out = list(labels)
    for spans in runs.values():
        longest = max(e - s + 1 for s, e in spans)
        for s, e in spans:
            if longest == 1 or e - s + 1 < longest:
                out[s:e + 1] = [-1] * (e - s + 1)
    i = 0
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        s = i
        while i < n and out[i] == -1:
            i += 1
        e = i - 1
        left = right = None
        left_len = right_len = 0
        if s > 0:
            left = out[s - 1]
            j = s - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_len = s - 1 - j
        if e < n - 1:
            right = out[e + 1]
            j = e + 1
            while j < n and out[j] == right:
                j += 1
            right_len = j - e - 1
        label = right if right_len > left_len or left is None else left
        out[s:e + 1] = [0 if label is None else label] * (e - s + 1)
    return out


def prunevid_segments(frames: Tensor, ratio: float, knn: int,
                      generator: torch.Generator | None) -> list[int]:
    """Segment lengths: DPC-kNN clusters of the frames' mean tokens ``[T, D]``, refined by
    :func:`refine_labels`, then runs of equal labels."""
    t = frames.shape[0]
    clusters = max(1, int(t * ratio))
    labels = dpc_knn(frames[None], clusters, knn=min(knn, t), generator=generator).assignment
    return run_lengths(refine_labels(labels[0].tolist()))


def static_positions(window: Tensor, tau: float) -> Tensor:
    """``[n]`` bool: positions whose mean cosine over all pairs of distinct frames of
    ``window`` ``[W, n, D]`` exceeds ``tau`` (none for a single frame)."""
    w = window.shape[0]
    if w < 2:
        return torch.zeros(window.shape[1], dtype=torch.bool, device=window.device)
    unit = normalize(window)                                   # [W, n, D]
    total = unit.sum(dim=0)
    pair_sum = (total * total).sum(dim=-1) - w       # all pairs less the W self-pairs
    return pair_sum / (w * (w - 1)) > tau


@register(
    "prunevid",
    paper="PruneVid: Visual Token Pruning for Efficient Video Large Language Models "
          "(Huang et al., Findings of ACL 2025)",
    stage="pre-llm", kind="merge", signals=("frames",), optional_signals=("grid",),
    config=PruneVidConfig, llm_stage="prunevid-llm",
)
def prunevid(tokens: Tensor, k: int, signals: Signals, config: PruneVidConfig,
             generator: torch.Generator | None) -> Reduction:
    """PruneVid's spatial-temporal merge of a clip ``tokens`` ``[B, T*n, D]`` (frame-major
    projected tokens).

    1. Segments: :func:`prunevid_segments` (frame clusters, refined to contiguous runs).
    2. Static / dynamic: per segment, :func:`static_positions`; a static position becomes
       the mean of its tokens over the segment's frames; the others stay, per frame.
    3. Budget: the official code keeps groups (a segment's static tokens, a frame's dynamic
       ones) of at most ``min_cluster`` tokens whole and clusters larger ones into
       ``int(0.5 * size)``. Here the groups share ``keep`` by
       :func:`~tokensieve.methods._temporal.apportion` (small groups first, floor
       rounding): the official counts when ``keep`` is their total, the same rule at
       another ratio otherwise; at most the group sizes (fewer than ``keep`` when the
       averaged static tokens are fewer: ``mask`` marks the real ones).
    4. A group with fewer slots than tokens is DPC-kNN merged (``knn = 7``, member means).

    Output: ``[B, keep, D]`` sorted by position (a static token sits at its centre's
    position in the segment's first frame; the official code emits a segment's static
    tokens before its dynamic ones, in cluster order); ``sizes`` count source tokens;
    ``groups`` the group of each output (a segment's static tokens, a frame's dynamic
    ones), which the in-LLM stage prunes one by one as the official code does.
    The question-guided pruning inside the LLM (scores at layer 10 of 32, alpha 0.4) is
    the in-LLM method ``prunevid-llm``, which ``tokensieve.apply`` runs after this one by
    default (``llm=None``: this stage alone).
    Differences: the official code segments every sample like the batch's first and needs
    equal static counts across the batch; here every sample is independent.
    """
    b, n_all, _ = tokens.shape
    t, h, w = frame_grid(signals, n_all, "prunevid")
    n = h * w
    seed = sample_seed(generator)
    parts, part_groups = [], []
    for i in range(b):
        x = tokens[i].view(t, n, -1)
        lengths = prunevid_segments(x.float().mean(dim=1), config.segment_ratio, config.knn,
                                    stream(seed, 0))
        groups: list[tuple[int, int, Tensor]] = []     # (first frame, frames, positions)
        start = 0
        for length in lengths:
            static = static_positions(x[start:start + length], config.tau)
            if length > 1:
                groups.append((start, length, torch.nonzero(static).flatten()))
            dyn = torch.nonzero(~static).flatten()
            groups.extend((f, 1, dyn) for f in range(start, start + length))
            start += length
        sizes = [g[2].numel() for g in groups]
        counts = apportion(sizes, k, [FLOOR] * len(groups),
                           whole=[s <= config.min_cluster for s in sizes])
        out_tok, out_pos, out_size, out_group = [], [], [], []
        for g, ((f, frames, pos), c) in enumerate(zip(groups, counts, strict=True)):
            if c == 0:
                continue
            group = x[f:f + frames, pos].float().mean(dim=0)
            if c == pos.numel():
                out_tok.append(group)
                out_pos.append(pos + f * n)
                out_size.append(torch.full_like(pos, frames))
            else:
                r = dpc_knn(group[None], c, knn=min(config.knn, pos.numel()),
                            generator=stream(seed, g + 1))
                out_tok.append(r.tokens[0])
                out_pos.append(pos[r.centres[0]] + f * n)
                out_size.append(r.sizes[0] * frames)
            out_group.append(torch.full_like(out_pos[-1], g))
        parts.append((torch.cat(out_tok), torch.cat(out_pos), torch.cat(out_size)))
        part_groups.append(torch.cat(out_group))
    return pack(parts, k, tokens.dtype, groups=part_groups)
