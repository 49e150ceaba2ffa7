"""FastVID, PruneVid and HoliTom against loop re-statements of their official algorithms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import make_video_inputs

import tokensieve as ts
from tokensieve.methods._dpc import dpc_knn
from tokensieve.methods._temporal import (
    CEIL,
    FLOOR,
    ROUND,
    apportion,
    lengths_from_cuts,
    sample_seed,
    stream,
)
from tokensieve.methods.fastvid import fastvid_segments
from tokensieve.methods.holitom import holitom_windows
from tokensieve.methods.prunevid import refine_labels, static_positions


def _clip(b: int = 1, frames: int = 4, side: int = 6, d: int = 16, seed: int = 0):
    inputs = make_video_inputs(b=b, frames=frames, side=side, d=d, seed=seed)
    return inputs.pop("tokens"), inputs


def _rows(r, i: int):
    """Row ``i`` of a reduction as {position: (token, size)} over its real outputs."""
    real = slice(None) if r.mask is None else r.mask[i]
    return {int(p): (t, int(s)) for p, t, s in
            zip(r.positions[i][real], r.tokens[i][real], r.sizes[i][real], strict=True)}


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for p, (tok, size) in want.items():
        assert got[p][1] == size, p
        torch.testing.assert_close(got[p][0].float(), tok.float(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ shared


@pytest.mark.parametrize("offset,rounding", [(FLOOR, math.floor), (CEIL, math.ceil),
                                             (ROUND, round)])
def test_apportion_reproduces_the_official_rounding_of_one_ratio(offset, rounding):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(0, 40, (6,), generator=g).tolist()
        ratio = float(torch.rand(1, generator=g)) * 0.9 + 0.01
        official = [min(s, rounding(ratio * s)) for s in sizes]
        assert apportion(sizes, sum(official), [offset] * 6) == official


def test_apportion_takes_whole_groups_first_and_caps_at_the_sizes():
    assert apportion([3, 20, 2], 9, [FLOOR] * 3, whole=[True, False, True]) == [3, 4, 2]
    assert apportion([3, 20, 2], 100, [FLOOR] * 3) == [3, 20, 2]
    assert apportion([3, 20, 2], 4, [FLOOR] * 3, whole=[True, False, True]) == [3, 0, 1]


def test_lengths_from_cuts():
    assert lengths_from_cuts([], 5) == [5]
    assert lengths_from_cuts([3, 0, 3], 5) == [1, 3, 1]


# ------------------------------------------------------------------------------ HoliTom


def _saved(sim: torch.Tensor, windows, tau: float) -> int:
    total = 0
    for s, e in windows:
        if e > s:
            total += (e - s) * int((sim[s:e] > tau).all(dim=0).sum())
    return total


def _compositions(t: int):
    for cuts in itertools.product([False, True], repeat=t - 1):
        windows, start = [], 0
        for i, cut in enumerate(cuts):
            if cut:
                windows.append((start, i))
                start = i + 1
        yield [*windows, (start, t - 1)]


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 6])
def test_holitom_dp_saves_as_much_as_the_best_segmentation(t):
    g = torch.Generator().manual_seed(t)
    for _ in range(20):
        sim = torch.rand(t - 1, 9, generator=g) * 0.5 + 0.55
        windows = holitom_windows(sim, 0.8, 1024)
        assert [s for s, _ in windows][1:] == [e + 1 for _, e in windows][:-1]
        assert windows[0][0] == 0 and windows[-1][1] == t - 1
        best = max(_saved(sim, w, 0.8) for w in _compositions(t))
        assert _saved(sim, windows, 0.8) == best
        capped = holitom_windows(sim, 0.8, 2)
        assert all(e - s < 2 for s, e in capped)
        assert _saved(sim, capped, 0.8) == max(
            _saved(sim, w, 0.8) for w in _compositions(t) if all(e - s < 2 for s, e in w))


def _holitom_reference(x, attn, t, n, ratio, tau, seed):
    """Official HoliTom (D = 0, NO_BETA = 1) for one clip, counts from ``ratio``."""
    frames = x.view(t, n, -1)
    unit = torch.nn.functional.normalize(frames.float(), dim=-1)
    sim = (unit[:-1] * unit[1:]).sum(-1)
    windows = holitom_windows(sim, tau, 1024)
    saved = _saved(sim, windows, tau)
    r = min(ratio / ((t * n - saved) / (t * n)), 1)
    out, key = {}, 0
    for s, e in windows:
        static = torch.zeros(n, dtype=torch.bool)
        if e > s:
            static = (sim[s:e] > tau).all(dim=0)
            pos = torch.nonzero(static).flatten()
            c = round(len(pos) * r)
            if c:
                avg = frames[s:e + 1, pos].float().mean(0)
                cl = dpc_knn(avg[None], c, knn=min(7, c), generator=stream(seed, key))
                for j in range(c):
                    out[int(pos[cl.centres[0, j]]) + s * n] = (cl.tokens[0, j],
                                                               int(cl.sizes[0, j]) * (e - s + 1))
            key += 1
        dyn = torch.nonzero(~static).flatten()
        for f in range(s, e + 1):
            c = math.ceil(len(dyn) * r)
            order = sorted(range(len(dyn)), key=lambda j: (-float(attn[f * n + dyn[j]]), j))
            for j in order[:c]:
                out[int(dyn[j]) + f * n] = (frames[f, dyn[j]], 1)
            key += 1
    return out


@pytest.mark.parametrize("frames,ratio,tau", [(4, 0.25, 0.8), (6, 0.1, 0.8), (5, 0.3, 0.95)])
def test_holitom_matches_the_official_loop_at_the_official_count(frames, ratio, tau):
    x, inp = _clip(b=2, frames=frames, seed=frames)
    n = 36
    # frames 2.. drift away, so windows and single frames both occur
    x = x.clone()
    drift = torch.randn(x[:, 2 * n:].shape, generator=torch.Generator().manual_seed(1))
    x[:, 2 * n:] += 2.0 * drift
    attn = inp["attn_received"]
    for i in range(2):
        seed = sample_seed(torch.Generator().manual_seed(3))
        want = _holitom_reference(x[i], attn[i], frames, n, ratio, tau, seed)
        r = ts.reduce(x[i:i + 1], "holitom", len(want), seed=3, frames=frames, grid=(6, 6),
                      attn_received=attn[i:i + 1], tau=tau)
        _assert_same(_rows(r, 0), want)
        assert r.mask is None and sum(s for _, s in want.values()) <= frames * n


def test_holitom_sizes_cover_the_clip_and_contextual_share_merges():
    x, inp = _clip(b=2, frames=5)
    r = ts.reduce(x, "holitom", 40, **inp)
    assert r.tokens.shape == (2, 40, 16) and (r.sizes.sum(1) == x.shape[1]).all()
    c = ts.reduce(x, "holitom", 40, contextual_share=0.5, **inp)
    assert c.tokens.shape == (2, 40, 16) and (c.sizes > 1).any()


# ------------------------------------------------------------------------------ PruneVid


def test_refine_labels_follows_the_official_rules():
    assert refine_labels([0, 0, 1, 0, 0, 0]) == [0, 0, 0, 0, 0, 0]
    assert refine_labels([2, 1, 1, 2, 2, 2, 1]) == [1, 1, 1, 2, 2, 2, 2]
    # a single-frame label is cleared and joins the longer neighbour (ties: the left one)
    assert refine_labels([0, 0, 1, 2, 2]) == [0, 0, 0, 2, 2]
    assert refine_labels([0, 0, 1, 2, 2, 2]) == [0, 0, 2, 2, 2, 2]
    assert refine_labels([1, 2, 3]) == [0, 0, 0]


def test_static_positions_is_the_mean_over_distinct_pairs():
    w = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(0))
    w[:, :3] = w[:1, :3] + 0.05 * w[:, :3]
    unit = torch.nn.functional.normalize(w, dim=-1)
    mean = torch.tensor([sum(float(unit[a, p] @ unit[c, p]) for a in range(4) for c in range(4)
                             if a != c) / 12 for p in range(7)])
    assert torch.equal(static_positions(w, 0.8), mean > 0.8)
    assert static_positions(w, 0.8)[:3].all()
    assert not static_positions(w[:1], -1.0).any()


def _prunevid_reference(x, t, n, seed):
    """Official PruneVid (cluster ratio 0.5, groups of <= 14 kept) for one clip."""
    frames = x.view(t, n, -1)
    labels = dpc_knn(frames.float().mean(1)[None], max(1, int(t * 0.25)), knn=min(7, t),
                     generator=stream(seed, 0)).assignment[0].tolist()
    labels = refine_labels(labels)
    out, key, start = {}, 1, 0
    for length in [len(list(g)) for _, g in itertools.groupby(labels)]:
        static = static_positions(frames[start:start + length], 0.8)
        groups = []
        if length > 1:
            groups.append((start, length, torch.nonzero(static).flatten()))
        dyn = torch.nonzero(~static).flatten()
        groups += [(f, 1, dyn) for f in range(start, start + length)]
        for f, w, pos in groups:
            feat = frames[f:f + w, pos].float().mean(0)
            if len(pos) <= 14:
                for j in range(len(pos)):
                    out[int(pos[j]) + f * n] = (feat[j], w)
            else:
                c = int(len(pos) * 0.5)
                cl = dpc_knn(feat[None], c, knn=7, generator=stream(seed, key))
                for j in range(c):
                    out[int(pos[cl.centres[0, j]]) + f * n] = (cl.tokens[0, j],
                                                               int(cl.sizes[0, j]) * w)
            key += 1
        start += length
    return out


@pytest.mark.parametrize("frames,side", [(4, 6), (8, 5), (6, 4)])
def test_prunevid_matches_the_official_loop_at_the_official_count(frames, side):
    x, inp = _clip(b=2, frames=frames, side=side, seed=frames)
    n = side * side
    x = x.clone()
    x[:, (frames // 2) * n:] += 3.0
    for i in range(2):
        seed = sample_seed(torch.Generator().manual_seed(5))
        want = _prunevid_reference(x[i], frames, n, seed)
        r = ts.reduce(x[i:i + 1], "prunevid", len(want), seed=5, frames=frames,
                      grid=(side, side))
        _assert_same(_rows(r, 0), want)
        assert sum(s for _, s in want.values()) == frames * n


def test_prunevid_pads_when_keep_exceeds_the_averaged_tokens():
    x, inp = _clip(b=2, frames=4)
    x[1] = x[1, :36].repeat(4, 1)                  # a still clip: everything static
    r = ts.reduce(x, "prunevid", 100, **{k: inp[k] for k in ("frames", "grid")})
    assert r.mask is not None and int(r.mask[1].sum()) == 36
    assert int(r.sizes[1][r.mask[1]].sum()) == 144


# ------------------------------------------------------------------------------ FastVID


def _fastvid_reference(x, attn, t, n, segments, tau, seed, ratio=0.1, d=0.4, p=4, beta=0.6):
    """Official FastVID (LLaVA-OneVision code, parallel density path) for one clip."""
    frames = x.view(t, n, -1)
    glob = torch.nn.functional.normalize(frames.float().mean(1), dim=-1)
    sim = (glob[:-1] * glob[1:]).sum(-1)
    cuts = sorted(range(t - 1), key=lambda i: (float(sim[i]), i))[:segments - 1]
    cuts = sorted(set(cuts) | {i for i in range(t - 1) if sim[i] < tau})
    lengths = lengths_from_cuts(cuts, t)
    keep_n = int(n * ratio)
    s_num = keep_n - int(keep_n * d)
    c_num = keep_n - s_num
    out = {}
    rest, scores = [], []
    for f in range(t):
        order = sorted(range(n), key=lambda j: (-float(attn[f * n + j]), j))
        for j in order[:s_num]:
            out[f * n + j] = (frames[f, j], 1)
        left = sorted(order[s_num:])
        rest.append(left)
        y = frames[f, left].float()
        m = len(left)
        dist = torch.cdist(y, y)  # torch's default mode, as the official code
        dist = dist / math.sqrt(y.shape[1])
        jitter = torch.rand(m, generator=stream(seed, f))
        dens = [math.exp(-float((dist[i].sort().values[:min(4, m)] ** 2).mean()))
                + float(jitter[i]) * 1e-6 for i in range(m)]
        delta = []
        for i in range(m):
            higher = [float(dist[i, j]) for j in range(m) if dens[j] > dens[i]]
            delta.append(min(higher) if higher else float(dist.max()))
        scores.append([delta[i] * dens[i] for i in range(m)])
    start = 0
    for length in lengths:
        anchors = [f for f in range(start, start + length) if (start + length - 1 - f) % p == 0]
        per = c_num * length // len(anchors)
        members = torch.cat([frames[f, rest[f]] for f in range(start, start + length)]).float()
        for f in anchors:
            pick = sorted(range(len(rest[f])), key=lambda j: -scores[f][j])[:per]
            targets = frames[f, [rest[f][j] for j in pick]].float()
            unit_t = torch.nn.functional.normalize(targets, dim=-1)
            unit_m = torch.nn.functional.normalize(members, dim=-1)
            choice = (unit_m @ unit_t.T).argmax(1)
            for slot, j in enumerate(pick):
                group = members[choice == slot]
                cnt = len(group)
                w = max(1 / (cnt + 1), beta)
                mean = group.mean(0) if cnt else torch.zeros_like(targets[slot])
                out[f * n + rest[f][j]] = (w * targets[slot] + (1 - w) * mean, max(cnt, 1))
        start += length
    return out, lengths


@pytest.mark.parametrize("frames,segments,tau", [(4, 8, 0.9), (4, 2, -1.0), (6, 3, -1.0),
                                                 (8, 2, -1.0)])
def test_fastvid_matches_the_official_loop_at_ten_percent(frames, segments, tau):
    x, inp = _clip(b=2, frames=frames, side=10, seed=frames)
    n = 100
    attn = inp["attn_received"]
    for i in range(2):
        seed = sample_seed(torch.Generator().manual_seed(9))
        want, lengths = _fastvid_reference(x[i], attn[i], frames, n, segments, tau, seed)
        if any(4 * length % -(-length // 4) for length in lengths):
            continue        # the official floor would drop anchors (here kept): not comparable
        r = ts.reduce(x[i:i + 1], "fastvid", frames * 10, seed=9, frames=frames, grid=(10, 10),
                      attn_received=attn[i:i + 1], segments=segments, tau=tau)
        _assert_same(_rows(r, 0), want)
        assert r.indices.shape[1] == frames * 6


def test_fastvid_segments_cut_the_lowest_and_the_dissimilar():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    assert fastvid_segments(g, 2, -1.0) == [2, 3]
    assert fastvid_segments(g, 1, 0.999) == [1, 1, 1, 1, 1]
    assert fastvid_segments(g[:1], 8, 0.9) == [1]


def test_fastvid_meets_any_budget_and_the_cls_attn_option():
    x, inp = _clip(b=2, frames=6)
    for keep in (1, 7, 60, 216):
        r = ts.reduce(x, "fastvid", keep, segments=2, tau=-1.0, **inp)
        assert r.tokens.shape == (2, keep, 16) and r.mask is None
        assert (r.positions.diff(dim=1) > 0).all()
    cls = torch.rand(2, 216, generator=torch.Generator().manual_seed(0))
    r = ts.reduce(x, "fastvid", 30, score="cls_attn", cls_attn=cls,
                  frames=inp["frames"], grid=inp["grid"])
    assert r.tokens.shape == (2, 30, 16)
    with pytest.raises(ValueError, match="cls_attn"):
        ts.reduce(x, "fastvid", 30, score="cls_attn", frames=inp["frames"])


@pytest.mark.parametrize("method", ["fastvid", "prunevid", "holitom"])
def test_bad_frames_are_refused(method):
    x, inp = _clip(b=1, frames=4)
    inp["frames"] = 5
    with pytest.raises(ValueError, match="frames"):
        ts.reduce(x, method, 20, **inp)
