"""tokensieve.apply on video inputs: tiny random Qwen2-VL, Qwen2.5-VL (M-RoPE (t, h, w)
positions, Qwen2.5's seconds-per-grid step) and LLaVA-OneVision (frames pooled, one newline
per video), videos mixed with images in one batch.

References are computed another way: the untouched model runs on a sequence the test
prunes by hand (its own image and video features at the kept indices, spliced into the
prompt in order, with the untouched M-RoPE positions of the kept columns for Qwen). The
shared checks (tests/model_checks.py) compare patched and reference logits, batches with
single samples, and generation.
"""

from __future__ import annotations

import model_checks as checks
import pytest
import torch
from model_refs import splice_left_padded
from test_models_llava_onevision import PINPOINTS, tiny_onevision
from test_models_qwen_vl import IMG, VE, VID, VS, tiny_qwen
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.core import registry
from tokensieve.core.reduction import Reduction

SLOT = 63  # marks every visual placeholder for the splice helper

# -- a video method defined here: keeps the tokens of largest norm, checks what it gets ------
SEEN: list[dict] = []


def _norm_video(tokens, k, signals, config, generator):
    t, h, w = ts.core.signals.frame_grid(signals, tokens.shape[1], "test-video")
    SEEN.append({"frames": t, "grid": (h, w), "n": tokens.shape[1]})
    idx = tokens.float().norm(dim=-1).topk(k, dim=1).indices.sort(dim=1).values
    return Reduction(tokens=torch.gather(tokens, 1, idx[..., None].expand(-1, -1,
                                                                          tokens.shape[-1])),
                     indices=idx)


@pytest.fixture
def video_method(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "test-video", registry.MethodSpec(
        name="test-video", fn=_norm_video, paper="test", stage="pre-llm", kind="subset",
        signals=("frames",), optional_signals=("grid",)))
    SEEN.clear()
    return "test-video"


# -- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------
QWEN_IMAGE = (1, 8, 8)  # 16 merged tokens
QWEN_VIDEOS = [(2, 4, 8), (3, 4, 4)]  # 2 frames of 2x4, 3 frames of 2x2 merged tokens
# (text chunks, visual items: ("image", grid) / ("video", grid)) per sample
QWEN_SAMPLES = [
    ([[1, 5, 6], [7], [8, 9]], [("image", QWEN_IMAGE), ("video", QWEN_VIDEOS[0])]),
    ([[1, 11], [12, 13]], [("video", QWEN_VIDEOS[1])]),
    ([[1, 15, 16, 17]], []),
]


def _patches(grid, channels: int) -> torch.Tensor:
    t, h, w = grid
    return torch.randn(t * h * w, channels,
                       generator=torch.Generator().manual_seed(1000 * t + 100 * h + w))


def qwen_inputs(model, samples: list[int], side: str = "left") -> dict:
    chosen = [QWEN_SAMPLES[s] for s in samples]
    rows, images, videos = [], [], []
    for chunks, items in chosen:
        runs = []
        for kind, grid in items:
            token = IMG if kind == "image" else VID
            runs.append([VS] + [token] * (grid[0] * grid[1] * grid[2] // 4) + [VE])
            (images if kind == "image" else videos).append(grid)
        rows.append(checks.interleave(chunks, runs))
    ids, mask = checks.pad_rows(rows, side)
    types = (ids == IMG).int() + 2 * (ids == VID).int()
    kw = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types)
    channels = 3 * 2 * 2 * 2
    if images:
        kw.update(pixel_values=torch.cat([_patches(g, channels) for g in images]),
                  image_grid_thw=torch.tensor(images))
    if videos:
        kw.update(pixel_values_videos=torch.cat([_patches(g, channels) for g in videos]),
                  video_grid_thw=torch.tensor(videos))
        if hasattr(model.model.visual, "window_size"):  # Qwen2.5: seconds per temporal patch
            kw["second_per_grid_ts"] = torch.tensor([0.5 * g[0] for g in videos])
    return kw


def _in_prompt_order(ids: torch.Tensor, mask: torch.Tensor, images: list, videos: list,
                     ids_of: tuple[int, int]) -> tuple[list, list[int]]:
    """Image and video features interleaved in the order their runs appear."""
    out, lengths, img, vid = [], [], 0, 0
    for b in range(ids.shape[0]):
        prev = None
        for t in range(ids.shape[1]):
            tok = int(ids[b, t]) if mask[b, t] else None
            if tok in ids_of and tok != prev:
                f = images[img] if tok == ids_of[0] else videos[vid]
                img, vid = img + (tok == ids_of[0]), vid + (tok == ids_of[1])
                out.append(f)
                lengths.append(f.shape[0])
            prev = tok
    return out, lengths


@torch.no_grad()
def qwen_reference(model, kw, kept) -> dict:
    ids, mask = kw["input_ids"], kw["attention_mask"]
    images = list(model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])
                  .pooler_output) if "pixel_values" in kw else []
    videos = list(model.model.get_video_features(kw["pixel_values_videos"],
                                                 kw["video_grid_thw"]).pooler_output)
    feats, lengths = _in_prompt_order(ids, mask, images, videos, (IMG, VID))
    extra = {k: kw[k] for k in ("second_per_grid_ts",) if k in kw}
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=kw["mm_token_type_ids"],
                                        image_grid_thw=kw.get("image_grid_thw"),
                                        video_grid_thw=kw["video_grid_thw"],
                                        attention_mask=mask, **extra)
    marked = ids.masked_fill((ids == IMG) | (ids == VID), SLOT)
    emb = model.get_input_embeddings()(ids)
    pieces = [f[k] for f, k in zip(feats, kept, strict=True)]
    embeds, new_mask, source = splice_left_padded(marked, mask, emb, SLOT, pieces, lengths, kept)
    new_pos = torch.stack([pos[:, b, source[b]] for b in range(ids.shape[0])], 1) * new_mask
    return dict(inputs_embeds=embeds, attention_mask=new_mask, position_ids=new_pos)


QWEN = checks.Family(inputs=qwen_inputs, reference=qwen_reference)




# -- LLaVA-OneVision --------------------------------------------------------------------------
OV_IMG, OV_VID = 60, 61
OV_FRAMES = 3
OV_SAMPLES = [([[1, 5, 6], [7], [8, 9]], ["video", "image"]), ([[1, 11], [12]], ["video"]),
              ([[1, 15, 16]], [])]


def ov_inputs(model, samples: list[int], side: str = "left") -> dict:
    chosen = [OV_SAMPLES[s] for s in samples]
    images = [s for s in samples for kind in OV_SAMPLES[s][1] if kind == "image"]
    videos = [s for s in samples for kind in OV_SAMPLES[s][1] if kind == "video"]
    kw: dict = {}
    image_len = 0
    if images:  # one image per sample: the anyres crops of a 28x28 image
        crops = image_size_to_num_patches(torch.tensor([28, 28]), PINPOINTS, 28)
        pv = torch.stack([torch.randn(crops, 3, 28, 28,
                                      generator=torch.Generator().manual_seed(s))
                          for s in images])
        kw.update(pixel_values=pv, image_sizes=torch.tensor([[28, 28]] * len(images)))
        with torch.no_grad():
            image_len = model.model.get_image_features(
                pv, kw["image_sizes"]).pooler_output[0].shape[0]
    if videos:
        kw["pixel_values_videos"] = torch.stack([
            torch.randn(OV_FRAMES, 3, 28, 28, generator=torch.Generator().manual_seed(50 + s))
            for s in videos])
    video_len = OV_FRAMES * 16 + 1
    rows = []
    for chunks, items in chosen:
        runs = [[OV_IMG] * image_len if k == "image" else [OV_VID] * video_len for k in items]
        rows.append(checks.interleave(chunks, runs))
    ids, mask = checks.pad_rows(rows, side)
    return dict(input_ids=ids, attention_mask=mask, **kw)


@torch.no_grad()
def ov_reference(model, kw, kept) -> dict:
    ids, mask = kw["input_ids"], kw["attention_mask"]
    images = list(model.model.get_image_features(kw["pixel_values"], kw["image_sizes"])
                  .pooler_output) if "pixel_values" in kw else []
    videos = list(model.model.get_video_features(kw["pixel_values_videos"]).pooler_output)
    feats, lengths = _in_prompt_order(ids, mask, images, videos, (OV_IMG, OV_VID))
    marked = ids.masked_fill((ids == OV_IMG) | (ids == OV_VID), SLOT)
    emb = model.get_input_embeddings()(ids)
    pieces = []
    for f, k in zip(feats, kept, strict=True):
        if k.shape[0] < f.shape[0] and f.shape[0] == OV_FRAMES * 16 + 1:  # a video: + newline
            k = torch.cat([k, torch.tensor([f.shape[0] - 1])])
        pieces.append(f[k])
    embeds, new_mask, _ = splice_left_padded(marked, mask, emb, SLOT, pieces, lengths)
    return dict(inputs_embeds=embeds, attention_mask=new_mask)


OV = checks.Family(inputs=ov_inputs, reference=ov_reference)


@pytest.fixture(scope="module", params=["qwen2", "qwen2.5", "onevision"])
def family(request):
    """``(name, Family, model)``."""
    if request.param == "onevision":
        return "onevision", OV, tiny_onevision()
    return "qwen", QWEN, tiny_qwen(request.param)


# (a) keep everything ------------------------------------------------------------------------
@pytest.mark.parametrize("method,video", [("random", "clip"), ("divprune", "frame"),
                                          ("evs", None),
                                          ("frame-sample", None)])
def test_keep_all_equals_untouched(family, method, video):
    name, case, model = family
    kw = case.batch(model)
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, method, 1.0, video=video):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=checks.ATOL, rtol=0)


# (b) pruned == the untouched model on the hand-pruned sequence ------------------------------
@pytest.mark.parametrize("method,keep,video", [("random", 0.4, "clip"),
                                               ("divprune", 0.5, "frame"),
                                               ("divprune", 3, "frame")])
def test_pruned_equals_hand_pruned(family, method, keep, video):
    name, case, model = family
    kw = case.batch(model)
    with tm.applied(model, method, keep, video=video), torch.no_grad():
        out = model(**kw).logits
        kept = [r.indices[0] for r, _ in tm.last_reductions(model)]
    ref_kw = case.reference(model, kw, kept)
    with torch.no_grad():
        ref = model(**ref_kw).logits
    real = ref_kw["attention_mask"].bool()
    assert out.shape == ref.shape
    torch.testing.assert_close(out[real], ref[real], atol=checks.ATOL, rtol=0)


def test_video_method_reduces_videos_only(family, video_method):
    name, case, model = family
    kw = case.batch(model)
    with tm.applied(model, video_method, 0.5), torch.no_grad():
        out = model(**kw).logits
        kept = [r.indices[0] for r, _ in tm.last_reductions(model)]
    ref_kw = case.reference(model, kw, kept)
    with torch.no_grad():
        ref = model(**ref_kw).logits
    real = ref_kw["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=checks.ATOL, rtol=0)
    assert {s["frames"] for s in SEEN} == ({2, 3} if name == "qwen" else {OV_FRAMES})
    assert {s["grid"] for s in SEEN} == ({(2, 4), (2, 2)} if name == "qwen" else {(4, 4)})
    # the image is whole; each video keeps half of its frames' tokens
    halves = sorted(ts.core.budget.resolve_keep(0.5, s["n"]) for s in SEEN for _ in range(
        1 if name == "qwen" else 2))
    lengths = sorted(int(k.shape[0]) for k in kept)
    assert lengths[:2] == halves
    image = [k for k in kept if int(k.shape[0]) not in halves]
    assert len(image) == 1 and torch.equal(image[0], torch.arange(image[0].shape[0]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_batch_equals_single_samples(family, side):
    name, case, model = family
    kw = case.batch(model, side)
    with tm.applied(model, "divprune", 0.5, video="frame"), torch.no_grad():
        out = model(**kw).logits
        for i in range(case.samples):
            one = model(**case.inputs(model, [i])).logits[0]
            row = out[i, -one.shape[0]:] if side == "left" else out[i, :one.shape[0]]
            torch.testing.assert_close(row, one, atol=checks.BATCH_ATOL, rtol=0)


def test_generate_batch_equals_single(family):
    name, case, model = family
    kw = case.batch(model)
    gen = checks.gen_kwargs(4)
    with tm.applied(model, "random", 0.5, video="clip"), torch.no_grad():
        out = model.generate(**kw, **gen)
        for i in range(case.samples):
            one_kw = case.inputs(model, [i])
            one = model.generate(**one_kw, **gen)
            assert torch.equal(out[i, kw["input_ids"].shape[1]:], one[0, one_kw["input_ids"]
                                                                       .shape[1]:])


def test_errors(family):
    _, _, model = family
    with pytest.raises(ValueError, match="video='frames'"):
        tm.apply(model, "divprune", 0.5, video="frames")
    with pytest.raises(ValueError, match="stage 'llm'"):
        tm.apply(model, "fastv", video="clip")
    assert not tm.is_applied(model)


# (c) every video method: the LLM gets what the method made of the model's own clip tokens --
def _recording(monkeypatch, method: str) -> list:
    """Wrap ``method``'s function: each call's (tokens, signals, result) is recorded."""
    spec = registry.get_method(method)
    calls = []

    def fn(tokens, k, signals, config, generator):
        r = spec.fn(tokens, k, signals, config, generator)
        calls.append((tokens.clone(), signals, r))
        return r

    monkeypatch.setitem(registry._REGISTRY, method, registry.dataclasses.replace(spec, fn=fn))
    return calls


VIDEO_METHODS = [m for m in ts.list_methods() if "frames" in ts.describe(m).signals]
VIDEO_KEEPS = {"dycoke": 0.8, "frame-sample": 0.5}


@pytest.mark.parametrize("method", VIDEO_METHODS)
def test_video_method_output_reaches_the_llm(family, method, monkeypatch):
    name, case, model = family
    calls = _recording(monkeypatch, method)
    kw = case.batch(model)
    with tm.applied(model, method, VIDEO_KEEPS.get(method, 0.5), llm=None), torch.no_grad():
        out = model(**kw).logits
        reductions = tm.last_reductions(model)
    # the method saw the untouched model's tokens of each video, with frames and grid
    with torch.no_grad():
        if name == "qwen":
            videos = list(model.model.get_video_features(
                kw["pixel_values_videos"], kw["video_grid_thw"]).pooler_output)
        else:
            videos = [v[:-1] for v in model.model.get_video_features(
                kw["pixel_values_videos"]).pooler_output]
    seen = [row for tokens, _, _ in calls for row in tokens]
    assert sorted(s.shape[0] for s in seen) == sorted(v.shape[0] for v in videos)
    for v in videos:
        assert any(s.shape == v.shape and torch.allclose(s, v, atol=1e-6) for s in seen)
    for _, signals, _ in calls:
        assert signals.frames is not None and signals.grid is not None
    # the reference: each video's run replaced by the method's output (at its positions)
    ids, mask = kw["input_ids"], kw["attention_mask"]
    image_id, video_id = (IMG, VID) if name == "qwen" else (OV_IMG, OV_VID)
    with torch.no_grad():
        if "pixel_values" in kw:
            args = (kw["pixel_values"], kw["image_grid_thw"] if name == "qwen"
                    else kw["image_sizes"])
            images = list(model.model.get_image_features(*args).pooler_output)
        else:
            images = []
        full_videos = list(model.model.get_video_features(
            *((kw["pixel_values_videos"], kw["video_grid_thw"]) if name == "qwen"
              else (kw["pixel_values_videos"],))).pooler_output)
    feats, lengths = _in_prompt_order(ids, mask, images, full_videos, (image_id, video_id))
    pieces, columns = [], []
    for f, (r, _) in zip(feats, reductions, strict=True):
        piece, pos = r.tokens[0].to(f.dtype), r.positions[0]
        if name == "onevision" and f.shape[0] == OV_FRAMES * 16 + 1 and \
                piece.shape[0] < f.shape[0]:  # a video: its newline after the kept tokens
            piece = torch.cat([piece, f[-1:]])
            pos = torch.cat([pos, torch.tensor([f.shape[0] - 1])])
        pieces.append(piece)
        columns.append(pos)
    marked = ids.masked_fill((ids == image_id) | (ids == video_id), SLOT)
    emb = model.get_input_embeddings()(ids)
    embeds, new_mask, source = splice_left_padded(marked, mask, emb, SLOT, pieces, lengths,
                                                  columns)
    ref_kw = dict(inputs_embeds=embeds, attention_mask=new_mask)
    if name == "qwen":
        extra = {k: kw[k] for k in ("second_per_grid_ts",) if k in kw}
        pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=kw["mm_token_type_ids"],
                                            image_grid_thw=kw.get("image_grid_thw"),
                                            video_grid_thw=kw["video_grid_thw"],
                                            attention_mask=mask, **extra)
        ref_kw["position_ids"] = torch.stack(
            [pos[:, b, source[b]] for b in range(ids.shape[0])], 1) * new_mask
    with torch.no_grad():
        ref = model(**ref_kw).logits
    real = new_mask.bool()
    assert out.shape == ref.shape
    torch.testing.assert_close(out[real], ref[real], atol=checks.ATOL, rtol=0)
