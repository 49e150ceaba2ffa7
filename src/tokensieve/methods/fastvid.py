"""FastVID: dynamic temporal segmentation, then density-based spatiotemporal pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from tokensieve.core.ops import normalize, topk_indices
from tokensieve.core.options import PositiveCount, Range, Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals, frame_grid
from tokensieve.methods._dpc import density_peaks, peak_centres
from tokensieve.methods._temporal import lengths_from_cuts, pack, sample_seed, stream

#: Neighbours (the token itself included) of the official density estimate.
DENSITY_KNN = 4


@dataclass(frozen=True)
class FastVIDConfig:
    """FastVID options (official LLaVA-OneVision / LLaVA-Video defaults).

    Attributes:
        segments: ``c``: the ``c - 1`` lowest consecutive-frame similarities always cut
            (DySeg_c, 8).
        tau: every consecutive-frame similarity below ``tau`` cuts too (DySeg_tau, 0.9;
            the official Qwen2.5-VL script uses 0.84).
        context_share: ``d``: the share of each frame's retained tokens spent on anchor
            (context) tokens (STPrune_d, 0.4).
        anchor_stride: ``p``: every ``p``-th frame of a segment, counted from its last
            frame, is an anchor frame (DTM_p, 4).
        beta: lower bound of the anchor token's own weight in its merge (DTM_beta, 0.6).
        score: the saliency signal: "attn_received" (the attention each token receives in
            the vision tower's last layer, what the official Qwen2.5-VL code uses and what
            the adapters give for every model) or "cls_attn" (the attention of a CLS /
            pooling-probe query, the official LLaVA-OneVision code's SigLIP head probe).
    """

    segments: PositiveCount = 8
    tau: Annotated[float, Range(-1.0, 1.0)] = 0.9
    context_share: Share = 0.4
    anchor_stride: PositiveCount = 4
    beta: Share = 0.6
    score: Literal["attn_received", "cls_attn"] = "attn_received"

    def required_signals(self) -> tuple[str, ...]:
        return ("frames", self.score)


def fastvid_segments(globals_: Tensor, segments: int, tau: float) -> list[int]:
    """DySeg: segment lengths from the frames' global vectors ``[T, D]``: cut after frame
    ``i`` when ``cos(g_i, g_{i+1})`` is among the ``segments - 1`` lowest (ties: the
    earlier) or below ``tau``."""
    t = globals_.shape[0]
    if t == 1:
        return [1]
    unit = normalize(globals_)
    sim = (unit[:-1] * unit[1:]).sum(dim=-1)
    lowest = torch.sort(sim, stable=True).indices[:min(segments - 1, t - 1)].tolist()
    below = torch.nonzero(sim < tau).flatten().tolist()
    return lengths_from_cuts(lowest + below, t)


def fastvid_budget(keep: int, frames: int, per_frame: int, lengths: list[int],
                   context_share: float, stride: int) -> tuple[list[int], list[int]]:
    """Salient and anchor (context) counts per frame for a clip budget ``keep``.

    Every frame gets ``R_f`` of ``keep`` (``keep // T``, the first ``keep % T`` frames one
    more), of which ``C_f = int(R_f * d)`` context and ``R_f - C_f`` salient tokens (the
    official ``R = int(n * ratio)`` per frame). A segment's context tokens ``sum C_f`` go to
    its anchor frames (its last frame and every ``p``-th one before it), evenly; the
    official code floors that split and loses the remainder, here the anchors from the
    segment's end get one more each. An anchor holds at most its frame's non-salient
    tokens; any excess goes to the segment's other frames from its end (they become
    anchors too).
    """
    share = [keep // frames + (f < keep % frames) for f in range(frames)]
    context = [int(r * context_share) for r in share]
    salient = [r - c for r, c in zip(share, context, strict=True)]
    anchors = [0] * frames
    start = 0
    for length in lengths:
        seg = range(start, start + length)
        total = sum(context[f] for f in seg)
        ends = [f for f in seg if (start + length - 1 - f) % stride == 0][::-1]  # last first
        base, extra = divmod(total, len(ends))
        left = 0
        for j, f in enumerate(ends):
            want = base + (j < extra)
            anchors[f] = min(want, per_frame - salient[f])
            left += want - anchors[f]
        for f in reversed(seg):
            room = per_frame - salient[f] - anchors[f]
            moved = min(room, left)
            anchors[f] += moved
            left -= moved
        start += length
    return salient, anchors


def _anchor_merge(targets: Tensor, members: Tensor, unit: Tensor, beta: float,
                  ) -> tuple[Tensor, Tensor]:
    """DTM: every member joins its most cosine-similar target (ties: the first); a target
    becomes ``w * target + (1 - w) * mean(members)`` with ``w = max(1 / (count + 1), beta)``
    (the target itself is normally one of its members). ``members`` are float32, ``unit``
    their L2-normalised rows (computed once per segment: every anchor frame of the segment
    merges the same members). Returns tokens (float32) and member counts."""
    choice = (unit @ normalize(targets).T).argmax(dim=1)
    onehot = torch.nn.functional.one_hot(choice, targets.shape[0]).float()
    count = onehot.sum(dim=0)
    mean = (onehot.T @ members) / count.clamp(min=1).unsqueeze(-1)
    weight = (1.0 / (count + 1)).clamp(min=beta).unsqueeze(-1)
    return weight * targets.float() + (1 - weight) * mean, count.long()


@register(
    "fastvid",
    paper="FastVID: Dynamic Density Pruning for Fast Video Large Language Models "
          "(Shen et al., NeurIPS 2025)",
    stage="pre-llm", kind="subset+merge", signals=("frames", "attn_received"),
    optional_signals=("grid", "cls_attn"), config=FastVIDConfig,
)
def fastvid(tokens: Tensor, k: int, signals: Signals, config: FastVIDConfig,
            generator: torch.Generator | None) -> Reduction:
    """FastVID on a clip ``tokens`` ``[B, T*n, D]`` (frame-major projected tokens).

    1. DySeg: each frame's global vector is the mean of its tokens (the official
       Qwen2.5-VL code; the LLaVA-OneVision code takes SigLIP's pooling-head output, which
       is no signal here); cuts by :func:`fastvid_segments`.
    2. Budget: :func:`fastvid_budget` (``keep = T * int(n * 0.10)`` is the official 10 %
       retention; then the counts are the official ones wherever a segment's context
       tokens split evenly over its anchor frames, as they do for segments of at most
       ``p`` frames).
    3. ATS: each frame keeps its top salient tokens by ``score`` unchanged (ties: the
       lower index).
    4. Density: in each frame, the non-salient tokens get the DPC-kNN centre score
       ``delta * rho`` (``knn = 4``, distances ``/ sqrt(D)``, density noise ``1e-6``);
       an anchor frame's anchor tokens are its top-scoring ones (ties: the denser).
    5. DTM: all non-salient tokens of the segment join the anchor tokens of each of its
       anchor frames by cosine (:func:`_anchor_merge`). As in the official code, a
       segment with several anchor frames merges each of its tokens once per anchor
       frame, so ``sizes`` (members per output) then add up to more than ``N``.

    Output: ``[B, keep, D]`` in source order of their positions (an anchor token's position
    is its own); ``indices`` the salient tokens (``sum`` of the salient counts, the same for
    every clip of a batch). ``assignment`` is not tracked (tokens may join several anchors).
    """
    b, n_all, _ = tokens.shape
    t, h, w = frame_grid(signals, n_all, "fastvid")
    n = h * w
    score = signals.layer(config.score, "fastvid").float().view(b, t, n)
    seed = sample_seed(generator)
    parts, salient_idx = [], []
    for i in range(b):
        x = tokens[i].view(t, n, -1)
        lengths = fastvid_segments(x.float().mean(dim=1), config.segments, config.tau)
        salient, anchors = fastvid_budget(k, t, n, lengths, config.context_share,
                                          config.anchor_stride)
        out_tok, out_pos, out_size, kept = [], [], [], []
        rest: list[Tensor] = []            # non-salient frame positions of each frame
        for f in range(t):
            top = topk_indices(score[i, f:f + 1], salient[f])[0]
            is_top = torch.zeros(n, dtype=torch.bool, device=tokens.device)
            is_top[top] = True
            rest.append(torch.nonzero(~is_top).flatten())
            kept.append(top + f * n)
        start = 0
        for length in lengths:
            seg = range(start, start + length)
            members = torch.cat([x[f, rest[f]] for f in seg]).float()
            unit = normalize(members)
            for f in seg:
                if anchors[f] == 0:
                    continue
                own = x[f, rest[f]]
                # torch.cdist's default, as the official code calls it (one matrix product
                # above 25 tokens)
                peaks = density_peaks(own[None], min(DENSITY_KNN, own.shape[0]),
                                      generator=stream(seed, f),
                                      compute_mode="use_mm_for_euclid_dist_if_necessary")
                pick = peak_centres(peaks, anchors[f])[0]
                merged, count = _anchor_merge(own[pick], members, unit, config.beta)
                out_tok.append(merged)
                out_pos.append(rest[f][pick] + f * n)
                out_size.append(count.clamp(min=1))
            start += length
        kept_all = torch.cat(kept)
        out_tok.append(tokens[i, kept_all].float())
        out_pos.append(kept_all)
        out_size.append(torch.ones_like(kept_all))
        parts.append((torch.cat(out_tok), torch.cat(out_pos), torch.cat(out_size)))
        salient_idx.append(torch.sort(kept_all).values)
    # The salient counts depend on keep and T only: the same for every sample.
    return pack(parts, k, tokens.dtype, indices=torch.stack(salient_idx))
