"""Deterministic generator of short synthetic video clips with single-word QA.

A clip is 8 frames of 192x192 RGB (the scene generator's drawing: coloured
shapes on a textured, noisy background; see :mod:`tokensieve.zoo.scenes`). The
camera is still: the background texture is fixed and only the sensor noise is
redrawn per frame. Objects sit on a 16-pixel grid (one cell of OneVision's
2x2-pooled 12x12 token grid) and are one or two cells wide, so the pooled
tokens still show them. Every clip has

* one *mover*, moving in a straight line (left, right, up or down) by one or
  two patches (8 or 16 px) per frame, through all 8 frames;
* one to three *static* objects;
* zero to two *appearing* objects (absent at first, present from frame ``a``
  on, 1 <= a <= 6) and zero or one *vanishing* object (present before frame
  ``v``, 2 <= v <= 7, absent after); both stay in place.

Colours are unique within a clip, and objects never overlap (the mover's whole
path is kept free), so every answer is determined by construction. A clip is
a pure function of ``(split, index, attempt)``.

Question families (answers are single words):

* ``moved``: "what color / shape is the moving object ?"
* ``direction``: "which way does the {color} {shape} move ?" (left, right, up, down)
* ``appeared`` / ``vanished``: "what color / shape is the object that appeared / vanished ?"
* ``order``: "what color appeared first / last ?" (two appearing objects, two or more
  frames apart)
* ``count_time``: "how many shapes are there at the start / end ?"
* ``color`` / ``shape``: the static questions of the scene generator.

The temporal families need several frames: no single frame tells which object
moves or where to; appearing and vanishing objects need the first and the last
frames; the order of appearance needs the frames in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLOR_NAMES, COLORS, IMAGE_SIZE, PATCH, SHAPES, _background, _draw_shape

NUM_FRAMES = 8
CELL = 2 * PATCH  # 16 px: one token of the 2x2-pooled grid
POOLED = IMAGE_SIZE // CELL  # 12
TOKENS_PER_FRAME = POOLED * POOLED  # 144
VIDEO_TOKENS = NUM_FRAMES * TOKENS_PER_FRAME + 1  # 1153 with the trailing newline
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1),
                                          "down": (0, 1)}
CLIP_FAMILIES: tuple[str, ...] = (
    "moved", "direction", "appeared", "vanished", "order", "count_time", "color", "shape",
)
TEMPORAL_FAMILIES: tuple[str, ...] = CLIP_FAMILIES[:6]
CLIP_SPLIT_SEEDS: dict[str, int] = {"train": 5005, "val": 6006, "test": 7007}
CLIP_TEST_SIZE = 400
NOISE_STD = 5.0
GAP = 8  # min free pixels between any two objects' boxes (over the mover's whole path)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ClipObject:
    """One object of a clip: its colour, shape, role and box in each frame (None = absent)."""

    color: str
    shape: str
    role: str  # "mover", "static", "appear", "vanish"
    boxes: tuple[Box | None, ...]  # per frame: x0, y0, x1, y1 (exclusive) pixels
    direction: str = ""  # the mover's direction
    event_frame: int = 0  # first present frame ("appear") / first absent frame ("vanish")

    @property
    def name(self) -> str:
        """``"{color} {shape}"``."""
        return f"{self.color} {self.shape}"

    def present(self, frame: int) -> bool:
        """Whether the object is drawn in ``frame``."""
        return self.boxes[frame] is not None


@dataclass
class Clip:
    """A rendered clip: 8 frames and the objects that made them."""

    frames: list[Image.Image]
    objects: list[ClipObject]
    seed: tuple[int, ...] = field(default=())

    @property
    def mover(self) -> ClipObject:
        """The moving object."""
        return next(o for o in self.objects if o.role == "mover")

    def with_role(self, role: str) -> list[ClipObject]:
        """The objects of ``role``."""
        return [o for o in self.objects if o.role == role]

    def count(self, frame: int) -> int:
        """Number of objects drawn in ``frame``."""
        return sum(o.present(frame) for o in self.objects)

    def token_masks(self) -> np.ndarray:
        """[n_objects, 8 * 144] bool: the pooled tokens each object's box touches, per frame."""
        out = np.zeros((len(self.objects), NUM_FRAMES, POOLED, POOLED), bool)
        for j, o in enumerate(self.objects):
            for t, box in enumerate(o.boxes):
                if box is not None:
                    x0, y0, x1, y1 = box
                    out[j, t, y0 // CELL:(y1 - 1) // CELL + 1, x0 // CELL:(x1 - 1) // CELL + 1] = 1
        return out.reshape(len(self.objects), -1)


@dataclass(frozen=True)
class ClipQuestion:
    """A question about a clip with its single-word answer."""

    family: str
    question: str
    answer: str
    objects: tuple[int, ...] = ()  # indices into clip.objects the question is about


@dataclass
class VideoSample:
    """One benchmark sample: frames, question, single-word answer and family."""

    frames: list[Image.Image]
    question: str
    answer: str
    family: str
    clip: Clip | None = None


def _free(box: Box, boxes: list[Box]) -> bool:
    x0, y0, x1, y1 = box
    return not any(x0 < b[2] + GAP and b[0] < x1 + GAP and y0 < b[3] + GAP and b[1] < y1 + GAP
                   for b in boxes)


def _sweep(boxes: list[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


def _place_static(rng: np.random.Generator, size: int, taken: list[Box]) -> Box | None:
    cells = (IMAGE_SIZE - size) // CELL + 1
    for _ in range(100):
        x0, y0 = (CELL * int(v) for v in rng.integers(0, cells, size=2))
        box = (x0, y0, x0 + size, y0 + size)
        if _free(box, taken):
            return box
    return None


def _mover_path(rng: np.random.Generator, size: int) -> tuple[str, list[Box]]:
    direction = str(rng.choice(list(DIRECTIONS)))
    dx, dy = DIRECTIONS[direction]
    speed = PATCH * int(rng.integers(1, 3))
    travel = speed * (NUM_FRAMES - 1)
    # start on the cell grid, far enough from the edge it moves to
    along = (IMAGE_SIZE - size - travel) // CELL + 1
    across = (IMAGE_SIZE - size) // CELL + 1
    a = CELL * int(rng.integers(0, along))
    c = CELL * int(rng.integers(0, across))
    if dx:
        x0 = a if dx > 0 else IMAGE_SIZE - size - a
        y0 = c
    else:
        y0 = a if dy > 0 else IMAGE_SIZE - size - a
        x0 = c
    boxes = []
    for t in range(NUM_FRAMES):
        bx, by = x0 + dx * speed * t, y0 + dy * speed * t
        boxes.append((bx, by, bx + size, by + size))
    return direction, boxes


def _size(rng: np.random.Generator) -> int:
    return CELL * int(rng.integers(1, 3))


def make_clip(split: str, index: int, attempt: int = 0, render: bool = True) -> Clip:
    """Render clip ``index`` of ``split`` (deterministic in its arguments).

    ``render=False`` lays the objects out only (no frames): the same objects, cheaply.
    """
    if split not in CLIP_SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(CLIP_SPLIT_SEEDS)}")
    seed = (CLIP_SPLIT_SEEDS[split], int(index), int(attempt))
    rng = np.random.default_rng(seed)
    n_static = int(rng.integers(1, 4))
    n_appear = int(rng.choice(3, p=[0.3, 0.35, 0.35]))
    n_vanish = int(rng.random() < 0.6)
    roles = ["mover"] + ["static"] * n_static + ["appear"] * n_appear + ["vanish"] * n_vanish
    roles = roles[:len(COLOR_NAMES)]
    colors = [COLOR_NAMES[int(k)] for k in rng.permutation(len(COLOR_NAMES))[:len(roles)]]
    appear_frames: list[int] = []
    if roles.count("appear") == 2:
        a1 = int(rng.integers(1, 5))
        appear_frames = [a1, int(rng.integers(a1 + 2, 7))]
        if rng.random() < 0.5:
            appear_frames.reverse()
    elif roles.count("appear") == 1:
        appear_frames = [int(rng.integers(1, 7))]
    objects: list[ClipObject] = []
    taken: list[Box] = []
    for role, color in zip(roles, colors, strict=True):
        shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        if role == "mover":
            direction, boxes = _mover_path(rng, _size(rng))
            taken.append(_sweep(boxes))
            objects.append(ClipObject(color, shape, role, tuple(boxes), direction))
            continue
        box = None
        while box is None:
            box = _place_static(rng, _size(rng), taken)
        taken.append(box)
        if role == "static":
            objects.append(ClipObject(color, shape, role, (box,) * NUM_FRAMES))
        elif role == "appear":
            a = appear_frames.pop(0)
            objects.append(ClipObject(color, shape, role,
                                      tuple(box if t >= a else None for t in range(NUM_FRAMES)),
                                      event_frame=a))
        else:
            v = int(rng.integers(2, 8))
            objects.append(ClipObject(color, shape, role,
                                      tuple(box if t < v else None for t in range(NUM_FRAMES)),
                                      event_frame=v))
    if not render:
        return Clip([], objects, seed)
    fills = {}
    for o in objects:
        rgb = np.clip(np.asarray(COLORS[o.color]) + rng.integers(-15, 16, size=3), 0, 255)
        fills[o.color] = tuple(int(v) for v in rgb)
    canvas = np.clip(_background(rng), 0, 255).astype(np.uint8)
    frames = []
    for t in range(NUM_FRAMES):
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        for o in objects:
            if o.boxes[t] is not None:
                _draw_shape(draw, o.shape, o.boxes[t], fills[o.color])
        arr = np.asarray(img, np.float32) + rng.normal(0.0, NOISE_STD, size=canvas.shape)
        frames.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return Clip(frames, objects, seed)


def questions_for(clip: Clip, family: str) -> list[ClipQuestion]:
    """All questions of ``family`` that are well defined for ``clip``."""
    objs = clip.objects
    out: list[ClipQuestion] = []

    def idx(o: ClipObject) -> int:
        return objs.index(o)

    if family == "moved":
        m = clip.mover
        out.append(ClipQuestion(family, "what color is the moving object ?", m.color, (idx(m),)))
        out.append(ClipQuestion(family, "what shape is the moving object ?", m.shape, (idx(m),)))
    elif family == "direction":
        m = clip.mover
        out.append(ClipQuestion(family, f"which way does the {m.name} move ?", m.direction,
                                (idx(m),)))
    elif family in ("appeared", "vanished"):
        role = "appear" if family == "appeared" else "vanish"
        group = clip.with_role(role)
        if len(group) == 1:
            o = group[0]
            for attr in ("color", "shape"):
                out.append(ClipQuestion(family, f"what {attr} is the object that {family} ?",
                                        getattr(o, attr), (idx(o),)))
    elif family == "order":
        group = sorted(clip.with_role("appear"), key=lambda o: o.event_frame)
        if len(group) == 2:
            first, last = group
            pair = (idx(first), idx(last))
            out.append(ClipQuestion(family, "what color appeared first ?", first.color, pair))
            out.append(ClipQuestion(family, "what color appeared last ?", last.color, pair[::-1]))
    elif family == "count_time":
        for word, t in (("start", 0), ("end", NUM_FRAMES - 1)):
            present = tuple(j for j, o in enumerate(objs) if o.present(t))
            out.append(ClipQuestion(family, f"how many shapes are there at the {word} ?",
                                    str(len(present)), present))
    elif family == "color":
        for s in SHAPES:
            group = [o for o in objs if o.shape == s]
            if len(group) == 1:
                out.append(ClipQuestion(family, f"what color is the {s} ?", group[0].color,
                                        (idx(group[0]),)))
    elif family == "shape":
        for o in objs:
            out.append(ClipQuestion(family, f"what shape is the {o.color} object ?", o.shape,
                                    (idx(o),)))
    else:
        raise ValueError(f"unknown clip family {family!r}; expected one of {CLIP_FAMILIES}")
    return out


def all_questions(clip: Clip) -> list[ClipQuestion]:
    """Every well-defined question of every family for ``clip``."""
    return [q for f in CLIP_FAMILIES for q in questions_for(clip, f)]


def clip_sample_at(split: str, index: int, family: str | None = None) -> VideoSample:
    """Sample ``index`` of ``split``; its family cycles through CLIP_FAMILIES unless given."""
    family = family or CLIP_FAMILIES[index % len(CLIP_FAMILIES)]
    attempt = 0
    while True:
        clip = make_clip(split, index, attempt, render=False)
        qs = questions_for(clip, family)
        if qs:
            clip = make_clip(split, index, attempt)
            rng = np.random.default_rng((CLIP_SPLIT_SEEDS[split], int(index), int(attempt), 7))
            q = qs[int(rng.integers(0, len(qs)))]
            return VideoSample(clip.frames, q.question, q.answer, q.family, clip)
        attempt += 1


def clip_qa(split: str, n: int, start: int = 0) -> list[VideoSample]:
    """The first ``n`` samples (from ``start``) of ``split`` ("train", "val" or "test").

    Families are balanced (sample ``i`` asks family ``i % 8``). The test split is
    fixed at 400 samples.
    """
    if split not in CLIP_SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(CLIP_SPLIT_SEEDS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if split == "test" and start + n > CLIP_TEST_SIZE:
        raise ValueError(f"the test split has {CLIP_TEST_SIZE} samples; asked for "
                         f"{start}..{start + n}")
    return [clip_sample_at(split, i) for i in range(start, start + n)]


def question_template(question: str) -> str:
    """``question`` with its colour and shape words replaced by placeholders."""
    words = ["{color}" if w in COLORS else "{shape}" if w in SHAPES else w
             for w in question.split()]
    return " ".join(words)


def chance_levels(samples: list[VideoSample]) -> dict[str, float]:
    """Per family (and ``"overall"``): accuracy of answering each question with the most
    frequent answer of its template (colour and shape words masked) among the samples:
    the best guess from the question's wording alone."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for s in samples:
        per = counts.setdefault(s.family, {}).setdefault(question_template(s.question), {})
        per[s.answer] = per.get(s.answer, 0) + 1
    out, hits = {}, 0
    for fam in sorted(counts):
        h = sum(max(c.values()) for c in counts[fam].values())
        n = sum(sum(c.values()) for c in counts[fam].values())
        out[fam], hits = h / n, hits + h
    out["overall"] = hits / max(1, len(samples))
    return out


def clip_vocabulary() -> list[str]:
    """Every word that clip questions and answers use (sorted)."""
    words: set[str] = set()
    for t in ("what color is the moving object ?", "what shape is the object that appeared ?",
              "vanished which way does move", "appeared first last",
              "how many shapes are there at the start end"):
        words.update(t.split())
    words.update(COLOR_NAMES, SHAPES, DIRECTIONS, (str(n) for n in range(7)))
    return sorted(words)
