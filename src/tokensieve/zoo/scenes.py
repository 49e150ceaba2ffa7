"""Deterministic generator of synthetic scene images with single-word QA.

Every scene is a 192x192 RGB image (a 24x24 grid of 8-pixel patches, i.e. 576
visual tokens, like LLaVA-1.5) with a textured, noisy background, 1-8 coloured
shapes of very different sizes (from one patch to six patches wide) and, in
most scenes, one small sign (2x2 patches) showing a digit drawn with DejaVu
Sans Bold, the font that ships with matplotlib. Objects sit on the patch grid
and never overlap (at least one background patch apart), so every answer is
determined by what was drawn.

A scene is a pure function of ``(split, index, attempt)``: the random generator
is seeded with those numbers, so the same call always gives identical pixels
and questions. Besides the image, a scene carries dense per-patch labels (used
to train the vision tower) and its object records (used by the tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGE_SIZE = 192
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 24
NUM_PATCHES = GRID * GRID  # 576

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 175, 55),
    "blue": (35, 75, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 205),
    "cyan": (30, 215, 225),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}
DIGITS: tuple[str, ...] = tuple("0123456789")
REGIONS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
FAMILIES: tuple[str, ...] = (
    "existence",
    "color",
    "shape",
    "count",
    "relation",
    "region",
    "glyph",
)
SPLIT_SEEDS: dict[str, int] = {"train": 1001, "val": 2002, "test": 3003}
TEST_SIZE = 2000
MAX_OBJECTS = 8
GLYPH_SIZE = 16
SIGN_PROBABILITY = 0.7
REL_MARGIN = 12  # min centre separation (px) for left/right, above/below questions
REGION_MARGIN = 8  # min distance (px) of a centre from the image midlines
TOTAL_COUNT_SHARE = 0.4  # count questions asking the total count outright (see pick_question)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: a shape (``kind == "shape"``) or a digit sign (``"sign"``)."""

    kind: str
    color: str  # colour name for shapes, "white" for signs
    shape: str  # shape name for shapes, "sign" for signs
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
    digit: str = ""

    @property
    def center(self) -> tuple[float, float]:
        """Centre (x, y) of the bounding box in pixels."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    @property
    def center_patch(self) -> int:
        """Raster index of the patch holding the centre of the bounding box."""
        cx, cy = self.center
        return min(int(cy) // PATCH, GRID - 1) * GRID + min(int(cx) // PATCH, GRID - 1)


def box_patches(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    """(row, column) slices of the patch grid that a pixel box touches."""
    x0, y0, x1, y1 = box
    return slice(y0 // PATCH, (y1 - 1) // PATCH + 1), slice(x0 // PATCH, (x1 - 1) // PATCH + 1)


@dataclass
class Scene:
    """A rendered scene: the image, its objects and dense per-patch labels."""

    image: Image.Image
    objects: list[SceneObject]
    patch_color: np.ndarray  # [24, 24] 0 = none, 1..6 colour, 7 = sign
    patch_shape: np.ndarray  # [24, 24] 0 = none, 1..4 shape
    patch_digit: np.ndarray  # [24, 24] 0 = none, 1..10 digit + 1
    patch_center: np.ndarray  # [24, 24] 1 where a shape's centre lies
    # [24, 24] 1 on each shape's first labelled patch in raster order: its counting marker,
    # which a patch can tell from its neighbours alone (a large shape's centre it cannot)
    patch_first: np.ndarray
    seed: tuple[int, ...] = field(default=())

    @property
    def shapes(self) -> list[SceneObject]:
        """The shape objects (signs excluded)."""
        return [o for o in self.objects if o.kind == "shape"]

    @property
    def sign(self) -> SceneObject | None:
        """The digit sign, if the scene has one."""
        signs = [o for o in self.objects if o.kind == "sign"]
        return signs[0] if signs else None

    def first_patch(self, obj: SceneObject) -> int:
        """Raster index of the patch of ``obj``'s box marked in ``patch_first``."""
        rows, cols = box_patches(obj.box)
        first = np.zeros((GRID, GRID), bool)
        first[rows, cols] = self.patch_first[rows, cols] > 0
        return int(np.flatnonzero(first)[0])


@dataclass(frozen=True)
class Question:
    """A question about a scene with its single-word answer."""

    family: str
    question: str
    answer: str


@dataclass
class Sample:
    """One benchmark sample: image, question, single-word answer and family."""

    image: Image.Image
    question: str
    answer: str
    family: str
    scene: Scene | None = None


def font_path() -> str:
    """Path of DejaVu Sans Bold shipped inside matplotlib's data directory."""
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf")


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(), 14)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Low-saturation textured background: smooth blobs, stripes and pixel noise."""
    base = rng.uniform(85, 175) + rng.uniform(-18, 18, size=3)
    coarse = rng.normal(0.0, 22.0, size=(6, 6, 3))
    coarse = coarse.mean(axis=2, keepdims=True) * 0.7 + coarse * 0.3  # mostly grey blobs
    blobs = np.asarray(
        Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC
        ),
        dtype=np.float32,
    ) - 128.0
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 30)
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period)
    stripes = stripes[..., None] * rng.uniform(0, 14)
    noise = rng.normal(0.0, rng.uniform(4, 12), size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return base + blobs + stripes + noise


Box = tuple[int, int, int, int]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill) -> None:
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "cross":
        t = max(2, round((x1 - x0 + 1) / 3))
        cx0 = x0 + (x1 - x0 + 1 - t) // 2
        cy0 = y0 + (y1 - y0 + 1 - t) // 2
        draw.rectangle((cx0, y0, cx0 + t - 1, y1), fill=fill)
        draw.rectangle((x0, cy0, x1, cy0 + t - 1), fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}")


def _sample_size(rng: np.random.Generator) -> int:
    """Side in pixels, a whole number of patches: one or two (40 %), three, four to six."""
    r = rng.random()
    if r < 0.4:
        return PATCH * int(rng.integers(1, 3))
    if r < 0.75:
        return PATCH * 3
    return PATCH * int(rng.integers(4, 7))


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    gap = 3
    x0, y0, x1, y1 = box
    return any(
        x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in boxes
    )


def _place(rng: np.random.Generator, size: int, boxes: list) -> tuple[int, int, int, int] | None:
    """A free box of side ``size`` whose corner lies on the patch grid (None if none found).

    Grid-aligned objects keep every patch either inside or outside a bounding
    box, so each token sees a whole object part: a ViT trained from scratch on
    a CPU budget learns shapes and digits from that far faster than from
    fragments at arbitrary sub-patch offsets.
    """
    cells = (IMAGE_SIZE - size) // PATCH + 1
    for _ in range(200):
        x0, y0 = (PATCH * int(v) for v in rng.integers(0, cells, size=2))
        box = (x0, y0, x0 + size, y0 + size)
        if not _overlaps(box, boxes):
            return box
    return None


def _first_labelled(obj: SceneObject, patch_color: np.ndarray, patch_shape: np.ndarray) -> int:
    """The first patch (raster order) of ``obj``'s box labelled with it; its centre if none is.

    Boxes never share a patch (grid-aligned, apart), so the labels in the box are ``obj``'s.
    """
    mine = np.zeros((GRID, GRID), bool)
    rows, cols = box_patches(obj.box)
    mine[rows, cols] = ((patch_color[rows, cols] == COLOR_NAMES.index(obj.color) + 1)
                        & (patch_shape[rows, cols] == SHAPES.index(obj.shape) + 1))
    hits = np.flatnonzero(mine)
    return int(hits[0]) if len(hits) else obj.center_patch


def make_scene(split: str, index: int, attempt: int = 0) -> Scene:
    """Render scene ``index`` of ``split`` (deterministic in its arguments)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    seed = (SPLIT_SEEDS[split], int(index), int(attempt))
    rng = np.random.default_rng(seed)
    n_shapes = int(rng.integers(1, MAX_OBJECTS + 1))
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n_shapes, replace=False)
    objects: list[SceneObject] = []
    boxes: list[tuple[int, int, int, int]] = []
    if rng.random() < SIGN_PROBABILITY:
        box = _place(rng, GLYPH_SIZE, boxes)
        if box is not None:
            boxes.append(box)
            digit = DIGITS[int(rng.integers(0, 10))]
            objects.append(SceneObject("sign", "white", "sign", box, digit))
    for k in chosen:
        color, shape = pairs[int(k)]
        box = None
        while box is None:
            size = _sample_size(rng)
            box = _place(rng, size, boxes)
        boxes.append(box)
        objects.append(SceneObject("shape", color, shape, box))

    canvas = _background(rng)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    patch_color = np.zeros((GRID, GRID), np.int64)
    patch_shape = np.zeros((GRID, GRID), np.int64)
    patch_digit = np.zeros((GRID, GRID), np.int64)
    patch_center = np.zeros((GRID, GRID), np.int64)
    best_cover = np.zeros((GRID, GRID), np.float32)
    for obj in objects:
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        mdraw = ImageDraw.Draw(mask)
        if obj.kind == "sign":
            x0, y0, x1, y1 = obj.box
            shade = int(rng.integers(225, 250))
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(shade, shade, shade))
            mdraw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
            ink = int(rng.integers(0, 40))
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2), obj.digit, fill=(ink, ink, ink),
                      font=_font(), anchor="mm")
        else:
            jitter = rng.integers(-15, 16, size=3)
            rgb = np.clip(np.asarray(COLORS[obj.color]) + jitter, 0, 255)
            fill = tuple(int(v) for v in rgb)
            _draw_shape(draw, obj.shape, obj.box, fill)
            _draw_shape(mdraw, obj.shape, obj.box, 255)
        cover = np.asarray(mask, np.float32).reshape(GRID, PATCH, GRID, PATCH).mean((1, 3)) / 255
        take = (cover >= 0.2) & (cover > best_cover)
        best_cover = np.where(take, cover, best_cover)
        if obj.kind == "sign":
            patch_color[take] = len(COLOR_NAMES) + 1
            patch_shape[take] = 0
            patch_digit[take] = int(obj.digit) + 1
        else:
            patch_color[take] = COLOR_NAMES.index(obj.color) + 1
            patch_shape[take] = SHAPES.index(obj.shape) + 1
            patch_digit[take] = 0
            patch_center.flat[obj.center_patch] = 1
    patch_first = np.zeros((GRID, GRID), np.int64)
    for obj in objects:
        if obj.kind == "shape":
            patch_first.flat[_first_labelled(obj, patch_color, patch_shape)] = 1
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 0.6))))
    arr = np.asarray(img, np.float32) + rng.normal(0.0, 5.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return Scene(img, objects, patch_color, patch_shape, patch_digit, patch_center, patch_first,
                 seed)


def _name(obj: SceneObject) -> str:
    return f"{obj.color} {obj.shape}"


def _region(obj: SceneObject) -> str | None:
    cx, cy = obj.center
    mid = IMAGE_SIZE / 2
    if abs(cx - mid) < REGION_MARGIN or abs(cy - mid) < REGION_MARGIN:
        return None
    return ("top" if cy < mid else "bottom") + "-" + ("left" if cx < mid else "right")


def questions_for(scene: Scene, family: str, rng: np.random.Generator) -> list[Question]:
    """All questions of ``family`` that are well defined for ``scene``.

    ``rng`` is only used by the existence family, to pick absent pairs. The
    first count question is the total count.
    """
    shapes = scene.shapes
    out: list[Question] = []
    if family == "existence":
        present = {(o.color, o.shape) for o in shapes}
        for o in shapes:
            out.append(Question(family, f"is there a {_name(o)} ?", "yes"))
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        picks = rng.choice(len(absent), size=min(len(absent), max(1, len(out))), replace=False)
        for k in picks:
            c, s = absent[int(k)]
            out.append(Question(family, f"is there a {c} {s} ?", "no"))
    elif family == "color":
        for s in SHAPES:
            objs = [o for o in shapes if o.shape == s]
            if len(objs) == 1:
                out.append(Question(family, f"what color is the {s} ?", objs[0].color))
    elif family == "shape":
        for c in COLOR_NAMES:
            objs = [o for o in shapes if o.color == c]
            if len(objs) == 1:
                out.append(Question(family, f"what shape is the {c} object ?", objs[0].shape))
    elif family == "count":
        out.append(Question(family, "how many shapes are there ?", str(len(shapes))))
        for c in COLOR_NAMES:
            n = sum(o.color == c for o in shapes)
            out.append(Question(family, f"how many {c} shapes are there ?", str(n)))
        for s in SHAPES:
            n = sum(o.shape == s for o in shapes)
            out.append(Question(family, f"how many {PLURALS[s]} are there ?", str(n)))
    elif family == "relation":
        for a in shapes:
            for b in shapes:
                if a is b:
                    continue
                (ax, ay), (bx, by) = a.center, b.center
                if abs(ax - bx) >= REL_MARGIN:
                    ans = "left" if ax < bx else "right"
                    q = f"is the {_name(a)} left or right of the {_name(b)} ?"
                    out.append(Question(family, q, ans))
                if abs(ay - by) >= REL_MARGIN:
                    ans = "above" if ay < by else "below"
                    q = f"is the {_name(a)} above or below the {_name(b)} ?"
                    out.append(Question(family, q, ans))
    elif family == "region":
        for o in shapes:
            region = _region(o)
            if region is not None:
                out.append(Question(family, f"where is the {_name(o)} ?", region))
    elif family == "glyph":
        if scene.sign is not None:
            out.append(Question(family, "what digit is on the sign ?", scene.sign.digit))
    else:
        raise ValueError(f"unknown question family {family!r}; expected one of {FAMILIES}")
    return out


def pick_question(scene: Scene, family: str, rng: np.random.Generator) -> Question | None:
    """One random question of ``family`` for ``scene`` (None if none is defined).

    Count questions are the total count with probability ``TOTAL_COUNT_SHARE``
    (uniform over all count questions, the total among them, otherwise); existence
    questions are balanced between yes and no.
    """
    qs = questions_for(scene, family, rng)
    if not qs:
        return None
    if family == "existence":
        want = "yes" if rng.random() < 0.5 else "no"
        qs = [q for q in qs if q.answer == want] or qs
    if family == "count" and rng.random() < TOTAL_COUNT_SHARE:
        return qs[0]
    return qs[int(rng.integers(0, len(qs)))]


def sample_at(split: str, index: int, family: str | None = None) -> Sample:
    """Sample ``index`` of ``split``; its family cycles through FAMILIES unless given."""
    family = family or FAMILIES[index % len(FAMILIES)]
    attempt = 0
    while True:
        scene = make_scene(split, index, attempt)
        rng = np.random.default_rng((SPLIT_SEEDS[split], int(index), int(attempt), 7))
        q = pick_question(scene, family, rng)
        if q is not None:
            return Sample(scene.image, q.question, q.answer, q.family, scene)
        attempt += 1


def scene_qa(split: str, n: int, start: int = 0) -> list[Sample]:
    """The first ``n`` samples (from ``start``) of ``split`` ("train", "val" or "test").

    Families are balanced (sample ``i`` asks family ``i % 7``). The test split is
    fixed at 2,000 samples.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if split == "test" and start + n > TEST_SIZE:
        raise ValueError(f"the test split has {TEST_SIZE} samples; asked for {start}..{start + n}")
    return [sample_at(split, i) for i in range(start, start + n)]


def vocabulary() -> list[str]:
    """Every word that prompts, questions and answers use (sorted, deterministic)."""
    words = {"USER:", "ASSISTANT:", "?", "object", "sign", "white"}
    words.update(COLOR_NAMES, SHAPES, PLURALS.values(), DIGITS, REGIONS)
    words.update(["yes", "no", "left", "right", "above", "below"])
    templates = [
        "is there a", "what color is the", "what shape is the", "how many shapes are there",
        "is the left or right of the", "above or below", "where is the", "what digit is on the",
    ]
    for t in templates:
        words.update(t.split())
    return sorted(words)
