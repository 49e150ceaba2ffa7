"""tokensieve.apply on tiny random Idefics3 and SmolVLM models (image splitting into crops,
pixel shuffle, padded image slots, pixel attention masks).

References: the untouched model's own per-crop features at the kept indices, spliced into
the prompt by the test and decoded greedily by the untouched LLM; eager attention weights
for the attention signal. The checks themselves are shared (tests/model_checks.py).
"""

from __future__ import annotations

import copy

import model_checks as checks
import pytest
import torch
from model_refs import splice_left_padded
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

IMG, FAKE, ROW = 60, 50, 51
N = 16  # 8 x 8 patches, pixel shuffle 2 -> 4 x 4 tokens per crop


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cls, model_cls = ((Idefics3Config, Idefics3ForConditionalGeneration) if family == "idefics3"
                      else (SmolVLMConfig, SmolVLMForConditionalGeneration))
    cfg = cls(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=4),
              text_config=dict(model_type="llama", vocab_size=64, hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=512,
                               pad_token_id=0),
              scale_factor=2, image_token_id=IMG, pad_token_id=0)
    return model_cls(cfg).eval()


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def model(request):
    return tiny(request.param)


def crop_run(n_crops: int) -> list[int]:
    out: list[int] = []
    for _ in range(n_crops):
        out += [FAKE, ROW] + [IMG] * N
    return out + [FAKE]


# (text before, crops, text after); crop pixels depend on (sample, crop) only
SAMPLES = [([1, 5, 6], 2, [7, 8]), ([1, 11], 1, [12, 13, 14]), ([1, 15, 16, 17, 18], 0, [])]


def crop_pixels(sample: int, crop: int) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(10 * sample + crop))


def inputs(model, samples: list[int], side: str = "left") -> dict:
    rows = [SAMPLES[s][0] + crop_run(SAMPLES[s][1]) + SAMPLES[s][2] if SAMPLES[s][1]
            else SAMPLES[s][0] for s in samples]
    ids, mask = checks.pad_rows(rows, side)
    kw = dict(input_ids=ids, attention_mask=mask)
    most = max(SAMPLES[s][1] for s in samples)
    if most:
        pv = torch.zeros(len(samples), most, 3, 32, 32)  # padding slots stay all-zero
        for i, s in enumerate(samples):
            for c in range(SAMPLES[s][1]):
                pv[i, c] = crop_pixels(s, c)
        kw["pixel_values"] = pv
    return kw


@torch.no_grad()
def hand_pruned(model, kw, kept) -> dict:
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = torch.cat(list(model.model.get_image_features(kw["pixel_values"]).pooler_output))
    feats = feats.reshape(-1, N, feats.shape[-1])  # one row per real crop
    emb = model.get_input_embeddings()(ids)
    pieces = [f[k] for f, k in zip(feats, kept, strict=True)]
    embeds, new_mask, _ = splice_left_padded(ids, mask, emb, IMG, pieces, [N] * len(pieces))
    return dict(inputs_embeds=embeds, attention_mask=new_mask)


CASE = checks.Family(inputs=inputs, reference=hand_pruned, greedy_reference=True)


@pytest.mark.parametrize("method", ["random", "divprune", "hiprune", "uniform"])
def test_keep_all_equals_untouched(model, method):
    checks.keep_all_equals_untouched(CASE, model, method, N)


@pytest.mark.parametrize("method,keep", [("divprune", 5), ("hiprune", 0.5), ("uniform", 4)])
def test_pruned_equals_hand_pruned(model, method, keep):
    kept = checks.pruned_equals_hand_pruned(CASE, model, method, keep)
    assert len(kept) == 3  # three real crops; the padding slot is skipped


def test_attn_received_with_padded_patches_equals_eager(model):
    kw = inputs(model, [1])
    pam = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    pam[..., 24:] = False  # the last two patch columns are padding
    kw["pixel_attention_mask"] = pam
    patch_mask = torch.ones(1, 8, 8, dtype=torch.bool)
    patch_mask[..., 6:] = False
    eager = copy.deepcopy(model.model.vision_model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(pixel_values=kw["pixel_values"][0], patch_attention_mask=patch_mask,
                    output_attentions=True).attentions[-1]  # [1, H, 64, 64]
    valid = patch_mask.reshape(1, 64)
    recv = (att * valid[:, None, :, None]).sum(dim=(1, 2)) / (att.shape[1] * valid.sum())
    expect = recv.reshape(1, 4, 2, 4, 2).sum(dim=(2, 4)).reshape(1, N)  # 2x2 shuffle blocks
    seen = checks.signal_seen(model, kw, "hiprune", 6, "attn_received")
    torch.testing.assert_close(seen, expect, atol=1e-6, rtol=1e-5)


def test_generate_matches_hand_pruned(model):
    checks.generate_matches_hand_pruned(CASE, model, "divprune", 6)


def test_generate_keep_all_equals_untouched(model):
    checks.generate_keep_all_equals_untouched(CASE, model, "divprune", N)


def test_remove_restores_exactly(model):
    checks.remove_restores_exactly(CASE, model, "divprune", 4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(model, side):
    checks.batch_equals_single_samples(CASE, model, "hiprune", 7, side)


def test_batch_generate_equals_single(model):
    checks.batch_generate_equals_single(CASE, model, "divprune", 6)


def test_errors(model):
    checks.apply_refused(model, "fastervlm", 8, "cls_attn")
    checks.apply_refused(model, "divprune", N + 1, r"keep=17.*16 visual")
    checks.apply_refused(model, "visiondrop", 8, "no CLS", has_cls=True)
