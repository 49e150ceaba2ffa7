"""todre-llm: ToDRE's stage 2 against a re-statement of the paper's ratio test, its layer and
counts, and in a tiny LLaVA (never dropping = untouched, always dropping = the image removed
by hand, and the two-stage pipeline)."""

from __future__ import annotations

import pytest
import torch
from llm_refs import by_hand, eager_copy, record
from test_llm_stage import ATOL, image_cols, inputs
from test_models_llava import tiny_llava

import tokensieve as ts
import tokensieve.models as tm


def paper_drops(attn_rows: torch.Tensor, tau: float) -> bool:
    """Eq. (8) with the image columns ``V`` of text rows ``T`` [R, N]: sum over T x V of the
    attention over the sum over T of the rows' whole attention (1 per row)."""
    return bool(attn_rows.sum() / attn_rows.shape[0] < tau)


@pytest.mark.parametrize("scale", [0.02, 0.08, 0.12, 0.5])
def test_ratio_test_matches_paper(scale):
    g = torch.Generator().manual_seed(int(scale * 100))
    n, r = 12, 5
    rows = torch.rand(r, n, generator=g)
    rows = rows / rows.sum(-1, keepdim=True) * scale  # each text row gives `scale` to the image
    pad = torch.zeros(2, n)  # padding rows (all zero) do not count
    x = torch.randn(1, n, 6, generator=g)
    out = ts.reduce(x, "todre-llm", n, query_attn=torch.cat([rows, pad])[None])
    dropped = paper_drops(rows, 0.10)
    assert dropped == (scale < 0.10)
    if dropped:
        assert out.mask is not None and not out.mask.any()
    else:
        assert out.mask is None and torch.equal(out.tokens, x)


def test_batch_rows_decide_alone_and_keep_counts():
    x = torch.randn(2, 8, 4)
    attn = torch.stack([torch.full((3, 8), 0.05 / 8), torch.full((3, 8), 0.5 / 8)])
    attn[1, :, 2] += 0.1
    r = ts.reduce(x, "todre-llm", 3, query_attn=attn)
    assert r.mask.tolist() == [[False] * 3, [True] * 3]
    assert 2 in r.indices[1].tolist()  # keep < N: the tokens the text attends to most
    assert ts.reduce(x, "todre-llm", 8, query_attn=attn, threshold=0.01).mask is None


def test_layer_and_counts():
    cfg = ts.describe("todre-llm").make_config({})
    assert cfg.cut_layers(32) == (28,)  # scores of layer 27 = 7L/8, image gone from 28
    assert cfg.cut_layers(40) == (35,)
    assert cfg.cut_layers(4) == (3,)
    assert cfg.counts(288, None, 32) == [288]
    assert cfg.counts(288, 0.5, 32) == [144]
    assert ts.describe("todre-llm").make_config({"layer": 5}).cut_layers(8) == (5,)
    assert ts.describe("todre").llm_stage == "todre-llm"
    with pytest.raises(ValueError, match="threshold"):
        ts.describe("todre-llm").make_config({"threshold": 1.5})


@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=4)


def test_never_dropping_equals_untouched(model):
    kw = inputs([0, 1, 2])
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, "todre-llm", threshold=0.0):
            out = model(**kw).logits
            kept = tm.get_state(model).llm.last
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert [c.layer for c in kept] == [3] and all(len(k) == 49 for k in kept[0].kept)


@pytest.mark.parametrize("sample", [0, 1])
def test_dropping_removes_the_image_like_by_hand(model, sample):
    kw = inputs([sample])
    rec = record(model, kw)
    with torch.no_grad(), tm.applied(model, "todre-llm", threshold=1.0):
        out = model(**kw).logits
        kept = tm.get_state(model).llm.last
    cols = image_cols(kw["input_ids"])
    empty = [[torch.zeros(0, dtype=torch.long)] * len(cols)]
    ref, _ = by_hand(model, eager_copy(model), rec, cols, [3], None, "previous", "keep",
                     fixed=empty)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert all(len(k) == 0 for k in kept[0].kept)
    with torch.no_grad(), tm.applied(model, "todre-llm", threshold=1.0):
        gen = model.generate(**kw, max_new_tokens=2, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert gen.shape == (1, kw["input_ids"].shape[1] + 2)


def test_apply_todre_runs_both_stages(model):
    kw = inputs([0, 1, 2])
    with torch.no_grad(), tm.applied(model, "todre", 12):
        out = model(**kw).logits
        state = tm.get_state(model)
        described = state.to_dict()
        cuts = state.llm.last
    assert described["llm"]["method"] == "todre-llm"
    assert [c.layer for c in cuts] == [3] and len(cuts[0].kept) == 3
    assert all(len(k) in (0, 12) for k in cuts[0].kept)
    assert torch.isfinite(out).all()
