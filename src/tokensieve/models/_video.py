"""Video inputs: the videos of a call reduced per video (the family-agnostic part).

A family encodes each video of a call into a :class:`Clip`: the tokens its LLM would
receive, frame-major (``T`` frames of ``H x W`` tokens), with their signals and any tokens
the family always appends (LLaVA-OneVision's newline). This module runs the configured
method on the clips and merges the videos' and images' placeholder runs into one list of
items in prompt order, so that one sequence surgery cuts both.

How a method sees a video (``tokensieve.apply(..., video=...)``):

* a video method (one that needs the ``frames`` signal: EVS, DyCoke, ...) reduces each
  whole clip: tokens ``[1, T*H*W, D]`` with ``frames=T`` and the per-frame ``grid``;
  ``keep`` counts the clip's tokens (or is a fraction of them). Images are not reduced.
* an image method reduces each clip as one token set (``video="clip"``: tokens
  ``[1, T*H*W, D]`` with ``frames=T`` and no grid, so grid methods refuse it) or every frame
  on its own (``video="frame"``: ``[T, H*W, D]`` with the frame's grid; ``keep`` counts a
  frame's tokens). Default: videos are left whole.

Videos always give their LLM tokens (after the projector and any pooling) to the method,
whatever its ``features`` setting: the video paths of the supported families pool or merge
the projected tokens, so no per-token vision feature reaches the LLM unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tokensieve.core.reduction import Reduction

if TYPE_CHECKING:
    from tokensieve.core.registry import MethodSpec
    from tokensieve.models._base import Adapter, Encoded

#: ``apply(..., video=...)`` values.
VIDEO_MODES = ("clip", "frame")


@dataclass
class Clip:
    """One video as its family encodes it.

    Attributes:
        tokens: ``[T * H * W, D]`` the LLM's tokens of the video, frame-major.
        frames: ``T``.
        grid: ``(H, W)`` the token grid of one frame.
        signals: per-token signals aligned with ``tokens`` (``attn_received`` ``[T*H*W]``
            or ``[L, T*H*W]``, ``keys`` / ``values`` ``[T*H*W, Dk]``).
        tail: ``[E, D]`` tokens the family appends after the frames (always kept).
    """

    tokens: Tensor
    frames: int
    grid: tuple[int, int]
    signals: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    tail: Tensor | None = None

    @property
    def count(self) -> int:
        """Placeholder tokens of the video in the prompt."""
        return int(self.tokens.shape[0]) + (0 if self.tail is None else int(self.tail.shape[0]))


def is_video_method(spec: MethodSpec) -> bool:
    """Whether ``spec`` reduces whole clips (it needs the ``frames`` signal)."""
    return "frames" in spec.signals


def video_mode(spec: MethodSpec, video: str | None, family: str,
               family_has_video: bool) -> str | None:
    """The checked ``video`` setting of ``apply`` for method ``spec`` (None: videos whole)."""
    if video is not None and video not in VIDEO_MODES:
        raise ValueError(f"video={video!r}: expected None (videos left whole), 'clip' (each "
                         "video reduced as one token set) or 'frame' (each frame on its own)")
    if is_video_method(spec):
        if video == "frame":
            raise ValueError(f"video='frame': {spec.name!r} is a video method (it reduces "
                             "whole clips); 'frame' runs an image method on each frame")
        video = "clip"
    if video is None:
        return None
    if spec.stage != "pre-llm":
        raise ValueError(f"video={video!r}: videos are reduced by pre-LLM methods; "
                         f"{spec.name!r} acts at stage {spec.stage!r}")
    if not family_has_video:
        raise ValueError(f"video={video!r} (method {spec.name!r}): the {family} adapter "
                         "takes no video inputs (supported: LLaVA-OneVision, Qwen2-VL, "
                         "Qwen2.5-VL)")
    return video


def _frame_rows(name: str, value: Tensor, frames: int) -> Tensor:
    """Split a stacked clip signal into per-frame rows. ``attn_received`` / ``cls_attn``
    are ``[G, T*N]`` or ``[G, L, T*N]``; ``keys`` / ``values`` ``[G, T*N, C]``."""
    g = value.shape[0]
    if name in ("keys", "values"):
        return value.reshape(g * frames, -1, value.shape[-1])
    if value.dim() == 2:
        return value.reshape(g * frames, -1)
    layers = value.shape[1]
    return value.reshape(g, layers, frames, -1).transpose(1, 2).reshape(g * frames, layers, -1)


def _join(parts: list[Reduction], offsets: list[int]) -> Reduction:
    """One reduction of a clip from its frames' reductions (positions shifted to the clip)."""

    def cat(name: str, shift: bool) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None
        return torch.cat([v + (o if shift else 0) for v, o in zip(values, offsets, strict=True)],
                         dim=1)

    assignment = None
    if all(p.assignment is not None for p in parts):
        slots = [0]
        for p in parts:
            slots.append(slots[-1] + p.num_tokens)
        assignment = torch.cat([torch.where(p.assignment >= 0, p.assignment + s, -1)
                                for p, s in zip(parts, slots, strict=False)], dim=1)
    groups = None
    if all(p.groups is not None for p in parts):     # each frame's groups kept apart
        shifted, base = [], 0
        for p in parts:
            g = p.groups
            shifted.append(torch.where(g >= 0, g + base, -1))  # type: ignore[operator]
            base += int(g.max()) + 1 if g.numel() else 0       # type: ignore[union-attr]
        groups = torch.cat(shifted, dim=1)
    return Reduction(tokens=torch.cat([p.tokens for p in parts], dim=1),
                     indices=cat("indices", True), positions=cat("positions", True),
                     sizes=cat("sizes", False), assignment=assignment, groups=groups)


def _real(r: Reduction, i: int) -> Reduction:
    """Row ``i`` of a batched reduction, its padding (adaptive counts) dropped."""
    keep = slice(None) if r.mask is None else r.mask[i]

    def row(t: Tensor | None, masked: bool = True) -> Tensor | None:
        if t is None:
            return None
        return t[i][keep][None] if masked else t[i][None]

    indices = row(r.indices, masked=r.indices is not None and r.mask is not None and
                  r.indices.shape[1] == r.tokens.shape[1])
    return Reduction(tokens=row(r.tokens), indices=indices, positions=row(r.positions),
                     sizes=row(r.sizes), assignment=row(r.assignment, masked=False),
                     groups=row(r.groups))


def reduce_clips(adapter: Adapter, clips: list[Clip], mode: str,
                 text: tuple[Tensor, Tensor] | None = None) -> Encoded:
    """Run the adapter's method on every clip (``mode`` "clip" or "frame"). Returns the
    videos as items: features (kept tokens then the tail), placeholder counts, one
    ``(Reduction, grid)`` per video over its ``T*H*W`` tokens, and each output token's
    source rank in the video's placeholder run (the tail after the frames)."""
    from tokensieve.models._base import Encoded

    video = is_video_method(adapter.spec)
    out = [None] * len(clips)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(clips):
        groups.setdefault((tuple(c.tokens.shape), c.frames, c.grid), []).append(i)
    for (_shape, t, grid), members in groups.items():
        tokens = torch.stack([clips[i].tokens for i in members])  # [G, T*N, D]
        n = tokens.shape[1] // t
        signals: dict[str, Any] = {name: torch.stack([clips[i].signals[name] for i in members])
                                   for name in clips[members[0]].signals}
        if text is not None:
            signals["text"], signals["text_mask"] = text[0][members], text[1][members]
        if mode == "clip":
            signals["frames"] = t
            signals["grid"] = grid if video else None
            r = adapter.run_method(tokens, adapter.resolve_keep(n * t), signals, has_cls=False)
            per = [_real(r, j) for j in range(len(members))]
        else:
            rows = {name: _frame_rows(name, v, t) if name not in ("text", "text_mask")
                    else v.repeat_interleave(t, dim=0) for name, v in signals.items()}
            rows["grid"] = grid
            r = adapter.run_method(tokens.reshape(len(members) * t, n, -1),
                                   adapter.resolve_keep(n), rows, has_cls=False)
            per = [_join([_real(r, j * t + f) for f in range(t)], [f * n for f in range(t)])
                   for j in range(len(members))]
        for j, i in enumerate(members):
            out[i] = (per[j], grid)
    features, positions, reductions = [], [], []
    for clip, (r, grid) in zip(clips, out, strict=True):  # type: ignore[misc]
        feats = r.tokens[0].to(clip.tokens.dtype)
        pos = r.positions
        if clip.tail is not None:
            feats = torch.cat([feats, clip.tail.to(feats.dtype)])
            if pos is not None:
                extra = torch.arange(clip.tail.shape[0], device=pos.device) + clip.tokens.shape[0]
                pos = torch.cat([pos, extra[None]], dim=1)
        features.append(feats)
        positions.append(None if pos is None else pos[0])
        reductions.append((r, grid))
    if adapter.needs_positions and any(p is None for p in positions):
        raise ValueError(f"method {adapter.spec.name!r} gives no source positions for its "
                         f"tokens; the {adapter.family} adapter needs them for M-RoPE")
    return Encoded(features=features, counts=[c.count for c in clips], reductions=reductions,
                   positions=None if any(p is None for p in positions) else positions)


def whole(features: list[Tensor]) -> Encoded:
    """Items left whole (e.g. the images of a call whose method reduces videos)."""
    from tokensieve.models._base import Encoded

    reductions = []
    for f in features:
        idx = torch.arange(f.shape[0], device=f.device)[None]
        reductions.append((Reduction(tokens=f[None], indices=idx), None))
    return Encoded(features=list(features), counts=[int(f.shape[0]) for f in features],
                   reductions=reductions,
                   positions=[torch.arange(f.shape[0], device=f.device) for f in features])


def first_columns(mask: Tensor, counts: list[int]) -> Tensor:
    """``[I]`` flat index (over ``[B, T]``) of the first placeholder of each item's run."""
    cols = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    sizes = torch.tensor(counts, dtype=torch.long, device=cols.device)
    return cols[sizes.cumsum(0) - sizes]


def merge_items(image_mask: Tensor, images: Encoded, video_mask: Tensor, videos: Encoded,
                ) -> tuple[Tensor, Encoded, list[str]]:
    """The images and videos of a call as one list of items in prompt order: the union
    placeholder mask, the merged :class:`Encoded` and each item's kind ("image"/"video")."""
    from tokensieve.models._base import Encoded

    if int(image_mask.sum()) != sum(images.counts) or \
            int(video_mask.sum()) != sum(videos.counts):
        raise ValueError(
            f"the prompts hold {int(image_mask.sum())} image and {int(video_mask.sum())} video "
            f"placeholder tokens, but the images give {sum(images.counts)} and the videos "
            f"{sum(videos.counts)} tokens; expected them to match")
    starts = (first_columns(image_mask, images.counts).tolist()
              + first_columns(video_mask, videos.counts).tolist())
    kinds_all = ["image"] * len(images.counts) + ["video"] * len(videos.counts)
    order = sorted(range(len(starts)), key=starts.__getitem__)

    def pick(name: str) -> list[Any] | None:
        a, b = getattr(images, name), getattr(videos, name)
        if a is None or b is None:
            return None
        both = list(a) + list(b)
        return [both[i] for i in order]

    merged = Encoded(features=pick("features"), counts=pick("counts"),  # type: ignore[arg-type]
                     reductions=pick("reductions"), positions=pick("positions"),  # type: ignore[arg-type]
                     extra={**images.extra, **videos.extra})
    return image_mask | video_mask, merged, [kinds_all[i] for i in order]
