"""tokensieve.apply on a tiny random Gemma3ForConditionalGeneration (SigLIP, pooled soft
tokens, bidirectional image blocks via token_type_ids).

References: the untouched model on a sequence the test prunes by hand (its own soft
tokens at the kept indices), and eager attention weights for the attention signal.
The checks themselves are shared (tests/model_checks.py).
"""

from __future__ import annotations

import copy

import model_checks as checks
import pytest
import torch
from model_refs import splice_left_padded
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

IMG, BOI, EOI = 70, 71, 72
N = 16  # 4 x 4 soft tokens (8 x 8 patches pooled 2 x 2)


def tiny_gemma3(seed: int = 0, text_layers: int = 2,
                **text_options) -> Gemma3ForConditionalGeneration:
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, image_size=32, patch_size=4)
    text = Gemma3TextConfig(vocab_size=80, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=text_layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                            pad_token_id=0, bos_token_id=2, eos_token_id=1,
                            **{"sliding_window": 16, **text_options})
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=N,
                       image_token_id=IMG, boi_token_id=BOI, eoi_token_id=EOI)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the projection starts at zero: give it random weights
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


# text chunks with one image between two chunks; images are numbered over the samples
TEXTS = [[[2, 5, 6], [7, 8, 9]], [[2, 11], [12], [13, 14]], [[2, 15, 16, 17, 18]]]
ROWS = [checks.interleave(t, [[BOI] + [IMG] * N + [EOI]] * (len(t) - 1)) for t in TEXTS]
FIRST_IMAGE = [0, 1, 3]  # the number of each sample's first image


def images(numbers: list[int]) -> torch.Tensor:
    """Pixels of the images ``numbers`` (each image's pixels depend on its number only)."""
    return torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))
                        for i in numbers])


def inputs(model, samples: list[int], side: str = "left") -> dict:
    ids, mask = checks.pad_rows([ROWS[s] for s in samples], side)
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=(ids == IMG).long())
    numbers = [FIRST_IMAGE[s] + j for s in samples for j in range(len(TEXTS[s]) - 1)]
    if numbers:
        kw["pixel_values"] = images(numbers)
    return kw


@torch.no_grad()
def hand_pruned(model, kw, kept) -> dict:
    """Untouched-model inputs of the hand-pruned batch, with its token types."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = model.model.get_image_features(kw["pixel_values"]).pooler_output  # [I, N, D]
    emb = model.get_input_embeddings()(ids)
    pieces = [f[k] for f, k in zip(feats, kept, strict=True)]
    embeds, new_mask, source = splice_left_padded(ids, mask, emb, IMG, pieces, [N] * len(pieces),
                                                  kept)
    types = (ids.gather(1, source) == IMG).long() * new_mask
    return dict(inputs_embeds=embeds, attention_mask=new_mask, token_type_ids=types)


# Gemma3 cannot generate from inputs_embeds: the reference generation decodes greedily.
CASE = checks.Family(inputs=inputs, reference=hand_pruned, greedy_reference=True)


@pytest.mark.parametrize("method", ["random", "divprune", "hiprune", "uniform"])
def test_keep_all_equals_untouched(model, method):
    checks.keep_all_equals_untouched(CASE, model, method, N)


@pytest.mark.parametrize("method,keep", [("divprune", 5), ("hiprune", 6), ("uniform", 4)])
def test_pruned_equals_hand_pruned(model, method, keep):
    checks.pruned_equals_hand_pruned(CASE, model, method, keep)


def test_attn_received_equals_eager_attention(model):
    kw = inputs(model, [0])
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(pixel_values=kw["pixel_values"], output_attentions=True).attentions[-1]
    recv = att.mean(dim=(1, 2))  # [1, 64] head- and query-mean columns
    expect = recv.reshape(1, 4, 2, 4, 2).sum(dim=(2, 4)).reshape(1, N)  # 2x2 pooling windows
    seen = checks.signal_seen(model, kw, "hiprune", 6, "attn_received")
    torch.testing.assert_close(seen, expect, atol=1e-6, rtol=1e-5)


def test_generate_matches_hand_pruned(model):
    checks.generate_matches_hand_pruned(CASE, model, "divprune", 5)


def test_generate_keep_all_equals_untouched(model):
    checks.generate_keep_all_equals_untouched(CASE, model, "divprune", N, steps=4)


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
