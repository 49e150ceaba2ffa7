"""tokensieve.apply on a tiny random LlavaNextForConditionalGeneration (anyres: overview
+ crops, unpadding, image newlines, images of different sizes).

References: the untouched model's own packed image features, gathered at the kept
indices and spliced into the prompt by the test, run through the untouched LLM.
"""

from __future__ import annotations

import pytest
import torch
from model_refs import kept_indices, splice_left_padded
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
ATOL = 1e-5
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


@pytest.fixture(scope="module")
def lengths(model):
    pv, sizes = pixels([0, 1, 2])
    with torch.no_grad():
        return [f.shape[0] for f in model.model.get_image_features(pv, sizes).pooler_output]


# rows: (text chunks, image ids between them)
SAMPLES = [([[1, 5, 6], [7, 8]], [0]), ([[1, 11], [12], [13, 14]], [1, 2]),
           ([[1, 15, 16, 17]], [])]


def inputs(model, lengths, samples, side="left"):
    rows, imgs = [], []
    for chunks, ids_ in samples:
        row: list[int] = []
        for i, chunk in enumerate(chunks):
            if i:
                row += [IMG] * lengths[ids_[i - 1]]
            row += chunk
        rows.append(row)
        imgs += ids_
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    kw = dict(input_ids=ids, attention_mask=mask)
    if imgs:
        kw["pixel_values"], kw["image_sizes"] = pixels(imgs)
    return kw


@torch.no_grad()
def hand_pruned(model, kw, kept):
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = list(model.model.get_image_features(kw["pixel_values"], kw["image_sizes"])
                 .pooler_output)
    emb = model.get_input_embeddings()(ids)
    pieces = [f[k] for f, k in zip(feats, kept, strict=True)]
    return splice_left_padded(ids, mask, emb, IMG, pieces, [f.shape[0] for f in feats])


@pytest.mark.parametrize("method", ["fastervlm", "random", "divprune", "vtc-cls"])
def test_keep_all_equals_untouched(model, lengths, method):
    kw = inputs(model, lengths, SAMPLES)
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, method, 1.0):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,keep", [("fastervlm", 0.25), ("divprune", 40), ("random", 0.5)])
def test_pruned_equals_hand_pruned(model, lengths, method, keep):
    kw = inputs(model, lengths, SAMPLES)
    with tm.applied(model, method, keep), torch.no_grad():
        out = model(**kw).logits
        kept = kept_indices(model)
    expect = [keep if isinstance(keep, int) else round(keep * n) for n in lengths]
    assert [len(k) for k in kept] == expect
    embeds, mask = hand_pruned(model, kw, kept)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=mask).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


def test_fastervlm_keeps_every_newline_and_shares_the_budget(model, lengths):
    kw = inputs(model, lengths, SAMPLES[:1])
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
    kw = inputs(model, lengths, SAMPLES[:1])
    with tm.applied(model, "visionzip", 30), torch.no_grad():
        out = model(**kw).logits
    assert out.shape[1] == kw["input_ids"].shape[1] - lengths[0] + 30


def test_generate_matches_hand_pruned(model, lengths):
    kw = inputs(model, lengths, SAMPLES)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with tm.applied(model, "fastervlm", 0.2), torch.no_grad():
        out = model.generate(**kw, **gen)
        kept = kept_indices(model)
    ids = kw["input_ids"]
    assert torch.equal(out[:, :ids.shape[1]], ids)
    embeds, mask = hand_pruned(model, kw, kept)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
    assert torch.equal(out[:, ids.shape[1]:], ref)


def test_remove_restores_exactly(model, lengths):
    kw = inputs(model, lengths, SAMPLES)
    keys = set(model.__dict__)
    with torch.no_grad():
        ref = model(**kw).logits
        tm.apply(model, "fastervlm", 0.1)
        assert model(**kw).logits.shape != ref.shape
        tm.remove(model)
        out = model(**kw).logits
    assert torch.equal(out, ref) and set(model.__dict__) == keys


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(model, lengths, side):
    kw = inputs(model, lengths, SAMPLES, side)
    with tm.applied(model, "fastervlm", 0.3), torch.no_grad():
        out = model(**kw).logits
        for i, sample in enumerate(SAMPLES):
            one = model(**inputs(model, lengths, [sample])).logits[0]
            row = out[i, -one.shape[0]:] if side == "left" else out[i, :one.shape[0]]
            torch.testing.assert_close(row, one, atol=1e-4, rtol=0)


def test_errors(model, lengths):
    kw = inputs(model, lengths, SAMPLES[:1])
    with pytest.raises(ValueError, match="grid"), torch.no_grad():
        with tm.applied(model, "uniform", 20):  # a packed set is no grid (259 tokens)
            model(**inputs(model, lengths, SAMPLES[1:2]))
    with pytest.raises(ValueError, match=rf"keep=1000.*{lengths[0]} visual"), torch.no_grad():
        with tm.applied(model, "fastervlm", 1000):
            model(**kw)
    with pytest.raises(ValueError, match="image_sizes"), torch.no_grad():
        with tm.applied(model, "fastervlm", 10):
            model(**{k: v for k, v in kw.items() if k != "image_sizes"})
    assert not tm.is_applied(model)


@pytest.mark.parametrize("method", ["hired", "globalcom2"])
def test_partition_methods_select_on_whole_crops(model, lengths, method):
    """HiRED / GlobalCom2 see [overview | crops] with n tokens each; the kept tokens are
    packed by the model (stitched, unpadded) without newlines."""
    kw = inputs(model, lengths, SAMPLES)
    with tm.applied(model, method, 0.3), torch.no_grad():
        out = model(**kw).logits
        reds = [r for r, _ in tm.last_reductions(model)]
    crops = [crops_of(SIZES[j]) for j in (0, 1, 2)]
    assert [r.indices.shape[1] for r in reds] == [round(0.3 * c * 49) for c in crops]
    with torch.no_grad():  # the test's own packing of masks and features
        pv = torch.cat([p[:c] for p, c in zip(kw["pixel_values"], crops, strict=True)])
        hidden = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-2]
        per_crop = torch.split(model.model.multi_modal_projector(hidden[:, 1:]), crops)
        masks = []
        for r, c in zip(reds, crops, strict=True):
            m = torch.zeros(c * 49)
            m[r.indices[0]] = 1
            masks.append(m.reshape(c, 49, 1))
        sizes = kw["image_sizes"]
        packed_m, _ = model.model.pack_image_features(masks, sizes, "default", None)
        packed_f, _ = model.model.pack_image_features(list(per_crop), sizes, "default", None)
    kept_feats = [f[m[:, 0] > 0.5] for f, m in zip(packed_f, packed_m, strict=True)]
    assert all(len(f) <= r.indices.shape[1] for f, r in zip(kept_feats, reds, strict=True))
    ids, mask = kw["input_ids"], kw["attention_mask"]
    emb = model.get_input_embeddings()(ids)
    embeds, hmask = splice_left_padded(ids, mask, emb, IMG, kept_feats, lengths)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds.detach(), attention_mask=hmask).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out[hmask.bool()], ref[hmask.bool()], atol=ATOL, rtol=0)

