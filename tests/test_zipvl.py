"""ZipVL's token sparsification: the adaptive count against a re-statement of the paper's
rule (no official code is public), its schedule and options, and in-LLM runs on the tiny
LLaVA against the untouched model's layers run by hand (tests/llm_refs.py)."""

from __future__ import annotations

import pytest
import torch
from llm_refs import attention, by_hand, eager_copy, record
from test_llm_stage import IMG, image_cols, inputs, stage_kept
from test_models_llava import tiny_llava

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.methods.zipvl import DEFAULT_TAU, ZipVLConfig, mass_count
from tokensieve.models._llm import find_text_model

ATOL = 2e-5


def paper_rule(scores: list[float], tau: float) -> list[int]:
    """The paper's rule for one image: accumulate the scores in descending order (ties: the
    lower index first) until they reach ``tau`` of the total; the kept indices, ascending."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    total, acc, kept = sum(scores), 0.0, []
    for j in order:
        kept.append(j)
        acc += scores[j]
        if acc >= tau * total:
            break
    return sorted(kept)


def run(tokens, k, attn, **opts):
    return ts.reduce(tokens, "zipvl", k, query_attn=attn, **opts)


def kept_of(r, row=0):
    return r.indices[row] if r.mask is None else r.indices[row][r.mask[row]]


# -- the function ------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.3, 0.5, 0.9, DEFAULT_TAU, 0.999])
def test_matches_the_paper_rule(tau):
    gen = torch.Generator().manual_seed(1)
    attn = (torch.rand(3, 5, 50, generator=gen) ** 3).softmax(-1).double()   # [B, R, N]
    tokens = torch.randn(3, 50, 8, generator=gen)
    r = run(tokens, 50, attn.float(), tau=tau)
    for b in range(3):
        ref = paper_rule(attn[b].float().double().sum(0).tolist(), tau)
        assert kept_of(r, b).tolist() == ref
        assert int(mass_count(attn[b:b + 1].float().sum(1), tau)) == len(ref)


def test_counts_ties_and_edges():
    # masses 0.4, 0.2, 0.2, 0.1, 0.1 (dyadic-exact sums are not needed: >= with float64)
    scores = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1]])
    assert mass_count(scores, 0.4).tolist() == [1]       # exactly reached by one token
    assert mass_count(scores, 0.41).tolist() == [2]
    assert mass_count(scores, 1.0).tolist() == [5]       # tau = 1 keeps everything
    tokens = torch.randn(1, 5, 4)
    # two tokens tie at 0.2 for the second place: the lower index (1) wins
    assert kept_of(run(tokens, 5, scores, tau=0.5)).tolist() == [1, 2]
    assert kept_of(run(tokens, 5, scores, tau=0.7)).tolist() == [1, 2, 3]
    assert kept_of(run(tokens, 2, scores, tau=0.9)).tolist() == [1, 2]   # capped by k
    zeros = torch.zeros(1, 5)
    assert kept_of(run(tokens, 5, zeros, tau=0.5)).tolist() == [0]        # at least one
    # adaptive counts per row: a peaked row keeps fewer, padded with a mask
    two = torch.tensor([[0.9, 0.025, 0.025, 0.025, 0.025], [0.2, 0.2, 0.2, 0.2, 0.2]])
    r = run(torch.randn(2, 5, 4), 5, two, tau=0.8)
    assert r.mask is not None
    assert kept_of(r, 0).tolist() == [0] and kept_of(r, 1).tolist() == [0, 1, 2, 3]
    # padding rows (all zero) change nothing
    padded = torch.stack([scores, torch.zeros(1, 5)], dim=1)
    assert torch.equal(run(tokens, 5, padded, tau=0.7).indices,
                       run(tokens, 5, scores, tau=0.7).indices)


def test_schedule_and_options():
    cfg = ZipVLConfig()
    assert cfg.tau == DEFAULT_TAU and cfg.position_mode == "keep"
    assert cfg.cut_layers(32) == tuple(range(1, 32)) and cfg.cut_layers(4) == (1, 2, 3)
    assert cfg.counts(576, None, 32) == [576] * 31
    # keep = 288 on average with a first cut before layer 1 of 32: (576 + 31 c) / 32 <= 288
    assert cfg.counts(576, 288, 32) == [278] * 31
    assert ZipVLConfig(layers=(2,)).counts(49, 30, 4) == [11]
    with pytest.raises(ValueError, match="keep=10"):
        ZipVLConfig(layers=(2,)).counts(49, 10, 4)
    for bad in (dict(tau=0.0), dict(tau=1.5), dict(layers=(0,)), dict(layers=(2, 2)),
                dict(positions="x")):
        with pytest.raises(ValueError):
            ts.describe("zipvl").make_config(bad)
    with pytest.raises(ValueError, match="layers"):
        ZipVLConfig(layers=(4,)).cut_layers(4)


# -- in the tiny LLaVA ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=4)


@pytest.fixture(scope="module")
def eager(model):
    return eager_copy(model)


TAU = 0.5


@torch.no_grad()
def reference_kept(model, eager, rec, ids, layer, tau):
    """The paper's rule on the eager attention of ``layer`` on its own input (the full
    prompt), head mean, summed over every text token after each image."""
    lm, elm = find_text_model(model), find_text_model(eager)
    h = rec.hidden
    t = h.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for j in range(layer):
        h = lm.layers[j](h, attention_mask=causal[None, None], position_embeddings=rec.pos_emb[j])
    w = attention(elm, layer, h, rec.pos_emb[layer], causal)[0].mean(0)     # [T, T]
    kept = []
    for c in image_cols(ids):
        after = (torch.arange(t) > c.max()) & (ids[0] != IMG)
        kept.append(torch.tensor(paper_rule(w[after][:, c].sum(0).double().tolist(), tau)))
    return kept


@pytest.mark.parametrize("sample", [0, 1])
def test_single_cut_matches_hand_reference(model, eager, sample):
    kw = inputs([sample])
    rec = record(model, kw)
    ref_kept = reference_kept(model, eager, rec, kw["input_ids"], 2, TAU)
    assert all(0 < len(k) < 49 for k in ref_kept)
    with torch.no_grad(), tm.applied(model, "zipvl", layers=(2,), tau=TAU):
        out = model(**kw).logits
        kept = stage_kept(model)
    assert [k.tolist() for k in kept[0]] == [k.tolist() for k in ref_kept]
    ref, _ = by_hand(model, eager, rec, image_cols(kw["input_ids"]), [2], None, "own", "keep",
                     fixed=[ref_kept])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_tau_one_equals_untouched(model):
    kw = inputs([0, 1, 2])
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, "zipvl", tau=1.0):
            out = model(**kw).logits
            assert len(stage_kept(model)) == 3
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_padded_batch_equals_single_samples_and_generate(model):
    kw = inputs([0, 1, 2], "left")
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), tm.applied(model, "zipvl", layers=(2,), tau=TAU):
        batch = model(**kw).logits
        batch_gen = model.generate(**kw, **gen)[:, -3:]
        for s in range(3):
            alone_kw = inputs([s])
            alone = model(**alone_kw).logits[0]
            torch.testing.assert_close(batch[s, kw["attention_mask"][s].bool()], alone,
                                       atol=ATOL, rtol=0)
            assert torch.equal(batch_gen[s], model.generate(**alone_kw, **gen)[0, -3:])


def test_a_cut_at_every_layer(model):
    """A cut at every layer: each later cut keeps a subset of what the earlier one left."""
    with torch.no_grad(), tm.applied(model, "zipvl", tau=TAU):
        model(**inputs([0]))
        cuts = tm.get_state(model).llm.last
    assert len(cuts) > 1
    for earlier, later in zip(cuts, cuts[1:], strict=False):
        assert set(later.kept[0].tolist()) <= set(earlier.kept[0].tolist())
