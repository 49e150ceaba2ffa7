"""HoliTom (outer, pre-LLM part): DP temporal windows, static tokens averaged and clustered,
dynamic tokens kept by attention (plus optional DPC-kNN contextual merges)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from tokensieve.core.ops import topk_indices
from tokensieve.core.options import PositiveCount, Range, Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals, frame_grid
from tokensieve.methods._dpc import dpc_knn
from tokensieve.methods._temporal import (
    CEIL,
    ROUND,
    apportion,
    consecutive_cosine,
    pack,
    sample_seed,
    stream,
)


@dataclass(frozen=True)
class HoliTomConfig:
    """HoliTom options (official defaults of ``holitom/llava_arch.py``).

    Attributes:
        tau: a position is static over a window when every consecutive-frame cosine in it
            is above ``tau`` (T, 0.8; the official 10 % scripts use 0.65).
        max_window: the longest window the DP considers (MAX_WINDOW_SIZE, 1024).
        contextual_share: ``D``: the share of a frame's dynamic budget merged into DPC-kNN
            contextual tokens instead of kept by attention (D, 0: attention only).
        knn: ``K``: DPC-kNN density neighbours, at most the cluster count (K, 7).
    """

    tau: Annotated[float, Range(-1.0, 1.0)] = 0.8
    max_window: PositiveCount = 1024
    contextual_share: Share = 0.0
    knn: PositiveCount = 7


def holitom_windows(sim: Tensor, tau: float, max_window: int) -> list[tuple[int, int]]:
    """The official DP over frames: windows ``(start, end)`` (inclusive) that maximise the
    tokens saved, ``(W - 1) * #static positions`` per window of ``W`` frames (a position is
    static when all its consecutive cosines ``sim`` ``[T - 1, n]`` in the window exceed
    ``tau``). Ties keep the shorter last window (single frames first)."""
    t = sim.shape[0] + 1
    above = (sim > tau).cpu()
    saved = [[0] * t for _ in range(t)]
    for s in range(t):
        run = torch.ones(above.shape[1], dtype=torch.bool)
        for e in range(s + 1, t):
            run &= above[e - 1]
            saved[s][e] = (e - s) * int(run.sum())
    best = [0] * t
    start = [0] * t
    for i in range(t):
        best[i], start[i] = (best[i - 1] if i else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (best[j] if j >= 0 else 0) + saved[j + 1][i]
            if value > best[i]:
                best[i], start[i] = value, j + 1
    windows = []
    i = t - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1]


@register(
    "holitom",
    paper="HoliTom: Holistic Token Merging for Fast Video Large Language Models "
          "(Shao et al., NeurIPS 2025)",
    stage="pre-llm", kind="merge", signals=("frames", "attn_received"),
    optional_signals=("grid",), config=HoliTomConfig, llm_stage="holitom-llm",
)
def holitom(tokens: Tensor, k: int, signals: Signals, config: HoliTomConfig,
            generator: torch.Generator | None) -> Reduction:
    """HoliTom's outer (pre-LLM) merge of a clip ``tokens`` ``[B, T*n, D]`` (frame-major
    pooled projected tokens; ``attn_received`` ``[B, T*n]`` is the attention each token
    receives in the vision tower's last layer, head- and query-mean, pooled like the
    tokens, which is what the official code reads from SigLIP).

    1. Windows: :func:`holitom_windows` on the per-position cosine of consecutive frames.
    2. In a window of ``W >= 2`` frames the positions static over all of it are averaged
       over its frames (one token each, placed at the window's first frame); every other
       position is dynamic in each of its frames. A single frame is all dynamic.
    3. Budget: the official code retains ``ratio' = min(ratio * N / (N - saved), 1)`` of
       every group: ``round(ratio' * S)`` clusters of a window's ``S`` static tokens and
       ``ceil(ratio' * n_dyn)`` of each frame's dynamic ones. Here the groups share
       ``keep`` by :func:`~tokensieve.methods._temporal.apportion` with those roundings:
       the official counts whenever they add up to ``keep`` (``keep = ratio * N`` when the
       rounding adds nothing), and never more than ``N - saved`` tokens (fewer than
       ``keep`` then; ``mask`` marks the real ones).
    4. Static tokens: DPC-kNN (``knn = min(K, clusters)``) on the averages, each cluster
       the mean of its members (the official default ``NO_BETA=1``).
    5. Dynamic tokens of a frame with budget ``c``: the ``round(c * (1 - D))`` with the
       highest ``attn_received`` kept unchanged, the rest DPC-kNN merged into ``c - that``
       contextual tokens (none by default, ``D = 0``).

    Output: ``[B, keep, D]`` sorted by position (static and contextual tokens at their
    cluster centre, as the official grid layout places them); ``indices`` is ``None``
    (the dominant tokens are unchanged but their number depends on the clip; ``sizes`` 1).
    Left out: the official ``BETA`` merge variant and the image newline tokens (the
    adapter keeps the model's own). The inner-LLM merge is the in-LLM method
    ``holitom-llm``, which ``tokensieve.apply`` runs after this one by default
    (``llm=None``: this stage alone).
    """
    b, n_all, _ = tokens.shape
    t, h, w = frame_grid(signals, n_all, "holitom")
    n = h * w
    attn = signals.layer("attn_received", "holitom").float().view(b, t, n)
    seed = sample_seed(generator)
    parts = []
    for i in range(b):
        x = tokens[i].view(t, n, -1)
        sim = consecutive_cosine(x)
        windows = holitom_windows(sim, config.tau, config.max_window)
        groups: list[tuple[str, int, Tensor]] = []     # (kind, frame, frame positions)
        sizes, offsets = [], []
        for s, e in windows:
            static = torch.zeros(n, dtype=torch.bool, device=tokens.device)
            if e > s:
                static = (sim[s:e] > config.tau).all(dim=0)
                groups.append(("static", s, torch.nonzero(static).flatten()))
                sizes.append(int(static.sum()))
                offsets.append(ROUND)
            dyn = torch.nonzero(~static).flatten()
            for f in range(s, e + 1):
                groups.append(("dynamic", f, dyn))
                sizes.append(dyn.numel())
                offsets.append(CEIL)
        counts = apportion(sizes, k, offsets)
        out_tok, out_pos, out_size = [], [], []
        window_of = {s: e for s, e in windows}
        for g, ((kind, f, pos), c) in enumerate(zip(groups, counts, strict=True)):
            if c == 0:
                continue
            if kind == "static":
                avg = x[f:window_of[f] + 1, pos].float().mean(dim=0)
                tok, centre, size = _cluster(avg, c, config.knn, stream(seed, g))
                out_tok.append(tok)
                out_pos.append(pos[centre] + f * n)
                out_size.append(size * (window_of[f] - f + 1))   # source tokens: W each
                continue
            dom = round(c * (1 - config.contextual_share))
            top = topk_indices(attn[i, f, pos][None], dom)[0]
            out_tok.append(x[f, pos[top]].float())
            out_pos.append(pos[top] + f * n)
            out_size.append(torch.ones_like(top))
            if c > dom:
                rest = torch.ones(pos.numel(), dtype=torch.bool, device=tokens.device)
                rest[top] = False
                others = pos[rest]
                tok, centre, size = _cluster(x[f, others].float(), c - dom, config.knn,
                                             stream(seed, g))
                out_tok.append(tok)
                out_pos.append(others[centre] + f * n)
                out_size.append(size)
        parts.append((torch.cat(out_tok), torch.cat(out_pos), torch.cat(out_size)))
    return pack(parts, k, tokens.dtype)


def _cluster(x: Tensor, clusters: int, knn: int,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """DPC-kNN of ``x`` ``[S, D]`` into ``clusters`` member means (knn ``min(K, clusters)``
    as in the official code): tokens, centre rows, sizes."""
    r = dpc_knn(x[None], clusters, knn=min(knn, clusters), generator=generator)
    return r.tokens[0], r.centres[0], r.sizes[0]
