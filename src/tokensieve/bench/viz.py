"""Picture of one reduction: the image as the model sees it, kept tokens outlined in white,
dropped tokens dimmed, merged groups tinted and outlined (one colour per group)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

from tokensieve.core.reduction import Reduction

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402


@dataclass(frozen=True)
class TokenMap:
    """Per-patch roles of one image's reduction on an ``H x W`` grid.

    Attributes:
        kept: ``[H, W]`` bool, the patch survives unchanged (a kept subset token).
        group: ``[H, W]`` long, the merged output slot the patch went into, ``-1`` if it is
            not part of a merged group (kept alone or dropped).
        centres: ``(row, col)`` of the representative position of every merged group.
    """

    kept: np.ndarray
    group: np.ndarray
    centres: list[tuple[int, int]]

    @property
    def dropped(self) -> np.ndarray:
        return ~self.kept & (self.group < 0)


def token_map(r: Reduction, grid: tuple[int, int], offset: int = 0) -> TokenMap:
    """Roles of the ``H * W`` patches of one image (batch row 0 of ``r``).

    ``offset`` is the number of leading non-patch tokens (a CLS token) in the reduction's
    source positions. A merged group is an output slot that stands for more than one source
    token (``assignment`` and ``sizes``); a subset token is kept.
    """
    h, w = grid
    n = h * w
    kept = np.zeros(n, dtype=bool)
    group = np.full(n, -1, dtype=np.int64)
    centres: list[tuple[int, int]] = []
    if r.assignment is None and r.indices is None:
        raise ValueError("this reduction records neither kept indices nor an assignment of "
                         "source tokens to outputs; nothing to draw")
    if r.assignment is not None:
        assign = r.assignment[0].detach().cpu().long().numpy()
        if assign.shape[0] != n + offset:
            raise ValueError(f"assignment covers {assign.shape[0]} tokens; expected "
                             f"{n + offset} for a {h}x{w} grid with {offset} leading token(s)")
        assign = assign[offset:]
        counts = np.bincount(assign[assign >= 0], minlength=r.num_tokens)
        merged_slots = np.nonzero(counts > 1)[0]
        in_merged = np.isin(assign, merged_slots)
        group[in_merged] = assign[in_merged]
        kept[(assign >= 0) & ~in_merged] = True
        positions = r.positions[0].detach().cpu().long().numpy() if r.positions is not None \
            else None
        for slot in merged_slots:
            if positions is not None and 0 <= positions[slot] - offset < n:
                p = int(positions[slot]) - offset
            else:
                members = np.nonzero(assign == slot)[0]
                p = int(members[len(members) // 2])
            centres.append((p // w, p % w))
    if r.indices is not None:
        idx = r.indices[0].detach().cpu().long().numpy() - offset
        idx = idx[(idx >= 0) & (idx < n)]
        kept[idx] = True
        group[idx] = -1
    return TokenMap(kept=kept.reshape(h, w), group=group.reshape(h, w), centres=centres)


def _group_edges(group: np.ndarray) -> dict[int, list[tuple[tuple[float, float],
                                                          tuple[float, float]]]]:
    """Boundary segments (in patch units, x right, y down) of every merged group."""
    h, w = group.shape
    edges: dict[int, list] = {}
    padded = np.full((h + 2, w + 2), -1, dtype=np.int64)
    padded[1:-1, 1:-1] = group
    for i in range(h):
        for j in range(w):
            g = group[i, j]
            if g < 0:
                continue
            seg = edges.setdefault(int(g), [])
            # cell (i, j) sits at (i + 1, j + 1) in ``padded``
            if padded[i + 1, j] != g:  # left
                seg.append(((j, i), (j, i + 1)))
            if padded[i + 1, j + 2] != g:  # right
                seg.append(((j + 1, i), (j + 1, i + 1)))
            if padded[i, j + 1] != g:  # above
                seg.append(((j, i), (j + 1, i)))
            if padded[i + 2, j + 1] != g:  # below
                seg.append(((j, i + 1), (j + 1, i + 1)))
    return edges


def _draw_panel(ax: Any, img: np.ndarray, tmap: TokenMap, title: str) -> None:
    """One token map on ``ax``: dropped dimmed, merged groups tinted and outlined, kept
    tokens outlined in white, group centres dotted."""
    h, w = tmap.kept.shape
    overlay = np.zeros((h, w, 4), dtype=np.float32)
    overlay[tmap.dropped] = (0.0, 0.0, 0.0, 0.72)
    cmap = plt.get_cmap("tab20")
    groups = sorted({int(g) for g in np.unique(tmap.group) if g >= 0})
    colour = {g: cmap(i % 20) for i, g in enumerate(groups)}
    for g in groups:
        overlay[tmap.group == g] = (*colour[g][:3], 0.35)
    ax.imshow(img, extent=(0, w, h, 0), interpolation="bilinear")
    ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
    for g, segs in _group_edges(tmap.group).items():
        ax.add_collection(LineCollection(segs, colors=[colour[g]], linewidths=1.4))
    kept_edges = _group_edges(np.where(tmap.kept, 0, -1))
    if kept_edges:
        ax.add_collection(LineCollection(kept_edges[0], colors="white", linewidths=0.9))
    if tmap.centres:
        rows, cols = zip(*tmap.centres, strict=True)
        ax.scatter(np.asarray(cols) + 0.5, np.asarray(rows) + 0.5, s=6, c="white",
                   edgecolors="black", linewidths=0.3, zorder=3)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    kept, merged = int(tmap.kept.sum()), len(groups)
    legend = f"{kept} kept (white outline), {merged} merged groups (tinted), " \
             f"{int(tmap.dropped.sum())} dropped (dark) of {h * w}"
    ax.set_title(f"{title}\n{legend}" if title else legend, fontsize=8)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return img


def draw_token_map(image: np.ndarray, tmap: TokenMap, path: str | os.PathLike[str],
                   title: str = "") -> None:
    """Write a PNG: ``image`` (``[S, S, 3]`` floats in [0, 1] or uint8) with ``tmap``."""
    fig, ax = plt.subplots(figsize=(6, 6.4), dpi=100)
    _draw_panel(ax, _as_uint8(image), tmap, title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_stages(image: np.ndarray, panels: list[tuple[str, TokenMap]],
                path: str | os.PathLike[str], title: str = "") -> None:
    """Write a PNG with one panel per stage of a multi-stage (in-LLM) reduction: the tokens
    that survive from each cut layer on."""
    img = _as_uint8(image)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 5.2), dpi=100,
                             squeeze=False)
    for ax, (name, tmap) in zip(axes[0], panels, strict=True):
        _draw_panel(ax, img, tmap, name)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def stage_maps(cuts: list[Any], image: int, grid: tuple[int, int]) -> list[tuple[str, TokenMap]]:
    """Per cut of an in-LLM reduction, the token map of image ``image``: the tokens that
    survive from that decoder layer on (for merging methods, the source position each
    output token stands for)."""
    h, w = grid
    panels = []
    for cut in cuts:
        kept = np.zeros(h * w, dtype=bool)
        idx = cut.kept[image].detach().cpu().long().numpy()
        kept[idx[(idx >= 0) & (idx < h * w)]] = True
        tmap = TokenMap(kept=kept.reshape(h, w), group=np.full((h, w), -1, dtype=np.int64),
                        centres=[])
        panels.append((f"from LLM layer {cut.layer} on", tmap))
    return panels


def is_scene_image(image: Any) -> bool:
    """Whether ``image`` can be a scene of the embedded generator (``tokensieve.zoo``): an
    RGB picture of exactly the generator's size. Anything else (a real photo) is outside
    what the embedded tiny VLM was trained on."""
    from tokensieve.zoo.scenes import IMAGE_SIZE

    return getattr(image, "mode", None) == "RGB" and tuple(getattr(image, "size", ())) == (
        IMAGE_SIZE, IMAGE_SIZE)


def load_image(path: str | os.PathLike[str]):
    """Open an image file as RGB (ValueError if missing or not decodable)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image {str(p)!r}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"image {str(p)!r} cannot be decoded: {err}") from None


def model_view(pixel_values: torch.Tensor, processor: Any) -> np.ndarray:
    """The image as the model sees it (``[S, S, 3]`` in [0, 1]): un-normalised pixels."""
    ip = processor.image_processor
    mean = np.asarray(getattr(ip, "image_mean", None) or (0.0, 0.0, 0.0), np.float32)
    std = np.asarray(getattr(ip, "image_std", None) or (1.0, 1.0, 1.0), np.float32)
    x = pixel_values[0].detach().float().cpu().permute(1, 2, 0).numpy()
    return np.clip(x * std + mean, 0.0, 1.0)


def _view(pixels: torch.Tensor, processor: Any, image: Any) -> np.ndarray:
    if pixels.dim() == 4:  # [1, 3, S, S]: the image exactly as the model sees it
        return model_view(pixels, processor)
    # flattened patches (Qwen2-VL): the input image, which keeps its aspect
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def visualize(model: Any, processor: Any, image: Any, method: str, keep: int | float,
              out: str | os.PathLike[str], question: str = "Describe the image.",
              **options: Any) -> dict[str, Any]:
    """Run ``model`` once on ``image`` and ``question`` with ``method`` at ``keep`` and draw
    which visual tokens it kept and merged (an in-LLM method: one panel per cut layer, the
    tokens that survive from it on). Returns the answer, counts and the PNG path."""
    from tokensieve import models
    from tokensieve.bench.protocol import model_dims
    from tokensieve.zoo import build_prompt

    dims = model_dims(model, processor, image)
    enc = processor(text=[build_prompt(processor, question)], images=[image],
                    return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    enc = {k: v.to(device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    models.apply(model, method, keep, **options)
    try:
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
        state = models.get_state(model)
        cuts = state.llm.last if state.llm is not None and not state.pre_llm else None
        reductions = [] if cuts is not None else models.last_reductions(model)
    finally:
        models.remove(model)
    answer = processor.tokenizer.decode(gen[0, enc["input_ids"].shape[1]:],
                                        skip_special_tokens=True).strip()
    view = _view(enc["pixel_values"], processor, image)
    if cuts is not None:  # an in-LLM method: one panel per cut
        if not cuts:
            raise ValueError(f"method {method!r} made no cut for this image")
        side = int(round(dims.image_tokens ** 0.5))
        if side * side != dims.image_tokens:
            raise ValueError(f"{dims.image_tokens} image tokens are not a square grid; viz "
                             "draws in-LLM cuts on square grids")
        panels = stage_maps(cuts, 0, (side, side))
        draw_stages(view, panels, out, f"{method} keep={keep}  Q: {question}  A: {answer}")
        return {"answer": answer, "kept": [int(t.kept.sum()) for _, t in panels],
                "layers": [c.layer for c in cuts], "tokens": int(panels[-1][1].kept.sum()),
                "path": str(out)}
    if not reductions:
        raise ValueError(f"method {method!r} recorded no reduction for this image")
    r, r_grid = reductions[0]
    grid = r_grid
    if grid is None:  # the tokens carried a CLS token: the grid of a square tower
        side = int(round((dims.vision_tokens - dims.cls_tokens) ** 0.5))
        grid = (side, side)
    n_src = r.assignment.shape[1] if r.assignment is not None else None
    patches = grid[0] * grid[1]
    offset = (n_src - patches) if n_src is not None else (0 if r_grid is not None else 1)
    tmap = token_map(r, grid, offset)
    title = f"{method} keep={keep} ({r.num_tokens} of {dims.image_tokens} tokens)  " \
            f"Q: {question}  A: {answer}"
    draw_token_map(view, tmap, out, title)
    return {"answer": answer, "kept": int(tmap.kept.sum()), "merged_groups":
            len(set(tmap.group[tmap.group >= 0].tolist())), "tokens": r.num_tokens,
            "path": str(out)}
