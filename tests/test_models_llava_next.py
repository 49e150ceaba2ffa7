"""tokensieve.apply on a tiny random LlavaNextForConditionalGeneration (anyres: overview
+ crops, unpadding, image newlines, images of different sizes).

References: the untouched model's own packed image features, gathered at the kept
indices and spliced into the prompt by the test, run through the untouched LLM.
The checks themselves are shared (tests/model_checks.py).
"""

from __future__ import annotations

import model_checks as checks
import pytest
import torch
from model_refs import splice_left_padded
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import tokensieve.models as tm

IMG = 60
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
SIZES = [(30, 50), (40, 40), (50, 24)]  # (H, W) of three images


def tiny_next(seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=28, patch_size=4,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMG,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=PINPOINTS)
    return LlavaNextForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_next()


def crops_of(size) -> int:
    return image_size_to_num_patches(torch.tensor(size), PINPOINTS, 28)


def pixels(size_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values [I, max_crops, 3, 28, 28] (zero-padded) of images SIZES[j] (each image's
    pixels depend on j only) and image_sizes [I, 2]."""
    crops = [crops_of(SIZES[j]) for j in size_ids]
    pv = torch.zeros(len(size_ids), max(crops), 3, 28, 28)
    for i, j in enumerate(size_ids):
        pv[i, :crops[i]] = torch.randn(crops[i], 3, 28, 28,
                                       generator=torch.Generator().manual_seed(j))
    return pv, torch.tensor([SIZES[j] for j in size_ids])


def image_lengths(model, size_ids: list[int]) -> list[int]:
    """How many packed tokens each image ``SIZES[j]`` gives."""
    pv, sizes = pixels(size_ids)
    with torch.no_grad():
        return [f.shape[0] for f in model.model.get_image_features(pv, sizes).pooler_output]


@pytest.fixture(scope="module")
def lengths(model):
    return image_lengths(model, [0, 1, 2])


# rows: (text chunks, image ids between them)
SAMPLES = [([[1, 5, 6], [7, 8]], [0]), ([[1, 11], [12], [13, 14]], [1, 2]),
           ([[1, 15, 16, 17]], [])]


def inputs(model, samples: list[int], side: str = "left") -> dict:
    imgs = [j for s in samples for j in SAMPLES[s][1]]
    lens = dict(zip(imgs, image_lengths(model, imgs), strict=True)) if imgs else {}
    rows = [checks.interleave(chunks, [[IMG] * lens[j] for j in ids_])
            for chunks, ids_ in (SAMPLES[s] for s in samples)]
    ids, mask = checks.pad_rows(rows, side)
    kw = dict(input_ids=ids, attention_mask=mask)
    if imgs:
        kw["pixel_values"], kw["image_sizes"] = pixels(imgs)
    return kw


@torch.no_grad()
def hand_pruned(model, kw, kept) -> dict:
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = list(model.model.get_image_features(kw["pixel_values"], kw["image_sizes"])
                 .pooler_output)
    emb = model.get_input_embeddings()(ids)
    pieces = [f[k] for f, k in zip(feats, kept, strict=True)]
    embeds, new_mask, _ = splice_left_padded(ids, mask, emb, IMG, pieces,
                                             [f.shape[0] for f in feats])
    return dict(inputs_embeds=embeds, attention_mask=new_mask)


CASE = checks.Family(inputs=inputs, reference=hand_pruned)


@pytest.mark.parametrize("method", ["fastervlm", "random", "divprune", "vtc-cls"])
def test_keep_all_equals_untouched(model, method):
    checks.keep_all_equals_untouched(CASE, model, method, 1.0)


@pytest.mark.parametrize("method,keep", [("fastervlm", 0.25), ("divprune", 40), ("random", 0.5)])
def test_pruned_equals_hand_pruned(model, lengths, method, keep):
    kept = checks.pruned_equals_hand_pruned(CASE, model, method, keep)
    expect = [keep if isinstance(keep, int) else round(keep * n) for n in lengths]
    assert [len(k) for k in kept] == expect


def test_fastervlm_keeps_every_newline_and_shares_the_budget(model, lengths):
    kw = inputs(model, [0])
    with torch.no_grad():
        packed = model.model.get_image_features(kw["pixel_values"], kw["image_sizes"])
        packed = packed.pooler_output[0]
    newline = (packed == model.model.image_newline).all(-1).nonzero()[:, 0]
    assert len(newline) > 0
    with tm.applied(model, "fastervlm", 0.3), torch.no_grad():
        model(**kw)
        (r, _), = tm.last_reductions(model)
    kept = set(r.indices[0].tolist())
    assert set(newline.tolist()) <= kept
    # The overview (first 49 tokens) gets its share of the budget by size.
    n_over = sum(1 for i in kept if i < 49)
    share = (len(kept) - len(newline)) * 49 / (lengths[0] - len(newline))
    assert abs(n_over - share) <= 1


def test_vision_method_merges_before_the_projector(model, lengths):
    kw = inputs(model, [0])
    with tm.applied(model, "visionzip", 30), torch.no_grad():
        out = model(**kw).logits
    assert out.shape[1] == kw["input_ids"].shape[1] - lengths[0] + 30


def test_generate_matches_hand_pruned(model):
    checks.generate_matches_hand_pruned(CASE, model, "fastervlm", 0.2)


def test_generate_keep_all_equals_untouched(model):
    checks.generate_keep_all_equals_untouched(CASE, model, "fastervlm", 1.0)


def test_remove_restores_exactly(model):
    checks.remove_restores_exactly(CASE, model, "fastervlm", 0.1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(model, side):
    checks.batch_equals_single_samples(CASE, model, "fastervlm", 0.3, side)


def test_batch_generate_equals_single(model):
    checks.batch_generate_equals_single(CASE, model, "fastervlm", 0.3)


def test_errors(model, lengths):
    kw = inputs(model, [0])
    for method, opts in [("uniform", {}), ("pool", {}), ("dct", {}), ("hiprune", {}),
                         ("fopru", {"mode": "row"})]:  # packed: no grid, refused at apply
        checks.apply_refused(model, method, 20, "grid", **opts)
    with tm.applied(model, "fopru", 20), torch.no_grad():  # its rank mode needs no grid
        model(**inputs(model, [1]))
    checks.call_refused(model, kw, "fastervlm", 1000, rf"keep=1000.*{lengths[0]} visual")
    checks.call_refused(model, {k: v for k, v in kw.items() if k != "image_sizes"},
                        "fastervlm", 10, "image_sizes")


@pytest.mark.parametrize("method", ["hired", "globalcom2"])
def test_partition_methods_select_on_whole_crops(model, lengths, method):
    """HiRED / GlobalCom2 see [overview | crops] with n tokens each; the kept tokens are
    packed by the model (stitched, unpadded) without newlines. What they keep is laid out
    by the model's own packing of a mask over the crops, and ``last_reductions`` reports
    exactly what the LLM gets: the kept tokens, indexed in the packed layout."""
    kw = inputs(model, [0, 1, 2])
    with tm.applied(model, method, 0.3), torch.no_grad():
        out = model(**kw).logits
        reds = [r for r, _ in tm.last_reductions(model)]
    crops = [crops_of(SIZES[j]) for j in (0, 1, 2)]
    with torch.no_grad():
        feats = list(model.model.get_image_features(kw["pixel_values"], kw["image_sizes"])
                     .pooler_output)
    for r, c, f, n in zip(reds, crops, feats, lengths, strict=True):
        # official rounding floors every partition's share; unpadding may drop more
        assert r.indices.shape[1] <= round(0.3 * c * 49)
        assert bool((r.indices[0] < n).all()) and bool((torch.diff(r.indices[0]) > 0).all())
        assert not bool(torch.isclose(f[r.indices[0]], model.model.image_newline).all(-1).any())
        torch.testing.assert_close(r.tokens[0], f[r.indices[0]], atol=checks.ATOL, rtol=0)
    ref = hand_pruned(model, kw, [r.indices[0] for r in reds])
    hmask = ref["attention_mask"].bool()
    with torch.no_grad():
        expect = model(**ref).logits
    assert out.shape == expect.shape
    torch.testing.assert_close(out[hmask], expect[hmask], atol=checks.ATOL, rtol=0)

