"""visiondrop-llm: VisionDrop's LLM stages against a re-statement of the official
computation, its schedule, and in a tiny LLaVA (keep-all and the two-stage pipeline)."""

from __future__ import annotations

import pytest
import torch
from test_llm_stage import ATOL, inputs
from test_models_llava import tiny_llava

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.methods._dominant import split_budget


def official_stage(hidden: torch.Tensor, attn: torch.Tensor, metric: torch.Tensor, d: int,
                   c: int) -> torch.Tensor:
    """One image of the official ``visiondrop_rank_drop``, re-stated on plain tensors:
    ``hidden`` [N, D], ``attn`` [N, N] head-mean attention image rows -> image columns,
    ``metric`` [N, Dk] head-mean keys. Returns [d + c, D]."""
    score = attn.mean(0)
    top = score.topk(d).indices
    rest = torch.ones(hidden.shape[0], dtype=torch.bool)
    rest[top] = False
    dominant = hidden[~rest]
    m = metric[rest]
    m = m / m.norm(dim=-1, keepdim=True)
    h = hidden[rest]
    step = max(1, m.shape[0] // c)
    targets = torch.arange(0, m.shape[0], step)[:c]
    others = ~torch.isin(torch.arange(m.shape[0]), targets)
    choice = (m[others] @ m[targets].T).argmax(dim=1)
    onehot = torch.zeros(int(others.sum()), c)
    onehot[torch.arange(len(choice)), choice] = 1.0
    counts = onehot.sum(0).clamp(min=1).unsqueeze(-1)
    contextual = h[targets] + onehot.T @ h[others] / counts
    return torch.cat([dominant, contextual])


@pytest.mark.parametrize("n,k", [(48, 35), (35, 26), (26, 19), (30, 12)])
def test_stage_matches_official_restatement(n, k):
    g = torch.Generator().manual_seed(n + k)
    hidden = torch.randn(1, n, 16, generator=g)
    logits = torch.randn(1, n, n, generator=g).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf)
    attn = logits.softmax(-1) * 0.7  # rows sum to 0.7: the rest goes to text columns
    keys = torch.randn(1, n, 8, generator=g)
    d, c = split_budget(k, 1 / 7, None, None, "test")
    r = ts.reduce(hidden, "visiondrop-llm", k, query_attn=attn, keys=keys)
    ref = official_stage(hidden[0], attn[0], keys[0], d, c)
    torch.testing.assert_close(r.tokens[0], ref)
    assert r.indices.shape == (1, d) and r.tokens.shape == (1, k, 16)
    # Without keys (the in-LLM stage today) the hidden states are the merge metric.
    r = ts.reduce(hidden, "visiondrop-llm", k, query_attn=attn)
    torch.testing.assert_close(r.tokens[0], official_stage(hidden[0], attn[0], hidden[0], d, c))
    # One averaged row [B, N] ranks the same.
    r2 = ts.reduce(hidden, "visiondrop-llm", k, query_attn=attn.mean(1))
    torch.testing.assert_close(r2.tokens, r.tokens)


def test_official_schedule_and_budget():
    cfg = ts.describe("visiondrop-llm").make_config({})
    assert cfg.cut_layers(32) == (8, 16, 24)
    assert cfg.cut_layers(4) == (1, 2, 3)
    assert cfg.counts(48, None, 32) == [35, 26, 19]
    assert [split_budget(k, cfg.contextual_share, None, None, "t")
            for k in cfg.counts(48, None, 32)] == [(30, 5), (22, 4), (16, 3)]
    assert cfg.counts(96, None, 32) == [70, 52, 38]  # the official schedule scaled
    assert cfg.counts(48, 32, 32) == [35, 26, 19]  # keep = average per LLM layer
    avg = (8 * 48 + 8 * 35 + 8 * 26 + 8 * 19) / 32
    assert avg == 32
    assert cfg.counts(48, 48, 32) == [48, 48, 48]
    assert len(ts.describe("visiondrop-llm").make_config({"layers": (2, 5)}).counts(
        48, None, 8)) == 2
    assert ts.describe("visiondrop").llm_stage == "visiondrop-llm"
    with pytest.raises(ValueError, match="layers"):
        ts.describe("visiondrop-llm").make_config({"layers": (5, 2)})
    # keep = N changes nothing (no reordering).
    x = torch.randn(1, 10, 4)
    r = ts.reduce(x, "visiondrop-llm", 10, query_attn=torch.rand(1, 10, 10))
    assert torch.equal(r.tokens, x)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=4)


def test_keep_all_equals_untouched(model):
    kw = inputs([0, 1, 2])
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, "visiondrop-llm", 1.0):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_apply_visiondrop_runs_both_stages(model):
    kw = inputs([0, 1, 2])
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, "visiondrop", 16):
            out = model(**kw).logits
            state = tm.get_state(model)
            cuts = state.llm.last
            described = state.to_dict()
            gen = model.generate(**kw, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)
    assert described["llm"]["method"] == "visiondrop-llm"
    assert [c.layer for c in cuts] == [1, 2, 3]
    counts = ts.describe("visiondrop-llm").make_config({}).counts(16, None, 4)
    assert counts == [12, 9, 6]
    images = len(cuts[0].kept)
    assert images == 3
    for cut, count in zip(cuts, counts, strict=True):
        assert all(len(k) == count for k in cut.kept)
        assert all(int(k.max()) < 16 for k in cut.kept)
    assert out.shape[0] == ref.shape[0] and torch.isfinite(out).all()
    assert gen.shape == (3, kw["input_ids"].shape[1] + 2)
    assert not tm.is_applied(model)
