"""tokensieve.apply on a tiny random Gemma3ForConditionalGeneration (SigLIP, pooled soft
tokens, bidirectional image blocks via token_type_ids).

References: the untouched model on a sequence the test prunes by hand (its own soft
tokens at the kept indices), and eager attention weights for the attention signal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

import tokensieve.models as tm

IMG, BOI, EOI = 70, 71, 72
N = 16  # 4 x 4 soft tokens (8 x 8 patches pooled 2 x 2)
ATOL = 1e-5


def tiny_gemma3(seed: int = 0) -> Gemma3ForConditionalGeneration:
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, image_size=32, patch_size=4)
    text = Gemma3TextConfig(vocab_size=80, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, max_position_embeddings=512, sliding_window=16,
                            pad_token_id=0, bos_token_id=2, eos_token_id=1)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=N,
                       image_token_id=IMG, boi_token_id=BOI, eoi_token_id=EOI)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the projection starts at zero: give it random weights
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


def prompt(texts: list[list[int]]) -> list[int]:
    out: list[int] = []
    for i, chunk in enumerate(texts):
        if i:
            out += [BOI] + [IMG] * N + [EOI]
        out += chunk
    return out


ROWS = [prompt([[2, 5, 6], [7, 8, 9]]), prompt([[2, 11], [12], [13, 14]]), [2, 15, 16, 17, 18]]


def batch(rows, side="left"):
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def images(n: int, offset: int = 0) -> torch.Tensor:
    return torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))
                        for i in range(offset, offset + n)])


def inputs(rows, side="left", offset=0):
    ids, mask = batch(rows, side)
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=(ids == IMG).long())
    n_img = int((ids == IMG).sum()) // N
    if n_img:
        kw["pixel_values"] = images(n_img, offset)
    return kw


@torch.no_grad()
def hand_pruned(model, kw, kept):
    """Untouched-model inputs of the hand-pruned batch: (embeds, mask, token_type_ids)."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = model.model.get_image_features(kw["pixel_values"]).pooler_output  # [I, N, D]
    emb = model.get_input_embeddings()(ids)
    rows, img = [], 0
    for b in range(ids.shape[0]):
        vecs, types, t = [], [], 0
        while t < ids.shape[1]:
            if mask[b, t] == 0:
                t += 1
            elif ids[b, t] == IMG:
                vecs.append(feats[img][kept[img]])
                types += [1] * len(kept[img])
                img, t = img + 1, t + N
            else:
                vecs.append(emb[b, t:t + 1])
                types.append(0)
                t += 1
        rows.append((torch.cat(vecs), types))
    n = max(len(tp) for _, tp in rows)
    embeds = torch.zeros(len(rows), n, emb.shape[-1])
    new_mask = torch.zeros(len(rows), n, dtype=torch.long)
    new_types = torch.zeros(len(rows), n, dtype=torch.long)
    for b, (vec, tp) in enumerate(rows):
        embeds[b, n - len(tp):] = vec
        new_mask[b, n - len(tp):] = 1
        new_types[b, n - len(tp):] = torch.tensor(tp)
    return embeds, new_mask, new_types


@torch.no_grad()
def greedy(model, embeds, mask, types, steps: int) -> torch.Tensor:
    """Greedy decoding of the untouched model from prompt embeddings, with a KV cache and
    the positions ``generate`` uses (attention-mask cumsum)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types,
                position_ids=pos, use_cache=True)
    tokens = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1)


def kept_indices(model):
    return [r.indices[0] for r, _ in tm.last_reductions(model)]


@pytest.mark.parametrize("method", ["random", "divprune", "hiprune", "uniform"])
def test_keep_all_equals_untouched(model, method):
    kw = inputs(ROWS)
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, method, N):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,keep", [("divprune", 5), ("hiprune", 6), ("uniform", 4)])
def test_pruned_equals_hand_pruned(model, method, keep):
    kw = inputs(ROWS)
    with tm.applied(model, method, keep), torch.no_grad():
        out = model(**kw).logits
        kept = kept_indices(model)
    embeds, mask, types = hand_pruned(model, kw, kept)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


def test_attn_received_equals_eager_attention(model):
    from tokensieve.core import registry

    kw = inputs(ROWS[:1])
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(pixel_values=kw["pixel_values"], output_attentions=True).attentions[-1]
    recv = att.mean(dim=(1, 2))  # [1, 64] head- and query-mean columns
    expect = recv.reshape(1, 4, 2, 4, 2).sum(dim=(2, 4)).reshape(1, N)  # 2x2 pooling windows
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
    kw = inputs(ROWS)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with tm.applied(model, "divprune", 5), torch.no_grad():
        out = model.generate(**kw, **gen)
        kept = kept_indices(model)
    ids = kw["input_ids"]
    assert torch.equal(out[:, :ids.shape[1]], ids)
    embeds, mask, types = hand_pruned(model, kw, kept)
    ref = greedy(model, embeds, mask, types, 5)  # Gemma3 cannot generate from inputs_embeds
    assert torch.equal(out[:, ids.shape[1]:], ref)


def test_remove_restores_exactly(model):
    kw = inputs(ROWS)
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
    kw = inputs(ROWS, side)
    offsets = [0, 1, 3]
    with tm.applied(model, "hiprune", 7), torch.no_grad():
        out = model(**kw).logits
        for i, r in enumerate(ROWS):
            one = model(**inputs([r], offset=offsets[i])).logits[0]
            row = out[i, -one.shape[0]:] if side == "left" else out[i, :one.shape[0]]
            torch.testing.assert_close(row, one, atol=1e-4, rtol=0)


def test_batch_generate_equals_single(model):
    kw = inputs(ROWS)
    offsets = [0, 1, 3]
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with tm.applied(model, "divprune", 6), torch.no_grad():
        out = model.generate(**kw, **gen)
        for i, r in enumerate(ROWS):
            one = model.generate(**inputs([r], offset=offsets[i]), **gen)
            assert torch.equal(out[i, kw["input_ids"].shape[1]:], one[0, len(r):])


def test_errors(model):
    with pytest.raises(ValueError, match="cls_attn"):
        tm.apply(model, "fastervlm", 8)
    with pytest.raises(ValueError, match=r"keep=17.*16 visual"):
        tm.apply(model, "divprune", N + 1)
    with pytest.raises(ValueError, match="no CLS"):
        tm.apply(model, "visiondrop", 8, has_cls=True)
    assert not tm.is_applied(model)


def test_greedy_reference_and_keep_all_generate(model):
    """The test's greedy reference reproduces the untouched generate(), and keep-all
    patched generate() equals it."""
    kw = inputs(ROWS)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(**kw, **gen)
        with tm.applied(model, "divprune", N):
            out = model.generate(**kw, **gen)
    embeds, mask, types = hand_pruned(model, kw, [torch.arange(N)] * 3)
    assert torch.equal(out, ref)
    assert torch.equal(greedy(model, embeds, mask, types, 4), ref[:, kw["input_ids"].shape[1]:])
