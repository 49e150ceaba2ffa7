"""tokensieve.apply on a tiny random LlavaOnevisionForConditionalGeneration (SigLIP without
CLS, "full" features, anyres packing with ``anyres_max`` shrinking, multi-image samples
encoded without crops).

References: the untouched model's packed image features at the kept indices spliced into
the prompt by the test; eager attention weights packed by the model for the signal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_refs import kept_indices, splice_left_padded
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import tokensieve.models as tm

IMG = 60
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
SIZES = [(30, 50), (56, 56), (40, 24)]
ATOL = 1e-5


def tiny_onevision(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=28, patch_size=4),
        text_config=dict(model_type="qwen2", vocab_size=64, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0),
        image_token_index=IMG, video_token_index=61, image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_1")  # shrinks the 14x14 crop map (bilinear)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


# (text chunks, image ids); sample 1 has two images: encoded without crops
SAMPLES = [([[1, 5, 6], [7, 8]], [0]), ([[1, 11], [12], [13, 14]], [1, 2]), ([[1, 15, 16]], [])]


def encode_inputs(samples):
    imgs = [j for _, ids in samples for j in ids]
    per_sample = [len(ids) for _, ids in samples]
    patching = [n == 1 for n in per_sample for _ in range(n)]
    crops = [image_size_to_num_patches(torch.tensor(SIZES[j]), PINPOINTS, 28) if p else 1
             for j, p in zip(imgs, patching, strict=True)]
    pv = torch.zeros(len(imgs), max(crops), 3, 28, 28)
    for i, (j, c) in enumerate(zip(imgs, crops, strict=True)):
        pv[i, :c] = torch.randn(c, 3, 28, 28, generator=torch.Generator().manual_seed(j))[:c]
    return pv, torch.tensor([SIZES[j] for j in imgs]), torch.tensor(per_sample)


def inputs(model, samples, side="left"):
    kw = {}
    if any(ids for _, ids in samples):
        pv, sizes, per_sample = encode_inputs(samples)
        kw = dict(pixel_values=pv, image_sizes=sizes, batch_num_images=per_sample)
        with torch.no_grad():
            lens = [f.shape[0] for f in model.model.get_image_features(
                pv, sizes, batch_num_images=per_sample).pooler_output]
    rows, img = [], 0
    for chunks, _ in samples:
        row: list[int] = []
        for i, chunk in enumerate(chunks):
            if i:
                row += [IMG] * lens[img]
                img += 1
            row += chunk
        rows.append(row)
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return dict(input_ids=ids, attention_mask=mask, **kw)


@torch.no_grad()
def hand_pruned(model, kw, kept):
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = list(model.model.get_image_features(
        kw["pixel_values"], kw["image_sizes"], batch_num_images=kw["batch_num_images"])
        .pooler_output)
    emb = model.get_input_embeddings()(ids)
    pieces = [f[k] for f, k in zip(feats, kept, strict=True)]
    return splice_left_padded(ids, mask, emb, IMG, pieces, [f.shape[0] for f in feats])


@pytest.mark.parametrize("method", ["random", "divprune", "fopru"])
def test_keep_all_equals_untouched(model, method):
    kw = inputs(model, SAMPLES)
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, method, 1.0):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,keep", [("divprune", 0.3), ("fopru", 20), ("random", 0.5)])
def test_pruned_equals_hand_pruned(model, method, keep):
    kw = inputs(model, SAMPLES)
    with tm.applied(model, method, keep), torch.no_grad():
        out = model(**kw).logits
        kept = kept_indices(model)
    embeds, mask = hand_pruned(model, kw, kept)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


def test_attn_received_is_packed_like_the_tokens(model):
    """The per-crop attention received (eager weights, head- and query-mean) packed by the
    model's own packing (unpad, shrink, newlines at 0) is what the method gets."""
    from tokensieve.core import registry

    kw = inputs(model, SAMPLES[:1])
    pv, sizes = kw["pixel_values"], kw["image_sizes"]
    crops = image_size_to_num_patches(sizes[0], PINPOINTS, 28)
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(pv[0, :crops], output_attentions=True).attentions[-1]  # last layer
        recv = att.mean(dim=(1, 2))[:, :, None]  # [crops, 49, 1]
        packed, _ = model.model.pack_image_features(
            [recv], sizes, image_newline=torch.zeros(1), vision_aspect_ratio="anyres_max_1")
    expect = packed[0][:, 0][None]
    spec = registry.get_method("fopru")
    seen = {}

    def spy(tokens, k, signals, config, generator):
        seen["attn"] = signals.attn_received
        return spec.fn(tokens, k, signals, config, generator)

    registry._REGISTRY["fopru"] = spec.__class__(**{**spec.__dict__, "fn": spy})
    try:
        with tm.applied(model, "fopru", 10), torch.no_grad():
            model(**kw)
    finally:
        registry._REGISTRY["fopru"] = spec
    torch.testing.assert_close(seen["attn"], expect, atol=1e-6, rtol=1e-5)


def test_generate_matches_hand_pruned(model):
    kw = inputs(model, SAMPLES)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with tm.applied(model, "divprune", 0.25), torch.no_grad():
        out = model.generate(**kw, **gen)
        kept = kept_indices(model)
    ids = kw["input_ids"]
    assert torch.equal(out[:, :ids.shape[1]], ids)
    embeds, mask = hand_pruned(model, kw, kept)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
    assert torch.equal(out[:, ids.shape[1]:], ref)


def test_remove_restores_exactly(model):
    kw = inputs(model, SAMPLES)
    keys = set(model.__dict__)
    with torch.no_grad():
        ref = model(**kw).logits
        tm.apply(model, "divprune", 0.1)
        assert model(**kw).logits.shape != ref.shape
        tm.remove(model)
        out = model(**kw).logits
    assert torch.equal(out, ref) and set(model.__dict__) == keys


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(model, side):
    kw = inputs(model, SAMPLES, side)
    with tm.applied(model, "fopru", 0.4), torch.no_grad():
        out = model(**kw).logits
        for i, sample in enumerate(SAMPLES):
            one = model(**inputs(model, [sample])).logits[0]
            row = out[i, -one.shape[0]:] if side == "left" else out[i, :one.shape[0]]
            torch.testing.assert_close(row, one, atol=1e-4, rtol=0)


def test_errors(model):
    with pytest.raises(ValueError, match="cls_attn"):
        tm.apply(model, "fastervlm", 8)
    with pytest.raises(ValueError, match="partitions|cls_attn"):
        tm.apply(model, "hired", 8)
    kw = inputs(model, SAMPLES[:1])
    with pytest.raises(ValueError, match="keep=1000"), torch.no_grad():
        with tm.applied(model, "divprune", 1000):
            model(**kw)
    assert not tm.is_applied(model)
