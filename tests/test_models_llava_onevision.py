"""tokensieve.apply on a tiny random LlavaOnevisionForConditionalGeneration (SigLIP without
CLS, "full" features, anyres packing with ``anyres_max`` shrinking, multi-image samples
encoded without crops).

References: the untouched model's packed image features at the kept indices spliced into
the prompt by the test; eager attention weights packed by the model for the signal.
The checks themselves are shared (tests/model_checks.py).
"""

from __future__ import annotations

import copy

import model_checks as checks
import pytest
import torch
from model_refs import splice_left_padded
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

IMG = 60
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
SIZES = [(30, 50), (56, 56), (40, 24)]


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


def inputs(model, samples: list[int], side: str = "left") -> dict:
    chosen = [SAMPLES[s] for s in samples]
    kw, lens = {}, []
    if any(ids for _, ids in chosen):
        pv, sizes, per_sample = encode_inputs(chosen)
        kw = dict(pixel_values=pv, image_sizes=sizes, batch_num_images=per_sample)
        with torch.no_grad():
            lens = [f.shape[0] for f in model.model.get_image_features(
                pv, sizes, batch_num_images=per_sample).pooler_output]
    rows, img = [], 0
    for chunks, _ in chosen:
        runs = [[IMG] * n for n in lens[img:img + len(chunks) - 1]]
        rows.append(checks.interleave(chunks, runs))
        img += len(runs)
    ids, mask = checks.pad_rows(rows, side)
    return dict(input_ids=ids, attention_mask=mask, **kw)


@torch.no_grad()
def hand_pruned(model, kw, kept) -> dict:
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = list(model.model.get_image_features(
        kw["pixel_values"], kw["image_sizes"], batch_num_images=kw["batch_num_images"])
        .pooler_output)
    emb = model.get_input_embeddings()(ids)
    pieces = [f[k] for f, k in zip(feats, kept, strict=True)]
    embeds, new_mask, _ = splice_left_padded(ids, mask, emb, IMG, pieces,
                                             [f.shape[0] for f in feats])
    return dict(inputs_embeds=embeds, attention_mask=new_mask)


CASE = checks.Family(inputs=inputs, reference=hand_pruned)


@pytest.mark.parametrize("method", ["random", "divprune", "fopru"])
def test_keep_all_equals_untouched(model, method):
    checks.keep_all_equals_untouched(CASE, model, method, 1.0)


@pytest.mark.parametrize("method,keep", [("divprune", 0.3), ("fopru", 20), ("random", 0.5)])
def test_pruned_equals_hand_pruned(model, method, keep):
    checks.pruned_equals_hand_pruned(CASE, model, method, keep)


def test_attn_received_is_packed_like_the_tokens(model):
    """The per-crop attention received (eager weights, head- and query-mean) packed by the
    model's own packing (unpad, shrink, newlines at 0) is what the method gets."""
    kw = inputs(model, [0])
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
    seen = checks.signal_seen(model, kw, "fopru", 10, "attn_received")
    torch.testing.assert_close(seen, expect, atol=1e-6, rtol=1e-5)


def test_generate_matches_hand_pruned(model):
    checks.generate_matches_hand_pruned(CASE, model, "divprune", 0.25)


def test_generate_keep_all_equals_untouched(model):
    checks.generate_keep_all_equals_untouched(CASE, model, "divprune", 1.0)


def test_remove_restores_exactly(model):
    checks.remove_restores_exactly(CASE, model, "divprune", 0.1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(model, side):
    checks.batch_equals_single_samples(CASE, model, "fopru", 0.4, side)


def test_batch_generate_equals_single(model):
    checks.batch_generate_equals_single(CASE, model, "fopru", 0.4)


def test_errors(model):
    checks.apply_refused(model, "fastervlm", 8, "cls_attn")
    checks.apply_refused(model, "hired", 8, "partitions|cls_attn")
    checks.call_refused(model, inputs(model, [0]), "divprune", 1000, "keep=1000")
