"""The embedded video benchmark: clip generator, tiny video VLM, `tokensieve bench --task video`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tokensieve.bench import protocol
from tokensieve.cli import app
from tokensieve.zoo.clips import (
    CLIP_FAMILIES,
    COLORS,
    DIRECTIONS,
    NUM_FRAMES,
    TOKENS_PER_FRAME,
    VIDEO_TOKENS,
    all_questions,
    chance_levels,
    clip_qa,
    make_clip,
    questions_for,
)
from tokensieve.zoo.video_api import (
    accuracy_by_family,
    answer_video,
    load_tiny_video_vlm,
    video_checkpoint_available,
)
from tokensieve.zoo.video_build import TinyVideoProcessor, build_video_tokenizer
from tokensieve.zoo.video_train import VideoCodec

needs_video_checkpoint = pytest.mark.skipif(
    not video_checkpoint_available(),
    reason="no tiny video VLM checkpoint (scripts/train_tiny_video_vlm.py)")


def _centre_rgb(frame, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    arr = np.asarray(frame, np.float32)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    return arr[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)


def _shows(frame, obj, box) -> bool:
    """Whether ``frame`` has ``obj``'s colour at the centre of ``box`` (jitter 15, noise 5)."""
    return float(np.abs(_centre_rgb(frame, box) - np.asarray(COLORS[obj.color])).max()) < 40


def test_clips_are_deterministic():
    a, b = make_clip("train", 11), make_clip("train", 11)
    assert a.objects == b.objects and a.seed == b.seed
    assert all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(a.frames, b.frames, strict=True))
    assert make_clip("train", 12).objects != a.objects
    assert make_clip("test", 11).objects != a.objects
    lay = make_clip("train", 11, render=False)
    assert lay.objects == a.objects and lay.frames == []
    s1, s2 = clip_qa("test", 8), clip_qa("test", 8)
    assert [(s.question, s.answer) for s in s1] == [(s.question, s.answer) for s in s2]
    assert [s.family for s in s1] == list(CLIP_FAMILIES)


@pytest.mark.parametrize("index", range(6))
def test_rendered_frames_match_the_answers(index):
    clip = make_clip("val", index)
    frames = clip.frames
    assert len(frames) == NUM_FRAMES and frames[0].size == (192, 192)
    colors = [o.color for o in clip.objects]
    assert len(set(colors)) == len(colors)
    for o in clip.objects:
        for t, box in enumerate(o.boxes):
            if box is not None:
                assert _shows(frames[t], o, box), (o, t)
    m = clip.mover
    (x0, y0, *_), (x7, y7, *_) = m.boxes[0], m.boxes[-1]
    dx, dy = DIRECTIONS[m.direction]
    assert (x7 - x0) * dx + (y7 - y0) * dy >= 7 * 8 and (x7 - x0) * dy == 0 == (y7 - y0) * dx
    # the mover left its first place: the last frame shows background there
    assert not _shows(frames[-1], m, m.boxes[0])
    for o in clip.with_role("appear"):
        assert o.boxes[0] is None and not _shows(frames[0], o, o.boxes[-1])
    for o in clip.with_role("vanish"):
        assert o.boxes[-1] is None and not _shows(frames[-1], o, o.boxes[0])
    for o in clip.with_role("static"):
        diff = np.abs(np.asarray(frames[0], np.float32) - np.asarray(frames[-1], np.float32))
        x0, y0, x1, y1 = o.boxes[0]
        assert diff[y0:y1, x0:x1].mean() < 10  # sensor noise only


def test_questions_by_construction():
    seen = set()
    for i in range(40):
        clip = make_clip("train", i, render=False)
        for q in all_questions(clip):
            seen.add(q.family)
            objs = [clip.objects[j] for j in q.objects]
            if q.family == "moved":
                assert objs[0].role == "mover" and q.answer in (objs[0].color, objs[0].shape)
            elif q.family == "direction":
                assert q.answer == clip.mover.direction and clip.mover.name in q.question
            elif q.family in ("appeared", "vanished"):
                assert objs[0].role == ("appear" if q.family == "appeared" else "vanish")
            elif q.family == "order":
                a, b = objs
                first = q.question.split()[-2] == "first"
                assert (a.event_frame < b.event_frame) == first and q.answer == a.color
                assert abs(a.event_frame - b.event_frame) >= 2
            elif q.family == "count_time":
                t = 0 if "start" in q.question else NUM_FRAMES - 1
                assert int(q.answer) == clip.count(t) == len(objs)
    assert seen == set(CLIP_FAMILIES)
    with pytest.raises(ValueError, match="unknown clip family"):
        questions_for(make_clip("train", 0, render=False), "glyph")
    with pytest.raises(ValueError, match="400 samples"):
        clip_qa("test", 401)


def test_chance_levels_and_vocabulary():
    samples = clip_qa("test", 48)
    chance = chance_levels(samples)
    assert set(chance) == set(CLIP_FAMILIES) | {"overall"}
    assert all(0 < v <= 1 for v in chance.values())
    codec = VideoCodec(build_video_tokenizer())
    for s in samples:  # every question and answer is in the vocabulary
        codec.suffix(s.question)
        codec.answer_id(s.answer)


def test_processor_expands_the_video_placeholder():
    tok = build_video_tokenizer()
    proc = TinyVideoProcessor(tok)
    samples = clip_qa("test", 2)
    tok.padding_side = "left"
    enc = proc(text=[proc.prompt(s.question) for s in samples],
               videos=[s.frames for s in samples])
    assert enc["pixel_values_videos"].shape == (2, NUM_FRAMES, 3, 192, 192)
    assert (enc["input_ids"] == proc.video_token_id).sum(1).tolist() == [VIDEO_TOKENS] * 2
    assert VIDEO_TOKENS == NUM_FRAMES * TOKENS_PER_FRAME + 1
    with pytest.raises(ValueError, match="placeholders"):
        proc(text=["no video here"], videos=[samples[0].frames])


@needs_video_checkpoint
def test_checkpoint_answers_clips():
    model, processor = load_tiny_video_vlm()
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    samples = clip_qa("test", 24)
    preds = answer_video(model, processor, samples, batch_size=12)
    acc = accuracy_by_family(samples, preds)
    assert acc["overall"] >= 0.85, acc  # test split: 92.5 %; chance 33.5 %
    # left padding: a sample answers the same alone and in a batch
    assert answer_video(model, processor, samples[:1], batch_size=1) == preds[:1]


@needs_video_checkpoint
def test_bench_video_smoke(tmp_path, monkeypatch):
    """`tokensieve bench --task video --limit 8`: the full row, and a method that fails
    becomes an error row."""
    models = protocol._adapter()
    real_apply = models.apply

    def apply(model, method, *a, **k):
        if method == "frame-sample":
            raise KeyError("broken on purpose")
        return real_apply(model, method, *a, **k)

    monkeypatch.setattr(models, "apply", apply)
    res = CliRunner().invoke(app, ["bench", "--task", "video", "--limit", "8", "--methods",
                                   "frame-sample", "--keep", "0.25", "--repeats", "1",
                                   "--out", str(tmp_path)], terminal_width=200)
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert data["config"]["task"] == "video" and data["model"]["visual_tokens"] == 1152
    assert rows["full"]["error"] is None and rows["full"]["accuracy"]["overall"] >= 0.25
    assert rows["frame-sample"]["keep"] == 288 and "broken on purpose" in rows["frame-sample"][
        "error"]


def test_bench_video_checks_first(tmp_path):
    with pytest.raises(ValueError, match="task="):
        protocol.prepare(protocol.BenchConfig(task="audio", out=str(tmp_path)))
    with pytest.raises(ValueError, match="400 samples"):
        protocol.prepare(protocol.BenchConfig(task="video", limit=500, out=str(tmp_path)))
    with pytest.raises(ValueError, match="embedded tiny video VLM only"):
        protocol.prepare(protocol.BenchConfig(task="video", model="some/model", limit=4,
                                              out=str(tmp_path)))
