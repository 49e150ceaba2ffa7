"""Attention- and layout-based pre-LLM methods against brute-force references.

vtc-cls, fopru, visionzip, visiondrop, hiprune, hired, globalcom2, dct.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from tokensieve.core.signals import Partitions
from tokensieve.methods._anyres import crop_regions, fill_to_total


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _kept_per_partition(indices: torch.Tensor, ids: torch.Tensor, num: int) -> list[list[int]]:
    out = []
    for b in range(ids.shape[0]):
        part = ids[b, indices[b]]
        out.append([int((part == p).sum()) for p in range(num)])
    return out


# ----------------------------------------------------------------------------- vtc-cls

def test_vtc_cls_is_topk_of_layer_sum():
    b, layers, n, k = 3, 5, 36, 9
    tokens, attn = _rand(b, n, 8, seed=1), _rand(b, layers, n, seed=2).abs()
    cases = [({}, range(0, 4)),  # default: every layer but the last
             ({"start_layer": 2}, range(2, 4)),
             ({"start_layer": 1, "end_layer": None}, range(1, 5))]
    for opts, used in cases:
        r = ts.reduce(tokens, "vtc-cls", k, cls_attn=attn, **opts)
        for i in range(b):
            score = [sum(float(attn[i, q, j]) for q in used) for j in range(n)]
            expect = sorted(sorted(range(n), key=lambda j: -score[j])[:k])
            assert r.indices[i].tolist() == expect


def test_vtc_cls_empty_layer_range_is_an_error():
    with pytest.raises(ValueError, match="start_layer=3"):
        ts.reduce(_rand(1, 16, 4), "vtc-cls", 4, cls_attn=_rand(1, 3, 16).abs(), start_layer=3)


# ----------------------------------------------------------------------------- fopru

def test_fopru_rank_is_topk_of_attn_received():
    tokens, attn = _rand(3, 49, 8, seed=3), _rand(3, 49, seed=4)
    r = ts.reduce(tokens, "fopru", 11, attn_received=attn)
    for i in range(3):
        assert r.indices[i].tolist() == sorted(torch.topk(attn[i], 11).indices.tolist())
    by_cls = ts.reduce(tokens, "fopru", 11, cls_attn=attn.flip(1), score="cls_attn")
    assert by_cls.indices[0].tolist() == sorted(torch.topk(attn[0].flip(0), 11).indices.tolist())


@pytest.mark.parametrize("k", [12, 14])
def test_fopru_row_mode_keeps_whole_rows(k):
    h, w = 5, 6
    tokens, attn = _rand(3, h * w, 8, seed=5), _rand(3, h * w, seed=6)
    r = ts.reduce(tokens, "fopru", k, attn_received=attn, mode="row", grid=(h, w))
    for i in range(3):
        grid = attn[i].reshape(h, w)
        rows = sorted(range(h), key=lambda q: -float(grid[q].sum()))[:k // w]
        expect = {q * w + c for q in rows for c in range(w)}
        rest = [j for j in range(h * w) if j // w not in rows]
        expect |= set(sorted(rest, key=lambda j: -float(attn[i, j]))[:k - len(expect)])
        kept = r.indices[i].tolist()
        assert kept == sorted(expect)
        full_rows = [q for q in range(h) if all(q * w + c in kept for c in range(w))]
        assert len(full_rows) == k // w


# ----------------------------------------------------------------------------- visionzip

def _naive_visionzip(x, cls_attn, keys, d, c, has_cls, average):
    n = x.shape[0]
    cands = list(range(1, n)) if has_cls else list(range(n))
    top = sorted(cands, key=lambda j: -float(cls_attn[j]))[:d - 1 if has_cls else d]
    dom = sorted(([0] if has_cls else []) + top)
    rem = [j for j in range(n) if j not in dom]
    step = max(1, len(rem) // c)
    targets = rem[::step][:c]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    groups = {t: [] for t in targets}
    for j in rem:
        if j in groups:
            continue
        sims = [float(unit[j] @ unit[t]) for t in targets]
        groups[targets[sims.index(max(sims))]].append(j)
    ctx = []
    for t in targets:
        members = groups[t]
        if average:
            ctx.append((x[t] + sum((x[j] for j in members), torch.zeros_like(x[t])))
                       / (1 + len(members)))
        else:
            mean = sum(x[j] for j in members) / len(members) if members else 0.0
            ctx.append(x[t] + mean)
    return dom, targets, [len(groups[t]) for t in targets], (x[dom], torch.stack(ctx))


@pytest.mark.parametrize("has_cls", [False, True])
@pytest.mark.parametrize("merge", ["target+mean", "mean"])
def test_visionzip_matches_naive_loops(has_cls, merge):
    b, n, d_model, keep, d, c = 3, 50, 12, 14, 10, 4
    x, attn, keys = _rand(b, n, d_model, seed=7), _rand(b, n, seed=8), _rand(b, n, 6, seed=9)
    r = ts.reduce(x, "visionzip", keep, cls_attn=attn, keys=keys, dominant=d, contextual=c,
                  has_cls=has_cls, contextual_merge=merge)
    assert r.tokens.shape == (b, d + c, d_model) and r.indices.shape == (b, d)
    for i in range(b):
        dom, targets, counts, (dom_x, ctx) = _naive_visionzip(
            x[i], attn[i], keys[i], d, c, has_cls, merge == "mean")
        assert r.indices[i].tolist() == dom
        if has_cls:
            assert r.indices[i, 0] == 0
        assert r.positions[i].tolist() == dom + targets
        assert r.sizes[i].tolist() == [1] * d + [1 + m for m in counts]
        torch.testing.assert_close(r.tokens[i, :d], dom_x)
        torch.testing.assert_close(r.tokens[i, d:], ctx, rtol=1e-5, atol=1e-5)
        # every source token is accounted for exactly once
        assert sorted(r.assignment[i].tolist()) == sorted(
            list(range(d)) + [d + q for q in range(c) for _ in range(1 + counts[q])])


def test_visionzip_official_sum_differs_from_average():
    x, attn, keys = _rand(2, 36, 8, seed=10) + 3.0, _rand(2, 36, seed=11), _rand(2, 36, 4, seed=12)
    kw = dict(cls_attn=attn, keys=keys, dominant=8, contextual=4)
    official = ts.reduce(x, "visionzip", 12, **kw)
    average = ts.reduce(x, "visionzip", 12, contextual_merge="mean", **kw)
    torch.testing.assert_close(official.tokens[:, :8], average.tokens[:, :8])
    # target + mean(assigned) has about twice the magnitude of an average around 3.0
    ratio = official.tokens[:, 8:].mean() / average.tokens[:, 8:].mean()
    assert 1.7 < float(ratio) < 2.3


def test_visionzip_dominant_is_top_cls_attention_plus_cls():
    x, attn, keys = _rand(3, 577, 16, seed=13), _rand(3, 577, seed=14), _rand(3, 577, 8, seed=15)
    attn[:, 0] = -100.0  # CLS's own entry is ignored
    r = ts.reduce(x, "visionzip", 64, cls_attn=attn, keys=keys, has_cls=True)
    assert r.indices.shape == (3, 54) and r.tokens.shape == (3, 64, 16)
    for i in range(3):
        top = torch.topk(attn[i, 1:], 53).indices + 1
        assert r.indices[i].tolist() == [0] + sorted(top.tolist())
    torch.testing.assert_close(r.tokens[:, 0], x[:, 0])


@pytest.mark.parametrize("keep,split", [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)),
                                        (32, (27, 5))])
def test_visionzip_default_split(keep, split):
    x, attn, keys = _rand(1, 576, 8), _rand(1, 576), _rand(1, 576, 4)
    r = ts.reduce(x, "visionzip", keep, cls_attn=attn, keys=keys)
    assert (r.indices.shape[1], r.tokens.shape[1] - r.indices.shape[1]) == split


def test_visionzip_explicit_split_must_add_up():
    x, attn, keys = _rand(1, 64, 8), _rand(1, 64), _rand(1, 64, 4)
    with pytest.raises(ValueError, match="keep=16"):
        ts.reduce(x, "visionzip", 16, cls_attn=attn, keys=keys, dominant=10, contextual=8)
    r = ts.reduce(x, "visionzip", 16, cls_attn=attn, keys=keys, contextual=6)
    assert r.indices.shape[1] == 10


# ----------------------------------------------------------------------------- visiondrop

def test_visiondrop_ranks_by_visual_attention_and_shares_visionzip_scheme():
    x, keys = _rand(3, 100, 8, seed=16), _rand(3, 100, 4, seed=17)
    recv, cls = _rand(3, 100, seed=18), _rand(3, 100, seed=19)
    r = ts.reduce(x, "visiondrop", 48, attn_received=recv, cls_attn=cls, keys=keys)
    assert r.indices.shape == (3, 42) and r.tokens.shape == (3, 48, 8)
    for i in range(3):
        assert r.indices[i].tolist() == sorted(torch.topk(recv[i], 42).indices.tolist())
    # Same scores -> identical to visionzip with the same split.
    zipped = ts.reduce(x, "visionzip", 48, cls_attn=recv, keys=keys, dominant=42, contextual=6)
    torch.testing.assert_close(r.tokens, zipped.tokens)
    released = ts.reduce(x, "visiondrop", 48, cls_attn=cls, keys=keys, score="cls_attn")
    assert released.indices[0].tolist() == sorted(torch.topk(cls[0], 42).indices.tolist())


def test_visiondrop_needs_its_score_signal():
    with pytest.raises(ValueError, match="'attn_received'"):
        ts.reduce(_rand(1, 64, 8), "visiondrop", 16, keys=_rand(1, 64, 4), cls_attn=_rand(1, 64))


# ----------------------------------------------------------------------------- hiprune

def _naive_hiprune(obj, deep, k, alpha, w, wrap):
    n = obj.shape[0]
    n_anchor = round(k * alpha / 5)
    anchors = sorted(range(n), key=lambda j: -float(obj[j]))[:n_anchor]
    chosen = set()
    for a in anchors:
        if wrap:
            chosen |= {min(max(a + o, 0), n - 1) for o in (0, -1, 1, -w, w)}
        else:
            r, c = divmod(a, w)
            chosen.add(a)
            for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0)):
                if 0 <= r + dr < n // w and 0 <= c + dc < w:
                    chosen.add((r + dr) * w + c + dc)
    rest = sorted((j for j in range(n) if j not in chosen), key=lambda j: -float(deep[j]))
    return anchors, chosen, sorted(chosen | set(rest[:k - len(chosen)]))


@pytest.mark.parametrize("wrap", [True, False])
def test_hiprune_buffers_are_grid_neighbours_of_anchors(wrap):
    h = w = 12
    n, k, alpha = h * w, 60, 0.5  # round(60 * 0.5 / 5) = 6 anchors
    x, attn = _rand(3, n, 8, seed=20), _rand(3, 2, n, seed=21)
    # Anchors on a row end (w - 1), on the top row (3) and on a row start (5 w).
    attn[:, 0, w - 1] = 10.0
    attn[:, 0, 3] = 9.0
    attn[:, 0, 5 * w] = 8.0
    r = ts.reduce(x, "hiprune", k, attn_received=attn, alpha=alpha, wrap=wrap)
    for i in range(3):
        anchors, chosen, expect = _naive_hiprune(attn[i, 0], attn[i, 1], k, alpha, w, wrap)
        assert len(anchors) == 6 and {w - 1, 3, 5 * w} <= set(anchors)
        assert r.indices[i].tolist() == expect
        if wrap:  # official: (w-1) + 1 wraps to the next row's first token, 3 - w clamps to 0
            assert {w, 0, 5 * w - 1} <= chosen
        else:  # every buffer is a true 4-neighbour on the grid
            for j in chosen - set(anchors):
                assert any(abs(j // w - a // w) + abs(j % w - a % w) == 1 for a in anchors)


def test_hiprune_layer_layout_and_errors():
    x, attn = _rand(2, 64, 8), _rand(2, 3, 64).abs()
    r = ts.reduce(x, "hiprune", 50, attn_received=attn, object_layer=1, deep_layer=2)
    _, _, expect = _naive_hiprune(attn[0, 1], attn[0, 2], 50, 0.1, 8, True)
    assert r.indices[0].tolist() == expect
    with pytest.raises(ValueError, match="object_layer=5"):
        ts.reduce(x, "hiprune", 50, attn_received=attn, object_layer=5)
    attn[:, 0, 27] = 10.0  # an anchor inside the grid brings 4 buffers: 5 > keep
    with pytest.raises(ValueError, match="keep=3"):
        ts.reduce(x, "hiprune", 3, attn_received=attn, alpha=1.0)


# ----------------------------------------------------------------------------- anyres

def _layout(b, side, tiling, newlines=0):
    per = side * side
    ids = torch.cat([torch.full((per,), p) for p in range(tiling[0] * tiling[1] + 1)]
                    + [torch.full((newlines,), -1)]).long()
    return Partitions(ids=ids.unsqueeze(0).repeat(b, 1), tiling=tiling, grid=(side, side))


def test_crop_regions_rowmajor_vs_2d():
    bands = crop_regions((4, 4), (2, 2), "rowmajor")
    assert bands.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert crop_regions((4, 4), (2, 2), "2d").reshape(4, 4).tolist() == [
        [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_fill_to_total_largest_remainder_and_overflow():
    got = fill_to_total(torch.tensor([[5.0, 1.25, 1.25, 2.5]]), torch.full((1, 4), 16),
                        torch.tensor([10]))
    assert got.tolist() == [[5, 1, 1, 3]]
    got = fill_to_total(torch.tensor([[13.3333, 20.0, 6.6667]]), torch.full((1, 3), 16),
                        torch.tensor([40]))
    assert got.tolist() == [[15, 16, 9]]


def _hired_inputs(newlines=0):
    side, tiling = 4, (2, 2)
    parts = _layout(2, side, tiling, newlines)
    n = parts.ids.shape[1]
    early = torch.zeros(2, n)
    # sample 0: top 8 early-attention overview tokens = row 0, column 0 (rows 1-3), (3, 3)
    for j, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0), (3, 3)]):
        early[0, r * side + c] = 10.0 - 0.1 * j
    # sample 1: the two left columns
    for j, (r, c) in enumerate([(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]):
        early[1, r * side + c] = 10.0 - 0.1 * j
    deep = _rand(2, n, seed=22).abs()
    return _rand(2, n, 8, seed=23), torch.stack([early, deep], dim=1), parts


@pytest.mark.parametrize("regions,expect", [
    # row-major bands (official): sample 0 counts (4, 1, 1, 2) -> 10 * (.5, .125, .125, .25)
    # = (5, 1.25, 1.25, 2.5) -> floors (5, 1, 1, 2) + one by largest remainder -> (5, 1, 1, 3);
    # sample 1 counts (2, 2, 2, 2) -> 2.5 each -> floors 2, ties to the lower crops: (3, 3, 2, 2)
    ("rowmajor", [[10, 5, 1, 1, 3], [10, 3, 3, 2, 2]]),
    # 2D quadrants: sample 0 counts (3, 2, 2, 1) -> (3.75, 2.5, 2.5, 1.25) -> floors (3, 2, 2, 1)
    # + quadrant 0 (.75) and quadrant 1 (.5, lower of the tie) -> (4, 3, 2, 1);
    # sample 1 counts (4, 0, 4, 0) -> (5, 0, 5, 0)
    ("2d", [[10, 4, 3, 2, 1], [10, 5, 0, 5, 0]]),
])
def test_hired_allocation_matches_hand_computation(regions, expect):
    x, attn, parts = _hired_inputs()
    r = ts.reduce(x, "hired", 20, cls_attn=attn, partitions=parts, regions=regions,
                  exact_budget=True)
    assert r.indices.shape == (2, 20)
    assert _kept_per_partition(r.indices, parts.ids, 5) == expect
    # inside every partition: the top tokens by the deep layer
    for i in range(2):
        kept = set(r.indices[i].tolist())
        for p, budget in enumerate(expect[i]):
            members = torch.nonzero(parts.ids[i] == p).squeeze(1)
            top = members[torch.topk(attn[i, 1, members], budget).indices]
            assert set(top.tolist()) == kept & set(members.tolist())


def test_hired_budget_adds_up_with_newlines_and_overflow():
    x, attn, parts = _hired_inputs(newlines=4)
    for keep in (5, 20, 37, 84):
        r = ts.reduce(x, "hired", keep, cls_attn=attn, partitions=parts, exact_budget=True)
        assert r.indices.shape == (2, keep)
        assert bool((parts.ids.gather(1, r.indices) == -1).sum(dim=1).eq(4).all())
    # alpha small, keep all: the crops cannot absorb their share, the overview takes it back
    r = ts.reduce(x, "hired", 84, cls_attn=attn, partitions=parts, alpha=0.1,
                  exact_budget=True)
    assert r.indices.shape == (2, 84)
    with pytest.raises(ValueError, match="keep=3"):
        ts.reduce(x, "hired", 3, cls_attn=attn, partitions=parts)


def _globalcom2_inputs(thumb_left, thumb_right, seed=24):
    side, tiling = 4, (1, 2)
    parts = _layout(2, side, tiling)
    n = parts.ids.shape[1]
    scores = _rand(2, n, seed=seed)
    thumb = torch.tensor([[thumb_left] * 2 + [thumb_right] * 2] * 4).reshape(-1)
    scores[:, :16] = thumb + 1e-3 * _rand(16, seed=seed + 1)
    return _rand(2, n, 8, seed=seed + 2), scores, parts


def test_globalcom2_allocation_matches_hand_computation():
    x, scores, parts = _globalcom2_inputs(2.0, 0.5)
    r = ts.reduce(x, "globalcom2", 24, cls_attn=scores, partitions=parts, exact_budget=True)
    # r = 24 / 48 = 0.5; S = (16, 4) (+ tiny noise); softmax(S / 10) = (0.7685, 0.2315);
    # scale = 0.5 * (1 + s - 0.5) = (0.6342, 0.3658) -> targets 16 * scale = (10.15, 5.85);
    # thumbnail 8; floors (8, 10, 5) = 23, one more to the largest remainder (crop 2).
    s0 = 1 / (1 + math.exp(-(16 - 4) / 10))
    assert abs(16 * 0.5 * (1 + s0 - 0.5) - 10.148) < 1e-3
    assert _kept_per_partition(r.indices, parts.ids, 3) == [[8, 10, 6]] * 2


def test_globalcom2_clipped_scale_and_crop_scores():
    x, scores, parts = _globalcom2_inputs(100.0, 0.0)
    r = ts.reduce(x, "globalcom2", 40, cls_attn=scores, partitions=parts, exact_budget=True)
    # r = 40/48; scale = (1.25 -> clipped to 1, 0.4167); targets (13.33, 16, 6.67), floors
    # (13, 16, 6) = 35; 5 missing: 2 each to the two partitions with room, then 1 by the
    # largest remainder (crop 2, .67) -> (15, 16, 9).
    assert _kept_per_partition(r.indices, parts.ids, 3) == [[15, 16, 9]] * 2
    # crop scores: L2-normed local + L2-normed resized thumbnail, checked for crop 2
    thumb = scores[:, :16].reshape(2, 1, 4, 4)
    big = F.interpolate(thumb, size=(4, 8), mode="bilinear", align_corners=False)[:, 0]
    for i in range(2):
        local = scores[i, 32:48]
        glob = big[i, :, 4:8].reshape(-1)
        combined = local / local.norm() + glob / glob.norm()
        top = (torch.topk(combined, 9).indices + 32).tolist()
        assert sorted(top) == [j for j in r.indices[i].tolist() if j >= 32]


# ----------------------------------------------------------------------------- dct

def _naive_dct_lowpass(x, h, w, oh, ow):
    def a(u, n):
        return math.sqrt((1 if u == 0 else 2) / n)

    out = torch.zeros(oh, ow, x.shape[-1], dtype=torch.float64)
    coeff = torch.zeros(oh, ow, x.shape[-1], dtype=torch.float64)
    for u in range(oh):
        for v in range(ow):
            acc = 0.0
            for i in range(h):
                for j in range(w):
                    acc = acc + x[i * w + j].double() * math.cos(
                        math.pi * (2 * i + 1) * u / (2 * h)) * math.cos(
                        math.pi * (2 * j + 1) * v / (2 * w))
            coeff[u, v] = a(u, h) * a(v, w) * acc
    for p in range(oh):
        for q in range(ow):
            acc = 0.0
            for u in range(oh):
                for v in range(ow):
                    acc = acc + a(u, oh) * a(v, ow) * coeff[u, v] * math.cos(
                        math.pi * (2 * p + 1) * u / (2 * oh)) * math.cos(
                        math.pi * (2 * q + 1) * v / (2 * ow))
            out[p, q] = acc * math.sqrt(oh * ow / (h * w))
    return out.reshape(oh * ow, -1)


def test_dct_matches_naive_loops():
    h, w = 4, 6
    x = _rand(2, h * w, 3, seed=25)
    r = ts.reduce(x, "dct", 6, grid=(h, w))  # 6 -> 2 x 3
    assert r.indices is None and r.tokens.shape == (2, 6, 3)
    for i in range(2):
        torch.testing.assert_close(r.tokens[i].double(), _naive_dct_lowpass(x[i], h, w, 2, 3),
                                   rtol=1e-5, atol=1e-6)
    assert r.sizes[0].tolist() == [4] * 6 and r.assignment.shape == (2, 24)


def test_dct_constant_grid_stays_constant_and_full_keep_is_identity():
    x = torch.full((2, 24 * 24, 5), 0.75)
    x[1] = -2.0
    r = ts.reduce(x, "dct", 64)
    torch.testing.assert_close(r.tokens, x[:, :64])
    y = _rand(2, 36, 5, seed=26)
    torch.testing.assert_close(ts.reduce(y, "dct", 36).tokens, y, rtol=1e-5, atol=1e-5)
    bf = ts.reduce(y.bfloat16(), "dct", 9)
    assert bf.tokens.dtype == torch.bfloat16
    torch.testing.assert_close(bf.tokens.float(), ts.reduce(y.bfloat16().float(), "dct",
                                                            9).tokens, rtol=2e-2, atol=2e-2)


def test_dct_keeps_low_frequency_content():
    # a slow vertical cosine survives the low-pass, a fast one is removed
    h = w = 8
    i = torch.arange(h).repeat_interleave(w).double()
    slow = torch.cos(math.pi * (2 * i + 1) * 1 / (2 * h))
    fast = torch.cos(math.pi * (2 * i + 1) * 6 / (2 * h))
    x = torch.stack([slow, fast], dim=-1).unsqueeze(0).float()
    out = ts.reduce(x, "dct", 16).tokens[0]
    assert out[:, 0].abs().max() > 0.5
    assert out[:, 1].abs().max() < 1e-5


def test_dct_rejects_budgets_without_a_grid():
    with pytest.raises(ValueError, match="keep=7"):
        ts.reduce(_rand(1, 64, 4), "dct", 7)


def _interleaved(side: int, tiling: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA-NeXT's merged layout: the overview, then the crops stitched into one
    ``rows*side x cols*side`` grid with a newline token (-1) after every grid row.
    Returns the ids and, per token, its index in the contiguous layout (-1: newline)."""
    rows, cols = tiling
    per = side * side
    ids, src = [0] * per, list(range(per))
    for big_r in range(rows * side):
        for j in range(cols):
            crop = (big_r // side) * cols + j + 1
            for c in range(side):
                ids.append(crop)
                src.append(crop * per + (big_r % side) * side + c)
        ids.append(-1)
        src.append(-1)
    return torch.tensor(ids), torch.tensor(src)


@pytest.mark.parametrize("method", ["hired", "globalcom2"])
def test_anyres_methods_follow_partition_ids_not_sequence_order(method):
    side, tiling = 3, (2, 2)
    ids, src = _interleaved(side, tiling)
    n_contig = (tiling[0] * tiling[1] + 1) * side * side
    x, attn = _rand(2, n_contig, 8, seed=27), _rand(2, 2, n_contig, seed=28).abs()
    contig = _layout(2, side, tiling)
    newline = src < 0
    x_i = torch.zeros(2, len(ids), 8)
    x_i[:, ~newline] = x[:, src[~newline]]
    attn_i = torch.zeros(2, 2, len(ids))
    attn_i[:, :, ~newline] = attn[:, :, src[~newline]]
    parts = Partitions(ids.repeat(2, 1), tiling, (side, side))
    n_newline = int(newline.sum())
    for keep in (8, 20):
        a = ts.reduce(x, method, keep, cls_attn=attn, partitions=contig, exact_budget=True)
        b = ts.reduce(x_i, method, keep + n_newline, cls_attn=attn_i, partitions=parts,
                      exact_budget=True)
        for i in range(2):
            mapped = src[b.indices[i]]
            assert sorted(mapped[mapped >= 0].tolist()) == a.indices[i].tolist()
            assert int((mapped < 0).sum()) == n_newline
