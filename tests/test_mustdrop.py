"""MustDrop's prefill stage: the dual-attention filter against a re-statement of the official
``dual_attention_filter`` (liuting20/MustDrop), its schedule and options, and in-LLM runs on
the tiny LLaVA against the untouched model's layers run by hand (tests/llm_refs.py)."""

from __future__ import annotations

import pytest
import torch
from llm_refs import attention, by_hand, eager_copy, record
from test_llm_stage import IMG, N, image_cols, inputs, stage_kept
from test_models_llava import tiny_llava

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.methods.mustdrop import (
    OFFICIAL_THRESHOLDS,
    MustDropConfig,
    dual_attention_keep,
)
from tokensieve.models._llm import find_text_model

ATOL = 2e-5


def official_filter(attn_heads: torch.Tensor, g: float, i: float) -> torch.Tensor:
    """A re-statement of the official filter for one image: ``attn_heads`` ``[H, R, N]``
    (the text rows after the image, the image columns): head mean, per-token sum and max
    over the rows, drop when both are below their thresholds; the kept indices."""
    attn = attn_heads.mean(0)
    kept = []
    total_all = sum(float(attn[:, j].sum()) for j in range(attn.shape[1]))
    for j in range(attn.shape[1]):
        col = attn[:, j]
        if not (float(col.sum()) < total_all * g and float(col.max()) < i):
            kept.append(j)
    return torch.tensor(kept, dtype=torch.long)


def run(tokens, k, attn, **opts):
    return ts.reduce(tokens, "mustdrop", k, query_attn=attn, **opts)


def kept_of(r, row=0):
    return r.indices[row] if r.mask is None else r.indices[row][r.mask[row]]


# -- the function ------------------------------------------------------------------------------
@pytest.mark.parametrize("g,i", [OFFICIAL_THRESHOLDS[64], OFFICIAL_THRESHOLDS[128],
                                 (1 / 40, 0.05), (0.03, 0.02)])
def test_filter_matches_official_restatement(g, i):
    gen = torch.Generator().manual_seed(0)
    heads = torch.rand(4, 6, 40, generator=gen) ** 4            # peaked rows
    heads = heads / heads.sum(-1, keepdim=True) * 0.6            # the image's share of each row
    ref = official_filter(heads, g, i)
    attn = heads.mean(0, keepdim=True)                            # [1, R, N], as the stage gives
    mask = dual_attention_keep(attn, g, i)[0]
    assert torch.nonzero(mask).squeeze(1).tolist() == ref.tolist()
    tokens = torch.randn(1, 40, 8, generator=gen)
    r = run(tokens, 40, attn, global_thr=g, individual_thr=i)
    assert kept_of(r).tolist() == (ref.tolist() or [int(attn.sum(1).argmax())])


def test_ties_at_a_threshold_stay():
    # sums 0.25, 0.125, 0.125, 0.5 of a total 1.0; maxima 0.25, 0.125, 0.0625, 0.25
    attn = torch.tensor([[[0.0, 0.125, 0.0625, 0.25],
                          [0.25, 0.0, 0.0625, 0.25]]])
    keep = dual_attention_keep(attn, 0.125, 0.125)[0]
    # token 1: total == g * sum (not below): stays; token 2: total == g * sum too: stays
    assert keep.tolist() == [True, True, True, True]
    keep = dual_attention_keep(attn, 0.126, 0.125)[0]
    # token 1: below g but its max equals i: stays; token 2: below both: dropped
    assert keep.tolist() == [True, True, False, True]
    # a padding row (all zero) changes nothing
    padded = torch.cat([attn, torch.zeros(1, 1, 4)], dim=1)
    assert torch.equal(dual_attention_keep(padded, 0.126, 0.125), keep.unsqueeze(0))


def test_adaptive_counts_per_row_and_the_cap():
    attn = torch.tensor([[0.30, 0.01, 0.20, 0.01, 0.30, 0.18],
                         [0.01, 0.01, 0.01, 0.01, 0.95, 0.01]]).unsqueeze(1)
    tokens = torch.randn(2, 6, 4)
    r = run(tokens, 6, attn, global_thr=0.05, individual_thr=0.05)
    assert r.mask is not None
    assert kept_of(r, 0).tolist() == [0, 2, 4, 5] and kept_of(r, 1).tolist() == [4]
    torch.testing.assert_close(r.tokens[0, :4], tokens[0, [0, 2, 4, 5]])
    # a cap of 2: the two largest totals; a tie (0.30, 0.30) goes to both, then the order
    capped = run(tokens, 2, attn, global_thr=0.05, individual_thr=0.05)
    assert kept_of(capped, 0).tolist() == [0, 4] and kept_of(capped, 1).tolist() == [4]
    tied = torch.tensor([[[0.3, 0.2, 0.3, 0.2]]])
    assert kept_of(run(torch.randn(1, 4, 4), 1, tied, global_thr=0, individual_thr=0)
                   ).tolist() == [0]                              # tie: the lower index


def test_protect_and_an_emptied_image():
    attn = torch.tensor([[[0.01, 0.02, 0.9, 0.03, 0.04]]])
    tokens = torch.randn(1, 5, 4)
    assert kept_of(run(tokens, 5, attn, global_thr=1.0, individual_thr=1.0)).tolist() == [2]
    r = run(tokens, 5, attn, global_thr=1.0, individual_thr=1.0, protect=(0, 3))
    assert kept_of(r).tolist() == [0, 3]
    r = run(tokens, 2, attn, global_thr=0.05, individual_thr=0.05, protect=(0, 3))
    assert kept_of(r).tolist() == [0, 3]                          # the key set before the rest
    r = run(tokens, 1, attn, global_thr=0.05, individual_thr=0.05, protect=(0, 3))
    assert kept_of(r).tolist() == [3]                             # capped: the higher total
    with pytest.raises(ValueError, match="protect"):
        run(tokens, 5, attn, protect=(5,))
    with pytest.raises(ValueError, match="query_attn"):
        run(tokens, 5, torch.rand(1, 2, 4))


def test_schedule_and_options():
    cfg = MustDropConfig()
    assert (cfg.global_thr, cfg.individual_thr) == OFFICIAL_THRESHOLDS[64] == (0.011, 0.01)
    assert OFFICIAL_THRESHOLDS[128] == (0.0012, 0.001) and OFFICIAL_THRESHOLDS[192] == (
        0.001, 0.001)
    assert cfg.cut_layers(32) == (3, 7, 11, 15)          # after the official 2, 6, 10, 14
    assert cfg.cut_layers(4) == (1, 2)
    assert cfg.counts(576, None, 32) == [576] * 4          # the thresholds alone
    assert cfg.counts(576, 1.0, 32) == [576] * 4
    # keep = 64 per layer on average: (3 * 576 + 29 c) / 32 <= 64 -> c = 11
    assert cfg.counts(576, 64, 32) == [11] * 4
    with pytest.raises(ValueError, match="keep=50"):
        cfg.counts(576, 50, 32)
    assert MustDropConfig(layers=(1, 2)).cut_layers(4) == (2, 3)
    for bad in (dict(layers=(3, 2)), dict(layers=()), dict(global_thr=1.5),
                dict(individual_thr=-0.1), dict(protect=(-1,)), dict(positions="shift")):
        with pytest.raises(ValueError):
            ts.describe("mustdrop").make_config(bad)
    with pytest.raises(ValueError, match="layers"):
        MustDropConfig(layers=(3,)).cut_layers(4)
    with pytest.raises(ValueError, match="protect"):
        MustDropConfig(protect=(1,)).cut_layers(32)


# -- in the tiny LLaVA ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=4)


@pytest.fixture(scope="module")
def eager(model):
    return eager_copy(model)


#: thresholds that drop about half of the tiny model's near-uniform attention
G, IND = 1 / 49, 0.05


@torch.no_grad()
def reference_kept(model, eager, rec, ids, layer, g, i):
    """The official filter on the eager attention of ``layer`` (the full prompt), rows =
    every text token after each image."""
    lm, elm = find_text_model(model), find_text_model(eager)
    h = rec.hidden
    t = h.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for j in range(layer):
        h = lm.layers[j](h, attention_mask=causal[None, None], position_embeddings=rec.pos_emb[j])
    w = attention(elm, layer, h, rec.pos_emb[layer], causal)[0]     # [H, T, T]
    kept = []
    for c in image_cols(ids):
        after = (torch.arange(t) > c.max()) & (ids[0] != IMG)
        kept.append(official_filter(w[:, after][:, :, c], g, i))
    return kept


@pytest.mark.parametrize("sample", [0, 1])
def test_single_cut_matches_hand_reference(model, eager, sample):
    kw = inputs([sample])
    rec = record(model, kw)
    ref_kept = reference_kept(model, eager, rec, kw["input_ids"], 1, G, IND)
    assert all(0 < len(k) < 49 for k in ref_kept)
    with torch.no_grad(), tm.applied(model, "mustdrop", layers=(1,), global_thr=G,
                                     individual_thr=IND):
        out = model(**kw).logits
        kept = stage_kept(model)
    assert [k.tolist() for k in kept[0]] == [k.tolist() for k in ref_kept]
    ref, _ = by_hand(model, eager, rec, image_cols(kw["input_ids"]), [2], None, "previous",
                     "renumber", fixed=[ref_kept])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_thresholds_zero_equal_untouched(model):
    kw = inputs([0, 1, 2])
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, "mustdrop", global_thr=0.0, individual_thr=0.0):
            out = model(**kw).logits
            assert [len(k) for k in stage_kept(model)[-1]] == [49, 49, 49]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_padded_batch_equals_single_samples_and_generate(model):
    opts = dict(layers=(1,), global_thr=G, individual_thr=IND)
    kw = inputs([0, 1, 2], "left")
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), tm.applied(model, "mustdrop", **opts):
        batch = model(**kw).logits
        batch_gen = model.generate(**kw, **gen)[:, -3:]
        for s in range(3):
            alone_kw = inputs([s])
            alone = model(**alone_kw).logits[0]
            torch.testing.assert_close(batch[s, kw["attention_mask"][s].bool()], alone,
                                       atol=ATOL, rtol=0)
            assert torch.equal(batch_gen[s], model.generate(**alone_kw, **gen)[0, -3:])


def test_keep_caps_the_cut(model):
    """keep=30 per layer on average, a cut before layer 2 of 4: at most (4 * 30 - 2 * 49) / 2
    = 11 tokens, among those the thresholds keep."""
    kw = inputs([0])
    opts = dict(layers=(1,), global_thr=G, individual_thr=IND)
    with torch.no_grad():
        with tm.applied(model, "mustdrop", **opts):
            model(**kw)
            free = stage_kept(model)[0][0]
        with tm.applied(model, "mustdrop", 30, **opts):
            model(**kw)
            assert tm.get_state(model).llm.schedule.counts(49, 30, 4) == [11]
            kept = stage_kept(model)[0][0]
    assert len(free) > 11 and len(kept) == 11 and set(kept.tolist()) <= set(free.tolist())


def test_apply_refuses_a_key_set(model):
    with pytest.raises(ValueError, match="protect"):
        ts.apply(model, "mustdrop", protect=(1, 2))
    assert not tm.is_applied(model)


def test_several_cuts_that_drop(model):
    """Every cut drops more: a later cut's cap is clamped to what an earlier one left."""
    with torch.no_grad(), tm.applied(model, "mustdrop", global_thr=G, individual_thr=IND):
        model(**inputs([0]))
        cuts = tm.get_state(model).llm.last
    sizes = [len(c.kept[0]) for c in cuts]
    assert len(cuts) > 1 and sizes == sorted(sizes, reverse=True) and sizes[0] < N
    for earlier, later in zip(cuts, cuts[1:], strict=False):
        assert set(later.kept[0].tolist()) <= set(earlier.kept[0].tolist())
