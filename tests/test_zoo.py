"""Tests of the embedded tiny VLM: scene generator, model plumbing, training, checkpoint."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from zoo_configs import SMALL

from tokensieve.zoo import (
    accuracy_by_family,
    answer,
    checkpoint_available,
    load_tiny_vlm,
    scene_qa,
)
from tokensieve.zoo.build import build_model, build_processor, pixel_values
from tokensieve.zoo.lm_training import build_bank, sample_questions
from tokensieve.zoo.scenes import (
    COLORS,
    DIGITS,
    FAMILIES,
    GLYPH_SIZE,
    NUM_PATCHES,
    PLURALS,
    TOTAL_COUNT_SHARE,
    _font,
    make_scene,
    sample_at,
)
from tokensieve.zoo.train import (
    PromptCodec,
    TrainConfig,
    VisionHeads,
    feature_layer,
    lm_answer_logits,
    scene_targets,
    stage1_loss,
    train_tiny_vlm,
)


def test_generator_is_deterministic() -> None:
    a, b = scene_qa("test", 14), scene_qa("test", 14)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert (x.question, x.answer, x.family) == (y.question, y.answer, y.family)
    assert not np.array_equal(np.asarray(make_scene("train", 0).image),
                              np.asarray(make_scene("test", 0).image))


def test_samples_shape_and_balance() -> None:
    samples = scene_qa("val", 21)
    assert [s.family for s in samples] == list(FAMILIES) * 3
    for s in samples:
        assert s.image.size == (192, 192) and s.image.mode == "RGB"
        assert len(s.answer.split()) == 1
        assert s.question.endswith("?")


@pytest.mark.parametrize("split,n", [("bogus", 1), ("test", -1), ("test", 2001), ("val", 1.5)])
def test_scene_qa_rejects_bad_arguments(split: str, n) -> None:
    with pytest.raises(ValueError):
        scene_qa(split, n)


def _closest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda c: float(np.sum((np.asarray(COLORS[c]) - rgb) ** 2)))


def _read_digit(image: Image.Image, box: tuple[int, int, int, int]) -> str:
    """Template-match the sign's crop against every digit drawn with the same font."""
    crop = np.asarray(image.convert("L").crop(box), np.float32)
    crop = (crop - crop.mean()) / (crop.std() + 1e-6)
    scores = {}
    for d in DIGITS:
        plate = Image.new("L", (GLYPH_SIZE, GLYPH_SIZE), 240)
        ImageDraw.Draw(plate).text((GLYPH_SIZE / 2, GLYPH_SIZE / 2), d, fill=20, font=_font(),
                                   anchor="mm")
        t = np.asarray(plate, np.float32)
        scores[d] = float(np.mean(crop * (t - t.mean()) / (t.std() + 1e-6)))
    return max(scores, key=scores.get)


def test_answers_agree_with_what_was_drawn() -> None:
    for i in range(70):
        s = sample_at("test", i)
        scene = s.scene
        shapes = scene.shapes
        img = np.asarray(s.image, np.float32)
        boxes = [o.box for o in scene.objects]
        for j, a in enumerate(boxes):  # no overlaps
            for b in boxes[j + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        for o in shapes:  # each shape is visible in its recorded colour at its centre
            cx, cy = (int(v) for v in o.center)
            assert _closest_color(img[cy - 1:cy + 2, cx - 1:cx + 2].mean((0, 1))) == o.color
        q = s.question
        if s.family == "count":
            m = re.match(r"how many (\w+) (shapes )?are there", q)
            what = m.group(1)
            if what == "shapes":
                expected = len(shapes)
            elif what in COLORS:
                expected = sum(o.color == what for o in shapes)
            else:
                expected = sum(PLURALS[o.shape] == what for o in shapes)
            assert s.answer == str(expected)
        elif s.family == "color":
            shape = q.split()[-2]
            assert [o.color for o in shapes if o.shape == shape] == [s.answer]
        elif s.family == "shape":
            color = q.split()[-3]
            assert [o.shape for o in shapes if o.color == color] == [s.answer]
        elif s.family == "existence":
            _, _, _, color, shape, _ = q.split()
            present = any(o.color == color and o.shape == shape for o in shapes)
            assert s.answer == ("yes" if present else "no")
        elif s.family == "glyph":
            assert scene.sign is not None and s.answer == scene.sign.digit
            assert _read_digit(s.image, scene.sign.box) == s.answer
        elif s.family == "region":
            color, shape = q.split()[3:5]
            (o,) = [o for o in shapes if o.color == color and o.shape == shape]
            vert, horiz = s.answer.split("-")
            assert (o.center[1] < 96) == (vert == "top") and (o.center[0] < 96) == (horiz == "left")
        elif s.family == "relation":
            words = q.split()
            a = next(o for o in shapes if (o.color, o.shape) == (words[2], words[3]))
            b = next(o for o in shapes if (o.color, o.shape) == (words[-3], words[-2]))
            axis = 0 if "left" in words else 1
            first = a.center[axis] < b.center[axis]
            assert s.answer == (("left", "above")[axis] if first else ("right", "below")[axis])


def test_processor_expands_image_tokens_and_matches_pixels() -> None:
    proc = build_processor()
    samples = scene_qa("test", 2)
    enc = proc(text=["USER: <image>\n" + s.question + " ASSISTANT:" for s in samples],
               images=[s.image for s in samples], return_tensors="pt", padding=True)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert ((enc["input_ids"] == image_id).sum(-1) == NUM_PATCHES).all()
    assert torch.equal(enc["pixel_values"], pixel_values([s.image for s in samples]))
    assert proc.tokenizer.unk_token_id not in enc["input_ids"].tolist()[0]


@torch.no_grad()
def test_training_paths_match_the_llava_forward() -> None:
    """Truncated tower == hidden_states[-2]; cached-prefix logits == a plain forward."""
    proc = build_processor()
    model = build_model(SMALL, proc.tokenizer, seed=0).eval()
    samples = scene_qa("test", 3)
    pix = pixel_values([s.image for s in samples])
    full = model.model.vision_tower(pixel_values=pix, output_hidden_states=True)
    assert torch.allclose(feature_layer(model, pix), full.hidden_states[-2], atol=1e-5)
    codec = PromptCodec(proc.tokenizer)
    img = model.model.multi_modal_projector(feature_layer(model, pix)[:1, 1:])
    suffixes = [codec.suffix(s.question) for s in samples]
    logits, lens = lm_answer_logits(model, codec, img, suffixes, repeat=3)
    for r, s in enumerate(samples):
        enc = proc(text=["USER: <image>\n" + s.question + " ASSISTANT:"],
                   images=[samples[0].image], return_tensors="pt")
        ref = model(**enc).logits[0, -1]
        assert torch.allclose(logits[r, lens[r] - 1], ref, atol=1e-4)


def test_object_weighted_stage1_loss_reads_only_object_patches() -> None:
    """With ``object_weight`` the shape/digit terms ignore background patches' logits."""
    heads = VisionHeads(16)
    t = scene_targets([make_scene("train", i) for i in range(2)])
    patch = [torch.randn(2, NUM_PATCHES, n) for n in heads.patch_sizes]
    glob = [torch.randn(2, n) for n in heads.global_sizes]

    def loss_with(shape_logits: torch.Tensor, object_weight: float) -> float:
        fake = lambda hidden: ([patch[0], shape_logits, *patch[2:]], glob)  # noqa: E731
        return stage1_loss(fake, torch.zeros(1), t, object_weight)[0].item()

    background = torch.nonzero(t["shape"] == 0)[0]
    obj = torch.nonzero(t["shape"] > 0)[0]
    moved_bg, moved_obj = patch[1].clone(), patch[1].clone()
    moved_bg[background[0], background[1]] += 5.0 * torch.arange(patch[1].shape[-1])
    moved_obj[obj[0], obj[1]] += 5.0 * torch.arange(patch[1].shape[-1])
    base = loss_with(patch[1], 1.0)
    assert loss_with(moved_bg, 1.0) == pytest.approx(base, abs=1e-6)
    assert loss_with(moved_obj, 1.0) != pytest.approx(base, abs=1e-3)
    # the default (all-patch mean) does read background patches
    assert loss_with(moved_bg, 0.0) != pytest.approx(loss_with(patch[1], 0.0), abs=1e-3)


def test_question_bank_head_keeps_the_first_images() -> None:
    codec = PromptCodec(build_processor().tokenizer)
    scenes = [make_scene("train", i) for i in range(5)]
    bank = build_bank(scenes, codec, seed=0)
    head = bank.head(3)
    assert head.per_image == bank.per_image[:3] and len(head.targets) == 3
    assert (head.object_masks == bank.object_masks[:3]).all() and head.yes_id == bank.yes_id
    # the first images' questions do not depend on how many images the bank holds
    assert build_bank(scenes[:3], codec, seed=0).per_image == head.per_image


def test_training_asks_the_total_count_as_often_as_the_benchmark() -> None:
    codec = PromptCodec(build_processor().tokenizer)
    bank = build_bank([make_scene("train", i) for i in range(20)], codec, seed=0)
    rows = sample_questions(bank, list(range(20)), 300, np.random.default_rng(0))
    total = codec.suffix("how many shapes are there ?")
    counts = [q.suffix == total for q in rows if q.family == "count"]
    # pick_question (the benchmark): 0.4 + 0.6 / 11 (11 count questions per scene)
    expected = TOTAL_COUNT_SHARE + (1 - TOTAL_COUNT_SHARE) / 11
    assert np.mean(counts) == pytest.approx(expected, abs=4 * np.sqrt(0.25 / len(counts)))
    rows = sample_questions(bank, list(range(20)), 300, np.random.default_rng(0), 0.0)
    uniform = [q.suffix == total for q in rows if q.family == "count"]
    assert np.mean(uniform) == pytest.approx(1 / 11, abs=4 * np.sqrt(0.1 / len(uniform)))


def test_marker_choice_terms_are_the_per_box_cross_entropy() -> None:
    """The choice terms equal a per-shape softmax over its box patches, computed by hand,
    for both markers: the centre patch and the first patch (``Scene.patch_first``)."""
    scenes = [make_scene("train", i) for i in range(3)]
    heads = VisionHeads(16)
    t = scene_targets(scenes)
    patch = [torch.randn(3, NUM_PATCHES, n) for n in heads.patch_sizes]
    glob = [torch.randn(3, n) for n in heads.global_sizes]
    fake = lambda hidden: (patch, glob)  # noqa: E731
    markers = {3: lambda scene, o: o.center_patch, 5: lambda scene, o: scene.first_patch(o)}

    def choice_gap() -> float:
        return (stage1_loss(fake, torch.zeros(1), t, choice_weight=2.0)[0]
                - stage1_loss(fake, torch.zeros(1), t)[0]).item()

    expected = 0.0
    for head, marker in markers.items():
        terms = []
        for i, scene in enumerate(scenes):
            for o in scene.shapes:
                x0, y0, x1, y1 = o.box
                box = [r * 24 + c for r in range(y0 // 8, (y1 - 1) // 8 + 1)
                       for c in range(x0 // 8, (x1 - 1) // 8 + 1)]
                logits = patch[head][i, box, 0]
                terms.append(-torch.log_softmax(logits, 0)[box.index(marker(scene, o))].item())
        expected += 2.0 * np.mean(terms)
    assert choice_gap() == pytest.approx(expected, rel=1e-4)
    # a marker logit far above the rest of its box drives its term to zero
    for head, marker in markers.items():
        peaked = patch[head].clone().fill_(0.0)
        for i, scene in enumerate(scenes):
            for o in scene.shapes:
                peaked[i, marker(scene, o)] = 50.0
        patch[head] = peaked
    assert abs(choice_gap()) < 1e-4


def test_first_patch_is_the_first_labelled_patch_of_each_shape() -> None:
    for i in range(30):
        scene = make_scene("train", i)
        assert scene.patch_first.sum() == len(scene.shapes)
        for o in scene.shapes:
            first = scene.first_patch(o)
            x0, y0, x1, y1 = o.box
            mine = [r * 24 + c for r in range(y0 // 8, (y1 - 1) // 8 + 1)
                    for c in range(x0 // 8, (x1 - 1) // 8 + 1)
                    if scene.patch_shape[r, c] > 0]
            assert first == (min(mine) if mine else o.center_patch)


@pytest.mark.parametrize("parallel", [False, True])
def test_retraining_smoke(tmp_path, parallel: bool) -> None:
    cfg = TrainConfig(stage1_steps=2, stage1_batch=4, lm_images=8, finetune_images=12,
                      lm_batch=4, questions_per_image=2, symbolic_steps=2,
                      symbolic_count_steps=2, align_steps=2, finetune_steps=2, refine_steps=2,
                      log_every=1, parallel=parallel)
    logs: list[str] = []
    model, proc, times = train_tiny_vlm(cfg, SMALL, log=logs.append)
    for stage in ("stage1 step", "symbolic step", "symbolic-count step", "refine step",
                  "align step", "finetune step"):
        assert any(m.startswith(stage) for m in logs), (stage, logs)
    assert times["total_s"] > 0 and times["stage1_s"] > 0
    assert any(m.startswith("cached (12, 576,") for m in logs)  # the fine-tune's images
    model.half().save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, lproc = load_tiny_vlm(path=tmp_path)
    preds = answer(loaded, lproc, scene_qa("test", 3), batch_size=2, max_new_tokens=2)
    assert len(preds) == 3 and all(isinstance(p, str) for p in preds)


def test_answer_rejects_bad_batch_size() -> None:
    proc = build_processor()
    model = build_model(SMALL, proc.tokenizer)
    with pytest.raises(ValueError):
        answer(model, proc, scene_qa("test", 1), batch_size=0)


needs_checkpoint = pytest.mark.skipif(
    not checkpoint_available(),
    reason="shipped checkpoint not present yet (run scripts/train_tiny_vlm.py)")


@functools.lru_cache(maxsize=1)
def _shipped_accuracy() -> tuple[tuple[str, float], ...]:
    model, proc = load_tiny_vlm()
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    samples = scene_qa("test", 200)
    acc = accuracy_by_family(samples, answer(model, proc, samples, batch_size=25))
    return tuple(acc.items())


@needs_checkpoint
def test_shipped_checkpoint_loads_offline_and_answers() -> None:
    acc = dict(_shipped_accuracy())
    # measured 97.0 % on this slice (96.8 % on the 2,000-sample split); the answer prior
    # alone scores about 30 %: a regression of the checkpoint or of the LLaVA path fails here
    assert acc["overall"] >= 0.85, acc
    for family in ("existence", "relation", "region", "glyph"):
        assert acc[family] >= 0.85, (family, acc)


@needs_checkpoint
def test_shipped_checkpoint_meets_target() -> None:
    # the bar for the shipped checkpoint on the first 200 test samples
    acc = dict(_shipped_accuracy())
    assert acc["overall"] >= 0.90, acc


def _count_attention_loss(split: list[float], sink_weight: float) -> torch.Tensor:
    """The attention loss of one answer row whose single head attends sink / v0 / v1 as
    ``split`` (the rest of the keys get 1e-6); the target set is the sink and v0, v1."""
    from tokensieve.zoo.lm_training import AttentionCapture

    lm = torch.nn.Module()
    lm.layers = torch.nn.ModuleList()  # no hooks: the store is filled by hand below
    capture = AttentionCapture(lm)
    # keys: [sink, text, v0, v1, v2, v3, answer]; logits log(a) give softmax = a
    attn = torch.tensor([split[0], 1e-6, split[1], split[2], 1e-6, 1e-6, 1e-6])
    keys = attn.log().view(1, 1, 7, 1)
    q = torch.ones(1, 1, 1, 1)
    capture.store = [(q, keys, 1.0)]
    targets = torch.tensor([[[True, True, True, False, False]]])
    return capture.loss(targets, torch.tensor([0]), n_text=2, count_sink_weight=sink_weight)


def test_count_split_loss_is_lowest_at_the_sink_share_that_encodes_the_count() -> None:
    grid = [(a, b, 1.0 - a - b) for a in np.arange(0.05, 0.95, 0.05)
            for b in np.arange(0.05, 0.95, 0.05) if 1.0 - a - b > 0.01]
    losses = [_count_attention_loss(list(s), 3.0).item() for s in grid]
    best = grid[int(np.argmin(losses))]
    # c = 3 and n = 2 objects: sink 3/5, each object 1/5
    assert best[0] == pytest.approx(0.6, abs=0.026) and best[1] == pytest.approx(0.2, abs=0.026)
    # the split term is a KL divergence: zero at the target split, mass term aside
    target = [0.6, 0.2, 0.2]
    gap = _count_attention_loss(target, 3.0) - _count_attention_loss(target, 0.0)
    assert abs(gap.item()) < 1e-4
    # without the split term only the mass on the set counts: every split scores the same
    plain = [_count_attention_loss(list(s), 0.0).item() for s in grid[::7]]
    assert max(plain) - min(plain) < 1e-3
