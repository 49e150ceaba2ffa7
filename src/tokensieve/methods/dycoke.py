"""DyCoke stage 1 (temporal token merging, TTM): in windows of 4 frames, drop the tokens of
the other frames that are most similar to the same position of their reference frame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from tokensieve.core.ops import gather_tokens, normalize, topk_indices
from tokensieve.core.options import Range
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals

#: The official ``dycoke_k`` (lmms-eval default and README): the share of a pruned frame's
#: tokens removed; each pruned frame keeps ``int((1 - 0.7) * P)`` tokens.
OFFICIAL_PRUNE_RATIO = 0.7

#: A frame's role: ``None`` kept whole, ``-1`` dropped, or ``(a, b)``: pruned by the
#: similarity map ``cos(frame a, frame b)`` (per position), keeping its least similar tokens.
Role = tuple[int, int] | int | None


@dataclass(frozen=True)
class DyCokeConfig:
    """DyCoke TTM options (defaults: the official code's behaviour).

    Attributes:
        prune_ratio: the official ``dycoke_k``: the share of each pruned frame's ``P``
            tokens removed (official default 0.7: a pruned frame keeps
            ``int((1 - 0.7) * P)``, 58 of 196). ``None`` (default): ``keep`` decides, see
            :func:`dycoke`. Given: the official per-frame count, and ``keep`` only caps the
            total (``keep=1.0``: no cap); a cap below it raises ``ValueError``.
        pair_scores: how an odd frame ``2j+1`` is scored. "shifted" (official quirk: the
            code indexes the pair similarities with ``(i - 2) // 2``, so frame ``2j+1`` keeps
            the tokens chosen by the similarity map of the *previous* pair ``(2j-2, 2j-1)``,
            and frame 1 by the last pair's) or "own" (corrected: its own map against frame
            ``2j``).
        last_window: "skip" (official quirk: the second stage loops over
            ``range(0, T - 4, 4)``, so the last window's frame ``i+2`` is kept whole, and
            clips of at most 4 frames get no second stage) or "prune" (corrected: every
            window ``i`` with a frame ``i + 2`` prunes it against frame ``i``).
        odd_last_frame: with an odd number of frames, the last frame belongs to no pair.
            "drop" (official quirk: the code never appends it, so it is removed whole) or
            "keep" (corrected: kept, and pruned against frame ``i`` when it is the ``i + 2``
            frame of a window the second stage visits).
    """

    prune_ratio: Annotated[float, Range(0.0, 1.0)] | None = None
    pair_scores: Literal["shifted", "own"] = "shifted"
    last_window: Literal["skip", "prune"] = "skip"
    odd_last_frame: Literal["drop", "keep"] = "drop"


def dycoke_roles(frames: int, config: DyCokeConfig) -> list[Role]:
    """The role of each of ``frames`` frames in DyCoke's TTM (see :data:`Role`).

    Stage 1 (pairs ``(2j, 2j+1)`` for ``2j + 1 < T``): frame ``2j`` whole, frame ``2j+1``
    pruned (by its own pair's map, or the previous pair's under ``pair_scores="shifted"``).
    Stage 2 (windows ``i = 0, 4, 8, ...`` below ``T - 4``, or ``T - 2`` with
    ``last_window="prune"``): frame ``i + 2`` pruned against frame ``i``.
    """
    roles: list[Role] = [None] * frames
    pairs = frames // 2
    for j in range(pairs):
        if config.pair_scores == "shifted":
            p = (j - 1) % pairs  # Python's index -1 for the first pair: the last pair
            roles[2 * j + 1] = (2 * p, 2 * p + 1)
        else:
            roles[2 * j + 1] = (2 * j, 2 * j + 1)
    stop = frames - 4 if config.last_window == "skip" else frames - 2
    for i in range(0, max(stop, 0), 4):
        roles[i + 2] = (i, i + 2)
    if frames % 2 and frames > 1 and config.odd_last_frame == "drop":
        roles[-1] = -1  # a single frame is no pair's leftover: it stays
    return roles


def _frame_counts(roles: list[Role], per: int, k: int, config: DyCokeConfig) -> list[int]:
    """Tokens kept per frame: ``per`` for whole frames, 0 for dropped, and the pruned
    frames' share (the official ``int((1 - K) * P)`` with ``prune_ratio``, else the solved
    share of ``keep``, the remainder one each to the earliest pruned frames)."""
    whole = sum(r is None for r in roles)
    pruned = [f for f, r in enumerate(roles) if isinstance(r, tuple)]
    floor = whole * per
    counts = [per if r is None else 0 for r in roles]
    if config.prune_ratio is not None:
        m = int((1 - config.prune_ratio) * per)
        if floor + m * len(pruned) > k:
            raise ValueError(f"dycoke: keep={k} is below the {floor + m * len(pruned)} tokens "
                             f"prune_ratio={config.prune_ratio} keeps; expected keep >= "
                             f"{floor + m * len(pruned)} (keep=1.0: no cap)")
        for f in pruned:
            counts[f] = m
        return counts
    if k < floor:
        raise ValueError(f"dycoke: keep={k} is below the {floor} tokens of the {whole} "
                         f"frame(s) DyCoke keeps whole ({len(roles)} frames of {per}); "
                         f"expected keep >= {floor}")
    if pruned:
        room = min(k, (whole + len(pruned)) * per) - floor
        base, extra = divmod(room, len(pruned))
        for rank, f in enumerate(pruned):
            counts[f] = base + (rank < extra)
    return counts


@register(
    "dycoke",
    paper="DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models "
          "(Tao et al., CVPR 2025), stage 1 (temporal token merging)",
    stage="pre-llm", kind="subset", signals=("frames",), config=DyCokeConfig,
    llm_stage="dycoke-llm",
)
def dycoke(tokens: Tensor, k: int, signals: Signals, config: DyCokeConfig,
           generator: torch.Generator | None) -> Reduction:
    """DyCoke's temporal token merging on a clip ``tokens`` ``[B, T*P, D]`` (frame-major).

    Official TTM (``dycole_ttm`` in KD-TAO/DyCoke ``llava/model/llava_arch.py``, run on
    LLaVA-OneVision's pooled frame tokens): in every pair of frames ``(2j, 2j+1)`` the
    second frame keeps the tokens least similar (cosine, same position) to the first;
    then in every window of 4 frames ``(i .. i+3)`` frame ``i+2`` keeps the tokens least
    similar to frame ``i``. Frames ``0, 4, 8, ...`` (and the others the official loops
    skip: see :class:`DyCokeConfig`) stay whole. Despite the name, nothing is averaged:
    the similar tokens are dropped.

    Budget: ``keep`` is the total for the clip. Without ``prune_ratio`` the per-frame count
    of the pruned frames is solved from it: ``floor((keep - W P) / F)`` each (``W`` whole
    frames, ``F`` pruned frames), one more for the first ``(keep - W P) mod F`` pruned
    frames, so exactly ``keep`` tokens stay (at most all of the pruned frames: with an odd
    ``T`` under ``odd_last_frame="drop"`` that is ``N - P``). A ``keep`` below ``W P``
    raises ``ValueError``. With ``prune_ratio`` (official: 0.7) each pruned frame keeps
    ``int((1 - prune_ratio) P)`` as in the official code.

    Differences from the official code: kept tokens come in original order (the official
    code appends a pruned frame's tokens in ascending-similarity order); ties keep the lower
    index; similarities in float32; clips of 1 to 4 frames work (the official code fails
    to ``torch.stack`` an empty list there); batches (each sample on its own). Out of
    scope: DyCoke's stage 2, the dynamic KV-cache pruning during decoding (attention at
    layer ``L = 3``, keep ``P = 0.8`` of the visual KV entries per step), which is not a
    token-set reduction.

    Returns a subset :class:`Reduction` (``indices`` ascending, ``positions`` = ``indices``).
    """
    t = signals.require("frames", "dycoke")
    assert isinstance(t, int)
    b, n, d = tokens.shape
    per = n // t
    roles = dycoke_roles(t, config)
    counts = _frame_counts(roles, per, k, config)
    unit = normalize(tokens).view(b, t, per, d)
    parts = []
    for f, (role, m) in enumerate(zip(roles, counts, strict=True)):
        if role is None:
            parts.append(torch.arange(f * per, (f + 1) * per, device=tokens.device).expand(b, -1))
        elif isinstance(role, tuple) and m > 0:
            sim = (unit[:, role[0]] * unit[:, role[1]]).sum(dim=-1)
            parts.append(topk_indices(-sim, m) + f * per)
    indices = torch.cat(parts, dim=1)
    return Reduction(tokens=gather_tokens(tokens, indices), indices=indices)
