"""SparseVLM: one stage against a restatement of the official selection and recycling, the
rater rule, the schedule (counts, cut layers) and the options."""

from __future__ import annotations

import math

import pytest
import torch
from test_dpc import brute_dpc

import tokensieve as ts
from tokensieve.core.schedule import layer_average
from tokensieve.methods.sparsevlm import SparseVLMConfig


def official_stage(x: torch.Tensor, relevance: list[float], k: int, seed: int) -> dict:
    """One official v1 stage, token by token: keep the top min(k, N - 1) by relevance (ties:
    lower index), then of the dropped (ascending) the int(0.3 d) + 1 most relevant, in
    descending relevance, form int(m / 10) + 1 DPC-kNN clusters (noise drawn from the seed)."""
    n = x.shape[0]
    ranked = sorted(range(n), key=lambda i: (-relevance[i], i))
    kept = sorted(ranked[:min(k, n - 1)])
    dropped = [i for i in range(n) if i not in kept]
    m = int(len(dropped) * 0.3) + 1
    recycled = sorted(dropped, key=lambda i: (-relevance[i], i))[:m]
    draws = torch.rand(m, generator=torch.Generator().manual_seed(seed)).tolist()
    ref = brute_dpc(x[recycled].double().tolist(), int(m / 10) + 1, draws, 1e-6)
    tokens = x[kept].double().tolist() + ref["merged"]
    return {"tokens": tokens, "indices": kept,
            "positions": kept + [recycled[c] for c in ref["centres"]],
            "sizes": [1] * len(kept) + ref["sizes"]}


def _inputs(b: int = 1, n: int = 40, d: int = 6, r: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, d, generator=g)
    attn = torch.rand(b, r, n, generator=g)
    return tokens, attn / attn.sum(-1, keepdim=True)


@pytest.mark.parametrize("k", [1, 10, 25, 39, 40])
def test_stage_matches_official_restatement(k):
    tokens, attn = _inputs()
    attn[0, 2] = 0                               # a padding rater row
    real = attn[0, [0, 1, 3]]
    relevance = real.mean(dim=0).tolist()
    r = ts.reduce(tokens, "sparsevlm", k, query_attn=attn, seed=3)
    ref = official_stage(tokens[0], relevance, k, seed=3)
    assert r.indices[0].tolist() == ref["indices"]
    assert r.positions[0].tolist() == ref["positions"]
    assert r.sizes[0].tolist() == ref["sizes"]
    torch.testing.assert_close(r.tokens[0].double(),
                               torch.tensor(ref["tokens"], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    kept, total = len(ref["indices"]), len(ref["tokens"])
    a = r.assignment[0]
    assert torch.equal(a[r.indices[0]], torch.arange(kept))
    assert int((a >= kept).sum()) == sum(ref["sizes"][kept:]) and int(a.max()) == total - 1


def test_relevance_ties_keep_the_lower_index():
    tokens, _ = _inputs(n=12)
    attn = torch.tensor([[1.0, 2.0, 2.0, 1.0, 3.0, 2.0, 1.0, 1.0, 0.5, 2.0, 0.0, 1.0]])
    r = ts.reduce(tokens, "sparsevlm", 4, query_attn=attn, recycle=False)
    assert r.indices[0].tolist() == [1, 2, 4, 5]
    ref = official_stage(tokens[0], attn[0].tolist(), 4, seed=0)
    r = ts.reduce(tokens, "sparsevlm", 4, query_attn=attn)
    assert r.positions[0].tolist() == ref["positions"]


def test_one_row_and_rows_without_padding_agree():
    tokens, attn = _inputs(n=30)
    flat = ts.reduce(tokens, "sparsevlm", 8, query_attn=attn.mean(dim=1))
    padded = torch.cat([attn, torch.zeros(1, 3, 30)], dim=1)
    rows = ts.reduce(tokens, "sparsevlm", 8, query_attn=padded)
    assert torch.equal(flat.positions, rows.positions)
    torch.testing.assert_close(flat.tokens, rows.tokens)


def test_without_recycling_it_is_top_k():
    tokens, attn = _inputs(b=2, n=30)
    r = ts.reduce(tokens, "sparsevlm", 8, query_attn=attn, recycle=False)
    top = attn.mean(dim=1).topk(8, dim=1).indices.sort(dim=1).values
    assert torch.equal(r.indices, top) and torch.equal(r.positions, top)
    assert r.tokens.shape == (2, 8, 6) and (r.sizes == 1).all()


def test_recycling_ratios_set_the_cluster_count():
    tokens, attn = _inputs(n=120)
    r = ts.reduce(tokens, "sparsevlm", 20, query_attn=attn, recycle_ratio=0.5,
                  cluster_ratio=0.2)
    m = int(100 * 0.5) + 1
    assert r.tokens.shape[1] == 20 + int(m * 0.2) + 1
    assert int(r.sizes[0, 20:].sum()) == m


def test_batch_equals_each_row_alone():
    tokens, attn = _inputs(b=2, n=50)
    attn[1, 3] = 0
    full = ts.reduce(tokens, "sparsevlm", 12, query_attn=attn, seed=5)
    for i in range(2):
        one = ts.reduce(tokens[i:i + 1], "sparsevlm", 12, query_attn=attn[i:i + 1], seed=5)
        for name in ("indices", "positions", "sizes", "assignment"):
            assert torch.equal(getattr(one, name)[0], getattr(full, name)[i]), name
        torch.testing.assert_close(one.tokens[0], full.tokens[i])


def official_raters(image: torch.Tensor, text: torch.Tensor) -> list[bool]:
    n, m = image.shape[0], text.shape[0]
    relevance = [0.0] * m
    for i in range(n):
        logits = [float(image[i] @ text[j]) for j in range(m)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        for j in range(m):
            relevance[j] += exps[j] / sum(exps) / n
    mean = sum(relevance) / m
    pick = [v > mean for v in relevance]
    return pick if any(pick) else [True] * m


def test_raters_follow_the_official_rule():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(20, 8, generator=g), torch.randn(9, 8, generator=g)
    got = SparseVLMConfig().raters(image, text)
    assert got.dtype == torch.bool and got.tolist() == official_raters(image, text)
    same = torch.ones(5, 8)                        # equal relevance: nobody above the mean
    assert SparseVLMConfig().raters(image, same).tolist() == [True] * 5


def test_official_schedule_without_keep():
    cfg = SparseVLMConfig()
    assert cfg.cut_layers(32) == (3, 7, 16)
    assert cfg.counts(576, None, 32) == [300, 200, 110]
    assert cfg.counts(144, None, 32) == [75, 50, 28]
    assert cfg.image_tokens(576, [300, 200, 110]) == [309, 204, 113]
    assert SparseVLMConfig(schedule=(66, 30, 17)).counts(576, None, 32) == [66, 30, 17]
    assert cfg.cut_layers(4) == (1, 2) and cfg.counts(576, None, 4) == [200, 110]
    assert cfg.cut_layers(3) == (1, 2) and cfg.cut_layers(2) == (1,)


@pytest.mark.parametrize("depth", [4, 8, 32])
@pytest.mark.parametrize("keep", [64, 100, 192, 0.5, 576])
def test_keep_is_the_layer_average(depth, keep):
    cfg = SparseVLMConfig()
    target = keep if isinstance(keep, int) else round(keep * 576)
    cuts = cfg.cut_layers(depth)
    if target < layer_average(576, cfg.image_tokens(576, [1] * len(cuts)), cuts, depth):
        pytest.skip("below what the layers allow (tested below)")
    counts = cfg.counts(576, keep, depth)
    assert all(1 <= c for c in counts) and counts == sorted(counts, reverse=True)
    ratios = [c / s for c, s in zip(counts, (200, 110) if depth == 4 else (300, 200, 110),
                                     strict=True)]
    assert max(ratios) - min(ratios) < 0.05 or target == 576     # one factor
    avg = layer_average(576, cfg.image_tokens(576, counts), cfg.cut_layers(depth), depth)
    assert abs(avg - target) <= 0.5
    if target == 576:
        return                   # without recycling every stage drops one token
    no_recycle = SparseVLMConfig(recycle=False)
    counts = no_recycle.counts(576, keep, depth)
    avg = layer_average(576, no_recycle.image_tokens(576, counts), no_recycle.cut_layers(depth),
                        depth)
    assert abs(avg - target) <= 1.0


def test_keep_below_the_reachable_average_is_refused():
    with pytest.raises(ValueError, match="keep=40"):
        SparseVLMConfig().counts(576, 40, 32)
    assert SparseVLMConfig(layers=(0, 1, 2)).counts(576, 40, 32)[-1] >= 1


@pytest.mark.parametrize("options", [
    {"positions": "gaps"}, {"recycle": "yes"}, {"recycle_ratio": 1.5}, {"cluster_ratio": -0.1},
    {"schedule": (100, 200, 50)}, {"schedule": (0, 0, 0)}, {"schedule": (300, 200)},
    {"layers": (6, 2, 15)}, {"layers": (2, 6)}, {"layers": ()}, {"layers": (-1, 2, 3)},
])
def test_bad_options_are_refused(options):
    tokens, attn = _inputs()
    with pytest.raises(ValueError):
        ts.reduce(tokens, "sparsevlm", 8, query_attn=attn, **options)


def test_layers_beyond_the_model_are_refused():
    with pytest.raises(ValueError, match="layers"):
        SparseVLMConfig(layers=(2, 6, 31)).cut_layers(32)
    assert SparseVLMConfig(layers=(2, 6, 30)).cut_layers(32) == (3, 7, 31)
