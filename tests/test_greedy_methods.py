"""Greedy / diversity methods against brute-force references written with plain loops."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from tokensieve.methods import _greedy
from tokensieve.methods.kmedoids import KMedoidsConfig, distance_matrix, kkz_init, kmedoids_one


def _data(b: int, n: int, d: int, seed: int, m: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, m, d, generator=g)


def _cos_dist(x: torch.Tensor) -> torch.Tensor:
    xn = x.double() / x.double().norm(dim=-1, keepdim=True)
    return 1.0 - xn @ xn.T


def _naive_max_min(dist: torch.Tensor, k: int, seed: int | None) -> list[int]:
    """Farthest-first by explicit loops over candidates (``dist`` ``[N, N]``)."""
    n = dist.shape[0]
    if seed is None:
        best, seed = -math.inf, 0
        for j in range(n):
            nn = min(float(dist[i, j]) for i in range(n) if i != j)
            if nn > best:
                best, seed = nn, j
    picks = [seed]
    while len(picks) < k:
        best, arg = -math.inf, -1
        for j in range(n):
            if j in picks:
                continue
            score = min(float(dist[i, j]) for i in picks)
            if score > best:
                best, arg = score, j
        picks.append(arg)
    return picks


# ---------------------------------------------------------------- divprune / todre

@pytest.mark.parametrize("n,d,k", [(20, 6, 7), (41, 3, 12), (300, 16, 40)])
def test_divprune_matches_naive_max_min(n, d, k):
    x, _ = _data(3, n, d, seed=n)
    r = ts.reduce(x, "divprune", k)
    for b in range(3):
        want = sorted(_naive_max_min(_cos_dist(x[b]), k, None))
        assert r.indices[b].tolist() == want
    assert not torch.equal(r.indices[0], r.indices[1])


def test_max_min_objective_properties():
    """Farthest-first invariants: each pick is the farthest token from the earlier picks,
    and the final covering radius is at most the smallest distance between picks."""
    x, _ = _data(2, 200, 8, seed=3)
    k = 25
    order = _greedy.max_min_indices(x, k, "cosine")
    for b in range(2):
        dist = _cos_dist(x[b])
        picks = order[b].tolist()
        assert len(set(picks)) == k
        for t in range(1, k):
            to_set = dist[picks[:t]].min(dim=0).values
            to_set[picks[:t]] = -math.inf
            assert to_set[picks[t]] >= to_set.max() - 1e-6
        rest = [j for j in range(200) if j not in picks]
        radius = dist[picks][:, rest].min(dim=0).values.max()
        sub = dist[picks][:, picks] + torch.eye(k, dtype=torch.float64) * 9
        assert radius <= sub.min() + 1e-6
        # seed: the token whose nearest neighbour is farthest
        nn = (dist + torch.eye(200, dtype=torch.float64) * 9).min(dim=0).values
        assert picks[0] == int(nn.argmax())


def test_lazy_rows_compute_fewer_rows_than_full_matrix():
    x, _ = _data(1, 600, 32, seed=5)
    cache = _greedy.LazyRows(_greedy.cosine_distance_rows(x[0]), 600, x.device)
    seed = _greedy.farthest_isolated(cache)
    nn = (_cos_dist(x[0]) + torch.eye(600, dtype=torch.float64) * 9).min(dim=0).values
    assert seed == int(nn.argmax())
    _greedy.max_min_select(cache, 40, seed)
    assert int(cache.cached.sum()) < 600


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("n,d,k,dup", [(5, 3, 5, False), (64, 8, 20, True), (300, 16, 40, False),
                                       (576, 64, 64, False), (576, 32, 300, True)])
def test_max_min_dense_and_lazy_paths_pick_the_same(distance, n, d, k, dup):
    """The dense path (one N x N matrix, batched loop) and the lazy-row path agree, with the
    DivPrune seed and with given seeds, on duplicates too (never a re-pick). With exact
    duplicates every nearest-neighbour distance ties at 0, and ``cdist`` rounds the zeros
    differently per row block, so the euclidean DivPrune seed is only compared without them."""
    x, _ = _data(3, n, d, seed=n + k)
    if dup:
        x[:, 1::2] = x[:, 0::2][:, : x[:, 1::2].shape[1]]
    g = torch.Generator().manual_seed(k)
    given = torch.randint(0, n, (3,), generator=g)
    for seeds in ((given,) if dup and distance == "euclidean" else (None, given)):
        dense = _greedy.max_min_indices(x, k, distance, seeds, dense=True)
        lazy = _greedy.max_min_indices(x, k, distance, seeds, dense=False)
        assert torch.equal(dense, lazy)
        assert all(len(set(row)) == k for row in dense.tolist())


def test_max_min_takes_the_dense_path_by_size(monkeypatch):
    """LLaVA-1.5's 576 tokens (and small N, or k >= N / 4 up to twice the limit) take the
    dense path; large N with a small k computes rows lazily."""
    calls = []
    real = _greedy.dense_distances
    monkeypatch.setattr(_greedy, "dense_distances",
                        lambda t, dist: calls.append(t.shape[1]) or real(t, dist))
    ts.reduce(torch.randn(2, 576, 16), "divprune", 64)
    assert calls == [576]
    n = 2 * _greedy.DENSE_MAX_N
    _greedy.max_min_indices(torch.randn(1, n, 4), n // 4)
    _greedy.max_min_indices(torch.randn(1, n, 4), 8)
    assert calls == [576, n]


def test_todre_default_equals_divprune_and_seed_options():
    x, _ = _data(3, 36, 5, seed=11)
    k = 9
    assert torch.equal(ts.reduce(x, "todre", k).indices, ts.reduce(x, "divprune", k).indices)
    first = ts.reduce(x, "todre", k, start="first")
    cls = torch.rand(3, 36, generator=torch.Generator().manual_seed(0))
    by_cls = ts.reduce(x, "todre", k, start="cls_attn", cls_attn=cls)
    eucl = ts.reduce(x, "todre", k, distance="euclidean", start="first")
    for b in range(3):
        dist = _cos_dist(x[b])
        assert first.indices[b].tolist() == sorted(_naive_max_min(dist, k, 0))
        seed = int(cls[b].argmax())
        assert by_cls.indices[b].tolist() == sorted(_naive_max_min(dist, k, seed))
        assert seed in by_cls.indices[b].tolist()
        e = torch.cdist(x[b].double(), x[b].double())
        assert eucl.indices[b].tolist() == sorted(_naive_max_min(e, k, 0))


def test_todre_bad_options():
    x, _ = _data(1, 16, 4, seed=0)
    with pytest.raises(ValueError, match="start"):
        ts.reduce(x, "todre", 4, start="middle")
    with pytest.raises(ValueError, match="'cls_attn'"):
        ts.reduce(x, "todre", 4, start="cls_attn")
    with pytest.raises(ValueError, match="distance"):
        ts.reduce(x, "todre", 4, distance="manhattan")


def test_divprune_never_repicks_with_duplicates():
    x = torch.randn(2, 3, 4).repeat(1, 4, 1)  # 12 tokens, each value 4 times
    r = ts.reduce(x, "divprune", 8)
    assert all(len(set(row)) == 8 for row in r.indices.tolist())


# ---------------------------------------------------------------- cdpruner

def _official_relevance(x: torch.Tensor, t: torch.Tensor, sign: float, per_sample: bool):
    xn = x.double() / x.double().norm(dim=-1, keepdim=True)
    tn = t.double() / t.double().norm(dim=-1, keepdim=True)
    r = (sign * (xn @ tn.transpose(1, 2))).mean(dim=-1)
    if per_sample:
        lo, hi = r.min(dim=1, keepdim=True).values, r.max(dim=1, keepdim=True).values
    else:
        lo, hi = r.min(), r.max()
    return (r - lo + 1e-6) / (hi - lo)


def _naive_dpp(x: torch.Tensor, r: torch.Tensor, k: int) -> list[int]:
    """Greedy maximisation of log det(L_S) by brute force over candidates."""
    xn = x.double() / x.double().norm(dim=-1, keepdim=True)
    big_l = r.unsqueeze(1) * (xn @ xn.T) * r.unsqueeze(0)
    picks: list[int] = []
    for _ in range(k):
        best, arg = -math.inf, -1
        for j in range(x.shape[0]):
            if j in picks:
                continue
            s = picks + [j]
            val = float(torch.logdet(big_l[s][:, s]))
            if val > best:
                best, arg = val, j
        picks.append(arg)
    return picks


@pytest.mark.parametrize("sign,norm", [("negative", "batch"), ("positive", "batch"),
                                       ("negative", "sample"), ("positive", "sample")])
def test_cdpruner_matches_brute_force_logdet(sign, norm):
    x, t = _data(3, 12, 16, seed=7)
    k = 6
    r = ts.reduce(x, "cdpruner", k, text=t, relevance_sign=sign, relevance_norm=norm)
    rel = _official_relevance(x, t, -1.0 if sign == "negative" else 1.0, norm == "sample")
    for b in range(3):
        assert r.indices[b].tolist() == sorted(_naive_dpp(x[b], rel[b], k))


def test_dpp_greedy_lazy_rows_match_dense_recurrence():
    """Many rows fetched late (after earlier picks): the pre-subtracted projections must
    give the textbook recurrence's picks (float64 reference on the full kernel)."""
    from tokensieve.methods._greedy import dpp_greedy

    x, t = _data(2, 300, 64, seed=5)
    rel = _official_relevance(x, t, -1.0, per_sample=True)
    for b in range(2):
        xn = x[b].double() / x[b].double().norm(dim=-1, keepdim=True)
        big_l = rel[b].unsqueeze(1) * (xn @ xn.T) * rel[b].unsqueeze(0)
        d2, coef, want = big_l.diag().clone(), [], []
        for _ in range(40):
            j = int(torch.argmax(d2))
            want.append(j)
            e = big_l[j] - sum((c[j] * c for c in coef), torch.zeros(300, dtype=torch.float64))
            e = e / d2[j].sqrt()
            coef.append(e)
            d2 = d2 - e * e
            d2[j] = -math.inf
        lf = big_l.float()
        got = dpp_greedy(lambda i, m=lf: m[i], lf.diag(), 40)
        assert got.tolist() == want


def test_cdpruner_official_quirks():
    from tokensieve.methods.cdpruner import CDPrunerConfig, relevance

    x, t = _data(2, 30, 8, seed=2)
    # sample 1 holds the batch's relevance extremes: tokens along +/- the text's mean
    # direction (both samples share the text)
    t[1] = t[0]
    direction = torch.nn.functional.normalize(t[0], dim=-1).sum(dim=0)
    x[1, 0], x[1, 1] = direction, -direction
    rel = relevance(x, t, None, CDPrunerConfig())
    want = _official_relevance(x, t, -1.0, per_sample=False)
    torch.testing.assert_close(rel.double(), want, rtol=1e-5, atol=1e-6)
    # sign flip: the official relevance is highest for tokens least like the text
    pos = relevance(x, t, None, CDPrunerConfig(relevance_sign="positive"))
    assert torch.argmax(rel[0]) == torch.argmin(pos[0])
    # batch-wide normalisation: only sample 1 reaches 0 + 1e-6 and 1 + 1e-6
    assert rel[1, 1] > 1.0 and rel[1, 0] < 1e-5
    assert rel[0].max() < 0.999 and rel[0].min() > 1e-5
    per = relevance(x, t, None, CDPrunerConfig(relevance_norm="sample"))
    assert torch.allclose(per.amax(dim=1), torch.full((2,), 1 + 1e-6))
    # the batch couples samples by default (sample 0's relevance depends on sample 1),
    # and not with per-sample normalisation
    alone = relevance(x[:1], t[:1], None, CDPrunerConfig())
    assert not torch.allclose(alone[0], rel[0])
    torch.testing.assert_close(relevance(x[:1], t[:1], None, CDPrunerConfig(
        relevance_norm="sample"))[0], per[0])
    a = ts.reduce(x, "cdpruner", 10, text=t, relevance_norm="sample")
    one = ts.reduce(x[:1], "cdpruner", 10, text=t[:1], relevance_norm="sample")
    assert torch.equal(a.indices[0], one.indices[0])


def test_cdpruner_ignores_masked_text_and_checks_width():
    x, t = _data(2, 20, 8, seed=4, m=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    a = ts.reduce(x, "cdpruner", 8, text=t, text_mask=mask)
    t2 = t.clone()
    t2[1, 4:] = 100.0
    b = ts.reduce(x, "cdpruner", 8, text=t2, text_mask=mask)
    assert torch.equal(a.indices, b.indices)
    ref = ts.reduce(x[1:], "cdpruner", 8, text=t[1:, :4])
    assert torch.equal(ref.indices[0], ts.reduce(x[1:], "cdpruner", 8, text=t2[1:],
                                                 text_mask=mask[1:]).indices[0])
    with pytest.raises(ValueError, match="width"):
        ts.reduce(x, "cdpruner", 8, text=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="relevance_sign"):
        ts.reduce(x, "cdpruner", 8, text=t, relevance_sign="abs")


def test_cdpruner_rank_exhausted_fills_by_relevance():
    from tokensieve.methods._greedy import dpp_greedy

    x, t = _data(2, 30, 3, seed=1)  # rank-3 kernel, keep 10
    r = ts.reduce(x, "cdpruner", 10, text=t)
    rel = _official_relevance(x, t, -1.0, per_sample=False)
    for b in range(2):
        xn = torch.nn.functional.normalize(x[b], dim=-1)
        big_l = rel[b].float().unsqueeze(1) * (xn @ xn.T) * rel[b].float().unsqueeze(0)
        picks = dpp_greedy(lambda i, m=big_l: m[i], big_l.diag(), 10)
        assert sorted(picks.tolist()) == r.indices[b].tolist()
        assert picks[:3].tolist() == _naive_dpp(x[b], rel[b], 3)
        rest = rel[b].clone()
        rest[picks[:3]] = -1
        assert picks[3:].tolist() == rest.argsort(descending=True)[:7].tolist()


@pytest.mark.parametrize("n,d,k", [(40, 16, 12), (200, 64, 30), (600, 32, 64)])
def test_cdpruner_dense_and_lazy_paths_pick_the_same(n, d, k):
    """The batched dense loop (and its batch-1 form) picks what the per-sample lazy-row
    greedy picks, in the same order, on random tokens and through ``reduce``."""
    from tokensieve.core.ops import normalize
    from tokensieve.methods.cdpruner import CDPrunerConfig, dpp_select, relevance

    x, t = _data(3, n, d, seed=n)
    xn = normalize(x)
    y = xn * relevance(x, t, None, CDPrunerConfig(), normalized=xn).unsqueeze(-1)
    lazy = dpp_select(y, k, dense=False)
    assert torch.equal(dpp_select(y, k, dense=True), lazy)
    for b in range(3):
        assert torch.equal(dpp_select(y[b:b + 1], k, dense=True)[0], lazy[b])
    assert torch.equal(ts.reduce(x, "cdpruner", k, text=t).indices, lazy.sort(dim=1).values)


def test_cdpruner_dense_path_exhausted_kernel_and_ties():
    """Exact data (one-hot tokens, relevance in powers of two): ties in ``d2`` go to the
    lowest index on both paths, and a kernel exhausted at a different step per sample
    (rank 4 and rank 6, keep 10) fills up by ``diag(L)`` (ties: lowest index) as the lazy
    path does, in the batched loop and the batch-1 loop alike."""
    from tokensieve.methods.cdpruner import dpp_select

    n, k = 16, 10
    xn = torch.zeros(2, n, 8)
    xn[0, torch.arange(n), torch.arange(n) % 4] = 1.0            # rank 4, duplicates
    xn[1, torch.arange(n), torch.arange(n) % 6] = 1.0            # rank 6
    r = torch.tensor([1.0, 0.5, 0.25, 0.5]).repeat(4).expand(2, n).clone()
    r[1, 9] = 1.0                                                 # a duplicate of token 3
    y = xn * r.unsqueeze(-1)
    lazy = dpp_select(y, k, dense=False)
    dense = dpp_select(y, k, dense=True)
    assert torch.equal(dense, lazy)
    for b in range(2):
        assert torch.equal(dpp_select(y[b:b + 1], k, dense=True)[0], lazy[b])
        assert len(set(lazy[b].tolist())) == k
    # sample 0: greedy ties at d2 = 1 (tokens 0, 4, 8, 12) -> 0, then one per direction;
    # then the rest by relevance, lowest index first among equals
    assert lazy[0].tolist() == [0, 1, 3, 2, 4, 8, 12, 5, 7, 9]
    # sample 1: the most relevant token of each of the six directions, then the fill
    assert sorted(lazy[1, :6].tolist()) == [0, 1, 4, 5, 8, 9]
    assert lazy[1, 6:].tolist() == [12, 3, 7, 11]


def test_cdpruner_takes_the_dense_path_by_size(monkeypatch):
    """Up to ``DPP_DENSE_MAX_N`` tokens (LLaVA-1.5's 576) the dense loop, above it lazy rows."""
    from tokensieve.methods import cdpruner as mod

    calls = []
    monkeypatch.setattr(mod, "dpp_greedy_dense", lambda *a: calls.append("dense") or
                        _greedy.dpp_greedy_dense(*a))
    monkeypatch.setattr(mod, "dpp_greedy", lambda *a: calls.append("lazy") or
                        _greedy.dpp_greedy(*a))
    for n in (576, mod.DPP_DENSE_MAX_N, mod.DPP_DENSE_MAX_N + 1):
        calls.clear()
        x, t = _data(1, n, 8, seed=n)
        ts.reduce(x, "cdpruner", 16, text=t)
        assert calls == ["dense" if n <= mod.DPP_DENSE_MAX_N else "lazy"]


# ---------------------------------------------------------------- mmtok

def _naive_coverage(x, t, k, alpha=0.5, tau_tv=0.02, tau_vv=0.2) -> list[int]:
    xn = x.double() / x.double().norm(dim=-1, keepdim=True)
    tn = t.double() / t.double().norm(dim=-1, keepdim=True)
    m, n = tn.shape[0], xn.shape[0]
    p = torch.softmax(tn @ xn.T / tau_tv, dim=1) / m
    q = torch.softmax(xn @ xn.T / tau_vv, dim=1) / n
    rows = [[float(v) for v in row] for row in p] + [[alpha * float(v) for v in row]
                                                     for row in q]
    best = [0.0] * len(rows)
    picks: list[int] = []
    for _ in range(k):
        gains = []
        for j in range(n):
            gains.append(-math.inf if j in picks else
                         sum(max(row[j] - bst, 0.0) for row, bst in zip(rows, best, strict=True)))
        j = max(range(n), key=lambda c: (gains[c], -c))
        picks.append(j)
        best = [max(bst, row[j]) for row, bst in zip(rows, best, strict=True)]
    return picks


@pytest.mark.parametrize("n,k,opts", [(16, 5, {}), (30, 12, {"alpha": 2.0, "tau_vv": 0.05}),
                                      (25, 25, {"tau_tv": 0.5})])
def test_mmtok_matches_naive_coverage(n, k, opts):
    x, t = _data(3, n, 6, seed=n + k)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    r = ts.reduce(x, "mmtok", k, text=t, text_mask=mask, **opts)
    for b in range(3):
        want = _naive_coverage(x[b], t[b][mask[b]], k, **opts)
        assert r.indices[b].tolist() == sorted(want)


def test_greedy_coverage_gains_are_exact():
    g = torch.Generator().manual_seed(0)
    cover = torch.rand(40, 25, generator=g) ** 4
    picks = _greedy.greedy_coverage(cover, 12).tolist()
    best = torch.zeros(40)
    for j in picks:
        gains = (cover - best.unsqueeze(1)).clamp(min=0).sum(dim=0)
        gains[[p for p in picks[:picks.index(j)]]] = -math.inf
        assert j == int(torch.argmax(gains))
        best = torch.maximum(best, cover[:, j])


def _greedy_coverage_reference(cover: torch.Tensor, k: int) -> torch.Tensor:
    """The previous :func:`_greedy.greedy_coverage` loop, kept verbatim: the fast loop must
    select exactly what it selects (same float32 gains, same first-index tie-breaking)."""
    cover = cover.float()
    best = torch.zeros(cover.shape[0])
    gain = cover.sum(dim=0)
    chunk = max(1, (1 << 21) // cover.shape[1])
    picks = torch.empty(k, dtype=torch.long)
    for t in range(k):
        j = int(torch.argmax(gain))
        picks[t] = j
        if t == k - 1:
            break
        col = cover[:, j]
        rows = torch.nonzero(col > best).squeeze(1)
        for part in torch.split(rows, chunk):
            old = best[part].unsqueeze(1)
            new = col[part].unsqueeze(1)
            lost = cover.index_select(0, part).clamp_(min=old, max=new).sub_(old)
            gain -= lost.sum(dim=0)
        best[rows] = col[rows]
        gain[j] = -math.inf
    return picks


@pytest.mark.parametrize("seed", range(6))
def test_greedy_coverage_matches_previous_loop(seed):
    g = torch.Generator().manual_seed(seed)
    r, n = [(40, 25), (300, 64), (5000, 520), (64, 64), (90, 30), (700, 3000)][seed]
    k = min(n, [12, 64, 40, 64, 30, 20][seed])
    cover = torch.rand(r, n, generator=g) ** 4
    if seed % 2:
        # ties: duplicate columns, rows of equal values, quantised entries, zero rows
        cover = (cover * 8).round() / 8
        cover[:, 1::3] = cover[:, 0:-1:3][:, : cover[:, 1::3].shape[1]]
        cover[: r // 4] = 0.25
        cover[r // 4: r // 3] = 0.0
    if seed == 4:
        cover.zero_()                                  # every gain ties: picks 0, 1, 2, ...
    want = _greedy_coverage_reference(cover, k)
    got = _greedy.greedy_coverage(cover, k)
    assert got.dtype == torch.long and got.tolist() == want.tolist()
    assert len(set(got.tolist())) == k
    assert _greedy.greedy_coverage(cover, 0).shape == (0,)


@pytest.mark.parametrize("b,r,n,k", [(3, 40, 25, 12), (8, 608, 576, 64), (4, 300, 64, 64),
                                     (2, 5000, 520, 30), (5, 90, 30, 30), (1, 70, 20, 9)])
def test_greedy_coverage_batch_matches_previous_loop(b, r, n, k):
    g = torch.Generator().manual_seed(r + n)
    cover = torch.rand(b, r, n, generator=g) ** 4
    if n % 2 == 0:
        # ties: duplicate columns, rows of equal values, quantised entries
        cover = (cover * 8).round() / 8
        cover[:, :, 1::3] = cover[:, :, 0:-1:3][:, :, : cover[:, :, 1::3].shape[2]]
        cover[:, : r // 4] = 0.25
    cover[0, r // 3:] = 0.0                          # rows no pick improves
    got = _greedy.greedy_coverage_batch(cover, k)
    assert got.shape == (b, k) and got.dtype == torch.long
    for i in range(b):
        assert got[i].tolist() == _greedy_coverage_reference(cover[i], k).tolist()


def test_mmtok_matches_previous_loop():
    from tokensieve.methods.mmtok import MMTokConfig, coverage_matrix

    x, t = _data(4, 96, 32, seed=3, m=7)
    x[1, 10:20] = x[1, 0]                              # duplicate tokens: tied gains
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[:, 5:] = False                                # same text length: the batched loop
    ragged = mask.clone()
    ragged[3, 2:] = False                              # different lengths: per sample
    got = {name: ts.reduce(x, "mmtok", 40, text=t, text_mask=mk).indices
           for name, mk in (("none", None), ("mask", mask), ("ragged", ragged))}
    for b in range(4):
        for name, mk in (("none", None), ("mask", mask), ("ragged", ragged)):
            cover = coverage_matrix(x[b], t[b], None if mk is None else mk[b], MMTokConfig())
            want = sorted(_greedy_coverage_reference(cover, 40).tolist())
            assert ts.reduce(x[b:b + 1], "mmtok", 40, text=t[b:b + 1],
                             text_mask=None if mk is None else mk[b:b + 1]
                             ).indices[0].tolist() == want
            assert got[name][b].tolist() == want


def test_mmtok_bad_options():
    x, t = _data(1, 16, 4, seed=0)
    with pytest.raises(ValueError, match="tau_tv"):
        ts.reduce(x, "mmtok", 4, text=t, tau_tv=0.0)
    with pytest.raises(ValueError, match="alpha"):
        ts.reduce(x, "mmtok", 4, text=t, alpha=-1.0)
    with pytest.raises(ValueError, match="width"):
        ts.reduce(x, "mmtok", 4, text=torch.randn(1, 2, 3))


# ---------------------------------------------------------------- kmedoids

def test_kkz_init_is_farthest_first_from_largest_norm():
    x, _ = _data(2, 50, 6, seed=8)
    for b in range(2):
        dist = distance_matrix(x[b], "euclidean")
        picks = kkz_init(x[b], dist, 10).tolist()
        e = torch.cdist(x[b].double(), x[b].double())
        assert picks == _naive_max_min(e, 10, int(x[b].norm(dim=-1).argmax()))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_kmedoids_fixed_point_properties(distance):
    x, _ = _data(3, 60, 5, seed=12)
    k = 7
    r = ts.reduce(x, "kmedoids", k, distance=distance, iterations=200, threshold=0.0)
    assert r.sizes.sum(dim=1).tolist() == [60, 60, 60]
    for b in range(3):
        dist = torch.cdist(x[b].double(), x[b].double()) if distance == "euclidean" \
            else _cos_dist(x[b])
        med = r.indices[b].tolist()
        assign = r.assignment[b]
        for i in range(60):  # every token goes to its nearest medoid
            assert dist[i, med[int(assign[i])]] <= dist[i, med].min() + 1e-6
        for c, m in enumerate(med):  # every medoid minimises its cluster's total distance
            members = [i for i in range(60) if int(assign[i]) == c]
            assert m in members and int(r.sizes[b, c]) == len(members)
            cost = {i: float(dist[i, members].sum()) for i in members}
            assert cost[m] <= min(cost.values()) + 1e-5
    assert not torch.equal(r.indices[0], r.indices[1])


def test_kmedoids_zero_iterations_keeps_kkz_and_means_output():
    x, _ = _data(2, 40, 4, seed=6)
    r0 = ts.reduce(x, "kmedoids", 6, iterations=0)
    for b in range(2):
        kkz = kkz_init(x[b], distance_matrix(x[b], "euclidean"), 6)
        assert r0.indices[b].tolist() == sorted(kkz.tolist())
    med, assign = kmedoids_one(x[0], 6, KMedoidsConfig())
    rm = ts.reduce(x, "kmedoids", 6, output="means")
    assert rm.indices is None and torch.equal(rm.positions[0], med)
    for c in range(6):
        torch.testing.assert_close(rm.tokens[0, c], x[0][assign == c].mean(dim=0))
    with pytest.raises(ValueError, match="iterations"):
        ts.reduce(x, "kmedoids", 6, iterations=-1)
    with pytest.raises(ValueError, match="output"):
        ts.reduce(x, "kmedoids", 6, output="centroids")


def test_within_cluster_sums_dense_and_pair_paths_agree(monkeypatch):
    from tokensieve.methods import kmedoids as km

    g = torch.Generator().manual_seed(1)
    dist = torch.rand(30, 30, generator=g)
    assign = torch.randint(0, 4, (30,), generator=g)
    want = torch.tensor([float(sum(dist[i, j] for j in range(30) if assign[j] == assign[i]))
                         for i in range(30)])
    torch.testing.assert_close(km.within_cluster_sums(dist, assign, 4), want)
    monkeypatch.setattr(km, "PAIR_BUDGET", 0)
    torch.testing.assert_close(km.within_cluster_sums(dist, assign, 4), want)


# ---------------------------------------------------------------- dart

def _naive_dart(x, keys, text, k, pivots=4, text_pivots=4) -> list[int]:
    n = x.shape[0]
    norms = (keys if keys is not None else x).abs().sum(dim=-1)
    img = sorted(range(n), key=lambda i: (-float(norms[i]), i))[:min(pivots, k)]
    kept = set(img)
    pv = [x[i] for i in img]
    if text is not None and k > len(img):
        tn = text.abs().sum(dim=-1)
        pv += [text[i] for i in sorted(range(text.shape[0]), key=lambda i: (-float(tn[i]), i))
               [:text_pivots]]
    rest = k - len(img)
    for p, vec in enumerate(pv):
        share = rest // len(pv) + (1 if p < rest % len(pv) else 0)
        cos = {j: float(torch.nn.functional.cosine_similarity(vec, x[j], dim=0))
               for j in range(n) if j not in kept}
        kept |= set(sorted(cos, key=lambda j: (cos[j], j))[:share])
    return sorted(kept)


@pytest.mark.parametrize("k", [3, 4, 13, 40])
def test_dart_matches_naive(k):
    x, t = _data(3, 49, 8, seed=k)
    keys = torch.randn(3, 49, 5, generator=torch.Generator().manual_seed(k))
    exact = {"exact_budget": True, "pivot_order": "norm"}
    with_text = ts.reduce(x, "dart", k, keys=keys, text=t, **exact)
    no_text = ts.reduce(x, "dart", k, **exact)
    for b in range(3):
        assert with_text.indices[b].tolist() == _naive_dart(x[b], keys[b], t[b], k)
        assert no_text.indices[b].tolist() == _naive_dart(x[b], None, None, k)
        top = keys[b].abs().sum(-1).argsort(descending=True)[:min(4, k)].tolist()
        assert set(top) <= set(with_text.indices[b].tolist())


def test_dart_masked_text_pivots_and_shares():
    from tokensieve.methods.dart import pivot_shares

    valid = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    shares = pivot_shares(valid, 29)
    assert shares.sum(dim=1).tolist() == [29, 29]
    assert shares[0].tolist() == [4, 4, 4, 4, 4, 3, 3, 3]
    assert shares[1].tolist() == [5, 5, 5, 5, 5, 4, 0, 0]
    x, t = _data(2, 36, 8, seed=3, m=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    r = ts.reduce(x, "dart", 20, text=t, text_mask=mask, exact_budget=True, pivot_order="norm")
    assert r.indices[1].tolist() == _naive_dart(x[1], None, t[1, :2], 20)
    with pytest.raises(ValueError, match="pivots"):
        ts.reduce(x, "dart", 20, pivots=0)
