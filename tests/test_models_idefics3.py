"""tokensieve.apply on tiny random Idefics3 and SmolVLM models (image splitting into crops,
pixel shuffle, padded image slots, pixel attention masks).

References: the untouched model's own per-crop features at the kept indices, spliced into
the prompt by the test and decoded greedily by the untouched LLM; eager attention weights
for the attention signal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_refs import kept_indices, splice_left_padded
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

import tokensieve.models as tm

IMG, FAKE, ROW = 60, 50, 51
N = 16  # 8 x 8 patches, pixel shuffle 2 -> 4 x 4 tokens per crop
ATOL = 1e-5


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


def inputs(samples: list[int], side: str = "left"):
    rows = [SAMPLES[s][0] + crop_run(SAMPLES[s][1]) + SAMPLES[s][2] if SAMPLES[s][1]
            else SAMPLES[s][0] for s in samples]
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
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
def hand_pruned(model, kw, kept):
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = torch.cat(list(model.model.get_image_features(kw["pixel_values"]).pooler_output))
    feats = feats.reshape(-1, N, feats.shape[-1])  # one row per real crop
    emb = model.get_input_embeddings()(ids)
    pieces = [f[k] for f, k in zip(feats, kept, strict=True)]
    return splice_left_padded(ids, mask, emb, IMG, pieces, [N] * len(pieces))


@torch.no_grad()
def greedy(model, embeds, mask, steps: int) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    tokens = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("method", ["random", "divprune", "hiprune", "uniform"])
def test_keep_all_equals_untouched(model, method):
    kw = inputs([0, 1, 2])
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, method, N):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,keep", [("divprune", 5), ("hiprune", 0.5), ("uniform", 4)])
def test_pruned_equals_hand_pruned(model, method, keep):
    kw = inputs([0, 1, 2])
    with tm.applied(model, method, keep), torch.no_grad():
        out = model(**kw).logits
        kept = kept_indices(model)
    assert len(kept) == 3  # three real crops; the padding slot is skipped
    embeds, mask = hand_pruned(model, kw, kept)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


def test_attn_received_with_padded_patches_equals_eager(model):
    from tokensieve.core import registry

    kw = inputs([1])
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
    spec = registry.get_method("hiprune")
    seen = {}

    def spy(tokens, k, signals, config, generator):
        seen["attn"] = signals.attn_received
        return spec.fn(tokens, k, signals, config, generator)

    registry._REGISTRY["hiprune"] = spec.__class__(**{**spec.__dict__, "fn": spy})
    try:
        with tm.applied(model, "hiprune", 6), torch.no_grad():
            model(**kw)
    finally:
        registry._REGISTRY["hiprune"] = spec
    torch.testing.assert_close(seen["attn"], expect, atol=1e-6, rtol=1e-5)


def test_generate_matches_hand_pruned(model):
    kw = inputs([0, 1, 2])
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with tm.applied(model, "divprune", 6), torch.no_grad():
        out = model.generate(**kw, **gen)
        kept = kept_indices(model)
    ids = kw["input_ids"]
    assert torch.equal(out[:, :ids.shape[1]], ids)
    embeds, mask = hand_pruned(model, kw, kept)
    assert torch.equal(out[:, ids.shape[1]:], greedy(model, embeds, mask, 5))


def test_remove_restores_exactly(model):
    kw = inputs([0, 1, 2])
    keys = set(model.__dict__)
    with torch.no_grad():
        ref = model(**kw).logits
        tm.apply(model, "divprune", 4)
        assert model(**kw).logits.shape != ref.shape
        tm.remove(model)
        out = model(**kw).logits
    assert torch.equal(out, ref) and set(model.__dict__) == keys


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(model, side):
    kw = inputs([0, 1, 2], side)
    with tm.applied(model, "hiprune", 7), torch.no_grad():
        out = model(**kw).logits
        for i in range(3):
            one = model(**inputs([i])).logits[0]
            row = out[i, -one.shape[0]:] if side == "left" else out[i, :one.shape[0]]
            torch.testing.assert_close(row, one, atol=1e-4, rtol=0)


def test_errors(model):
    with pytest.raises(ValueError, match="cls_attn"):
        tm.apply(model, "fastervlm", 8)
    with pytest.raises(ValueError, match=r"keep=17.*16 visual"):
        tm.apply(model, "divprune", N + 1)
    with pytest.raises(ValueError, match="no CLS"):
        tm.apply(model, "visiondrop", 8, has_cls=True)
    assert not tm.is_applied(model)
