"""Video methods (part 1): evs, dycoke, frame-sample, frame-pool against loop re-statements
of the official code and their exact properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_video_inputs

import tokensieve as ts
from tokensieve.methods.dycoke import DyCokeConfig, dycoke_roles
from tokensieve.methods.evs import evs_retained_count
from tokensieve.methods.frame_pool import frame_pool_grid
from tokensieve.methods.frame_sample import sampled_frames


def _clip(b: int, frames: int, h: int, w: int, d: int = 16, seed: int = 0,
          step: float = 0.3) -> torch.Tensor:
    """A frame-major clip ``[B, T*H*W, D]``: every frame the previous one plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, h * w, d, generator=g)
    steps = step * torch.randn(b, frames, h * w, d, generator=g)
    steps[:, 0] = 0
    return (x + steps.cumsum(1)).reshape(b, frames * h * w, d)


# ------------------------------------------------------------------------------- evs


def _vllm_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """vLLM's ``compute_retained_tokens_count``, re-stated."""
    total = tokens_per_frame * num_frames
    return max(tokens_per_frame, int(total * (1 - q)))


def _vllm_mask(embeds: torch.Tensor, t: int, h: int, w: int, count: int) -> torch.Tensor:
    """vLLM's ``compute_retention_mask`` for one video ``[T*H*W, D]`` (merge size 1), with
    the retained count given, re-stated as a loop over frames."""
    frames = embeds.reshape(t, h, w, -1)
    rows = [torch.full((h, w), 255.0)]
    for i in range(1, t):
        rows.append(1 - F.cosine_similarity(frames[i], frames[i - 1], dim=-1))
    flat = torch.stack(rows).reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


@pytest.mark.parametrize("t,h,w,q", [
    (4, 12, 12, 0.75), (32, 14, 14, 0.7), (2, 2, 2, 0.9), (10, 3, 5, 0.0), (16, 7, 7, 0.5),
    (100, 1, 1, 0.9), (10, 1, 1, 0.7), (8, 27, 27, 0.3), (3, 4, 6, 0.999),
])
def test_evs_retained_count_is_vllms_rule(t, h, w, q):
    assert evs_retained_count(t, h, w, q) == _vllm_count(h * w, t, q)


def test_evs_retained_count_values():
    assert evs_retained_count(4, 12, 12, 0.75) == 144
    assert evs_retained_count(32, 14, 14, 0.7) == 1881        # int(6272 * 0.30000000000000004)
    assert evs_retained_count(100, 1, 1, 0.9) == 9            # the float product is 9.99..
    assert evs_retained_count(2, 2, 2, 0.9) == 4              # never below one frame
    for bad in [(0, 2, 2, 0.5), (2, 2, 2, 1.0), (2, 2, 2, -0.1), (2.0, 2, 2, 0.5),
                (2, 2, True, 0.5), (2, 2, 2, True)]:
        with pytest.raises(ValueError, match="expected"):
            evs_retained_count(*bad)


@pytest.mark.parametrize("t,h,w,q", [(4, 3, 4, 0.5), (6, 5, 5, 0.7), (8, 2, 7, 0.9),
                                     (3, 4, 4, 0.2), (1, 3, 3, 0.5)])
def test_evs_matches_vllm_selection(t, h, w, q):
    x = _clip(3, t, h, w, seed=t * 100 + h)
    r = ts.reduce(x, "evs", 1.0, frames=t, rate=q)
    count = _vllm_count(h * w, t, q)
    assert r.indices.shape == (3, count)
    for i in range(3):
        want = torch.nonzero(_vllm_mask(x[i], t, h, w, count))[:, 0]
        assert torch.equal(r.indices[i], want)
        # keep as the count gives the same selection
        assert torch.equal(ts.reduce(x[i:i + 1], "evs", count, frames=t).indices[0], want)
    torch.testing.assert_close(r.tokens, torch.gather(x, 1, r.indices.unsqueeze(-1)
                                                      .expand(-1, -1, x.shape[2])))


def test_evs_ties_break_like_vllms_stable_sort():
    """Static tokens (dissimilarity exactly 0) tie; vLLM's stable descending sort keeps the
    earlier ones first."""
    t, h, w = 5, 3, 3
    x = _clip(1, t, h, w, seed=3).reshape(t, h * w, -1)
    x[2] = x[1]                          # frame 2 is a copy of frame 1: nine zero scores
    x[4, :4] = x[3, :4]                  # four static tokens in frame 4
    x = x.reshape(1, t * h * w, -1)
    for count in range(h * w, t * h * w + 1, 4):
        want = torch.nonzero(_vllm_mask(x[0], t, h, w, count))[:, 0]
        assert torch.equal(ts.reduce(x, "evs", count, frames=t).indices[0], want)


def test_evs_first_frame_whole_and_below_one_frame():
    x = _clip(2, 4, 3, 3, seed=1)
    r = ts.reduce(x, "evs", 12, frames=4)
    assert (r.indices[:, :9] == torch.arange(9)).all()
    # below one frame: vLLM's stable order gives frame 0's first tokens in raster order
    assert torch.equal(ts.reduce(x, "evs", 5, frames=4).indices, torch.arange(5).expand(2, -1))


def test_evs_rate_caps_and_errors():
    x = _clip(1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"keep=10 is below the 18 tokens"):
        ts.reduce(x, "evs", 10, frames=4, rate=0.5)
    with pytest.raises(ValueError, match=r"rate=1\.0"):
        ts.reduce(x, "evs", 10, frames=4, rate=1.0)
    with pytest.raises(ValueError, match="'frames'"):
        ts.reduce(x, "evs", 10)
    with pytest.raises(ValueError, match="frames=5"):
        ts.reduce(x, "evs", 10, frames=5)


def test_evs_scores_in_float32_for_low_precision():
    x = _clip(2, 4, 4, 4, seed=5)
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        r = ts.reduce(low, "evs", 30, frames=4)
        assert r.tokens.dtype == dtype
        assert torch.equal(r.indices, ts.reduce(low.float(), "evs", 30, frames=4).indices)


def test_evs_sample_does_not_depend_on_its_batch():
    x = _clip(3, 4, 3, 3, seed=2)
    other = torch.cat([_clip(1, 4, 3, 3, seed=9), x[1:2]])
    assert torch.equal(ts.reduce(other, "evs", 20, frames=4).indices[1],
                       ts.reduce(x, "evs", 20, frames=4).indices[1])


# ---------------------------------------------------------------------------- dycoke


def _official_ttm(x: torch.Tensor, t: int, per: int, dycoke_k: float) -> list[int]:
    """DyCoke's official ``dycole_ttm`` for one clip ``[T*P, D]``, re-stated on token
    indices: the kept source positions (sorted)."""
    keep_share = 1 - dycoke_k
    frame = [x[i * per:(i + 1) * per] for i in range(t)]
    idx = [torch.arange(i * per, (i + 1) * per) for i in range(t)]
    sims = [F.cosine_similarity(F.normalize(frame[i], dim=1), F.normalize(frame[i + 1], dim=1),
                                dim=1) for i in range(0, t - 1, 2)]
    out = []
    for i in range(0, t - 1, 2):
        chosen = sims[(i - 2) // 2].topk(int(keep_share * per), largest=False).indices
        out.append(idx[i])
        out.append(idx[i + 1][chosen])
    for i in range(0, t - 4, 4):
        sim = F.cosine_similarity(frame[i], frame[i + 2], dim=1)
        out[i] = idx[i]
        out[i + 2] = idx[i + 2][sim.topk(int(keep_share * per), largest=False).indices]
    return sorted(torch.cat(out).tolist())


@pytest.mark.parametrize("t", [5, 6, 8, 9, 12, 13])
@pytest.mark.parametrize("dycoke_k", [0.7, 0.5])
def test_dycoke_matches_official_ttm(t, dycoke_k):
    per = 12
    x = _clip(2, t, 3, 4, seed=t)
    r = ts.reduce(x, "dycoke", 1.0, frames=t, prune_ratio=dycoke_k)
    for i in range(2):
        assert r.indices[i].tolist() == _official_ttm(x[i], t, per, dycoke_k)
    # keep = the official count without prune_ratio: the same tokens (equal shares)
    count = r.indices.shape[1]
    assert torch.equal(ts.reduce(x, "dycoke", count, frames=t).indices, r.indices)


def test_dycoke_roles_official_and_corrected():
    c = DyCokeConfig()
    assert dycoke_roles(8, c) == [None, (6, 7), (0, 2), (0, 1), None, (2, 3), None, (4, 5)]
    assert dycoke_roles(4, c) == [None, (2, 3), None, (0, 1)]
    assert dycoke_roles(5, c) == [None, (2, 3), (0, 2), (0, 1), -1]
    assert dycoke_roles(1, c) == [None]
    assert dycoke_roles(3, c) == [None, (0, 1), -1]
    fixed = DyCokeConfig(pair_scores="own", last_window="prune", odd_last_frame="keep")
    assert dycoke_roles(8, fixed) == [None, (0, 1), (0, 2), (2, 3), None, (4, 5), (4, 6),
                                      (6, 7)]
    assert dycoke_roles(7, fixed) == [None, (0, 1), (0, 2), (2, 3), None, (4, 5), (4, 6)]
    assert dycoke_roles(9, fixed)[-1] is None


def test_dycoke_corrected_variant_prunes_against_its_reference():
    t, per, m = 8, 12, 5
    x = _clip(1, t, 3, 4, seed=4)
    opts = {"pair_scores": "own", "last_window": "prune", "odd_last_frame": "keep"}
    refs = {1: 0, 2: 0, 3: 2, 5: 4, 6: 4, 7: 6}
    keep = 2 * per + len(refs) * m
    r = ts.reduce(x, "dycoke", keep, frames=t, **opts)
    kept = r.indices[0]
    frames = x[0].reshape(t, per, -1)
    for f in range(t):
        got = kept[(kept >= f * per) & (kept < (f + 1) * per)] - f * per
        if f not in refs:
            assert got.tolist() == list(range(per))
            continue
        sim = F.cosine_similarity(frames[f], frames[refs[f]], dim=-1)
        assert got.tolist() == sorted(sim.topk(m, largest=False).indices.tolist())


@pytest.mark.parametrize("t,keep", [(8, 4 * 12 + 7), (8, 4 * 12 + 12), (9, 60), (6, 40)])
def test_dycoke_keep_is_the_clip_total(t, keep):
    per = 12
    x = _clip(2, t, 3, 4, seed=t + keep)
    r = ts.reduce(x, "dycoke", keep, frames=t)
    assert r.indices.shape == (2, keep)
    roles = dycoke_roles(t, DyCokeConfig())
    pruned = [f for f, role in enumerate(roles) if isinstance(role, tuple)]
    counts = torch.stack([((r.indices[0] // per) == f).sum() for f in range(t)]).tolist()
    shares = [counts[f] for f in pruned]
    assert max(shares) - min(shares) <= 1 and shares == sorted(shares, reverse=True)
    for f, role in enumerate(roles):
        if role is None:
            assert counts[f] == per
        elif role == -1:
            assert counts[f] == 0


def test_dycoke_budget_errors_and_edges():
    x = _clip(1, 4, 3, 4)
    with pytest.raises(ValueError, match=r"keep=20 is below the 24 tokens"):
        ts.reduce(x, "dycoke", 20, frames=4)
    with pytest.raises(ValueError, match=r"keep=29 is below the 30 tokens.*prune_ratio=0\.7"):
        ts.reduce(x, "dycoke", 29, frames=4, prune_ratio=0.7)   # 2 x 12 + 2 x int(3.6)
    with pytest.raises(ValueError, match="prune_ratio"):
        ts.reduce(x, "dycoke", 30, frames=4, prune_ratio=1.5)
    with pytest.raises(ValueError, match="pair_scores"):
        ts.reduce(x, "dycoke", 30, frames=4, pair_scores="next")
    # keep everything: identity for even T; odd T drops its last frame (official)
    assert torch.equal(ts.reduce(x, "dycoke", 48, frames=4).tokens, x)
    y = _clip(1, 3, 3, 4)
    assert torch.equal(ts.reduce(y, "dycoke", 36, frames=3).indices[0], torch.arange(24))
    assert torch.equal(ts.reduce(y, "dycoke", 36, frames=3, odd_last_frame="keep").indices[0],
                       torch.arange(36))
    one = _clip(1, 1, 3, 4)
    assert torch.equal(ts.reduce(one, "dycoke", 12, frames=1).tokens, one)


def test_dycoke_sample_does_not_depend_on_its_batch():
    x = _clip(3, 8, 3, 4, seed=6)
    other = torch.cat([x[2:3], _clip(1, 8, 3, 4, seed=7)])
    assert torch.equal(ts.reduce(other, "dycoke", 70, frames=8).indices[0],
                       ts.reduce(x, "dycoke", 70, frames=8).indices[2])


# ---------------------------------------------------------------------- frame-sample


def test_sampled_frames_are_evenly_spaced():
    assert sampled_frames(8, 1) == [0]
    assert sampled_frames(8, 2) == [0, 7]
    assert sampled_frames(8, 3) == [0, 3, 7]
    assert sampled_frames(31, 23)[11] == 15                  # numpy's float step gives 14
    for t in range(1, 20):
        for c in range(1, t + 1):
            s = sampled_frames(t, c)
            assert len(set(s)) == c and s == sorted(s) and s[0] == 0
            assert c == 1 or s[-1] == t - 1
    assert sampled_frames(5, 5) == list(range(5))


@pytest.mark.parametrize("keep,frames_kept", [(12, 1), (23, 1), (24, 2), (40, 3), (96, 8)])
def test_frame_sample_keeps_whole_frames(keep, frames_kept):
    t, per = 8, 12
    x = _clip(2, t, 3, 4)
    r = ts.reduce(x, "frame-sample", keep, frames=t)
    want = torch.cat([torch.arange(f * per, (f + 1) * per)
                      for f in sampled_frames(t, frames_kept)])
    assert torch.equal(r.indices, want.expand(2, -1))
    assert torch.equal(r.tokens, x[:, want])
    assert torch.equal(r.positions, r.indices) and r.tokens.shape[1] <= keep


def test_frame_sample_below_one_frame_raises():
    x = _clip(1, 4, 3, 4)
    with pytest.raises(ValueError, match=r"keep=11 is less than one frame \(12 tokens\)"):
        ts.reduce(x, "frame-sample", 11, frames=4)


# ------------------------------------------------------------------------ frame-pool


def test_frame_pool_grid_choice():
    assert frame_pool_grid((24, 24), 64) == (8, 8)
    assert frame_pool_grid((24, 24), 50) == (7, 7)
    assert frame_pool_grid((24, 24), 47) == (7, 6)
    assert frame_pool_grid((27, 27), 196) == (14, 14)
    assert frame_pool_grid((12, 12), 1000) == (12, 12)
    assert frame_pool_grid((4, 8), 8) == (2, 4)
    assert frame_pool_grid((24, 24), 1) == (1, 1)
    # brute force: the largest count of about the frame's aspect
    for grid in [(6, 6), (4, 9), (7, 3)]:
        for budget in range(1, grid[0] * grid[1] + 1):
            h, w = frame_pool_grid(grid, budget)
            assert h <= grid[0] and w <= grid[1] and h * w <= budget


@pytest.mark.parametrize("grid,keep", [((4, 4), 16), ((4, 4), 35), ((6, 4), 24), ((5, 5), 36),
                                       ((4, 4), 64)])
def test_frame_pool_is_adaptive_average_pooling_per_frame(grid, keep):
    t, (h, w) = 4, grid
    x = _clip(2, t, h, w, d=8)
    r = ts.reduce(x, "frame-pool", keep, frames=t, grid=grid)
    oh, ow = frame_pool_grid(grid, keep // t)
    frames = x.reshape(2 * t, h, w, 8).permute(0, 3, 1, 2)
    want = F.adaptive_avg_pool2d(frames, (oh, ow)).permute(0, 2, 3, 1).reshape(2, -1, 8)
    torch.testing.assert_close(r.tokens, want)
    assert r.tokens.shape[1] == t * oh * ow <= keep and r.indices is None
    # positions: each cell's centre token, in its own frame
    for f in range(t):
        for i in range(oh):
            r0, r1 = (i * h) // oh, ((i + 1) * h + oh - 1) // oh
            for j in range(ow):
                c0, c1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
                slot = f * oh * ow + i * ow + j
                assert int(r.positions[0, slot]) == f * h * w + ((r0 + r1 - 1) // 2) * w + (
                    (c0 + c1 - 1) // 2)
                assert int(r.sizes[0, slot]) == (r1 - r0) * (c1 - c0)
    if h % oh == 0 and w % ow == 0:   # disjoint bins: the assignment re-creates the means
        pooled, _ = ts.core.ops.merge_into_slots(x, r.assignment, t * oh * ow)
        torch.testing.assert_close(pooled, r.tokens)


def test_frame_pool_errors_and_grid():
    x = _clip(1, 4, 3, 4)
    with pytest.raises(ValueError, match=r"keep=3 is less than one token per frame"):
        ts.reduce(x, "frame-pool", 3, frames=4)
    with pytest.raises(ValueError, match="'grid'"):
        ts.reduce(x, "frame-pool", 8, frames=4)            # 12 tokens a frame: not square
    assert ts.reduce(x, "frame-pool", 8, frames=4, grid=(3, 4)).tokens.shape[1] == 8


def test_video_methods_on_the_shared_clip_fixture():
    inputs = make_video_inputs(b=2, frames=4, side=6, d=8)
    x = inputs.pop("tokens")
    for method, keep in [("evs", 50), ("dycoke", 100), ("frame-sample", 72), ("frame-pool", 36)]:
        r = ts.reduce(x, method, keep, frames=inputs["frames"], grid=inputs["grid"])
        assert r.tokens.shape[:2] == (2, keep)
