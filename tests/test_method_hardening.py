"""Hardening of the token-set methods: per-sample random draws, official rounding and pivot
order by default, empty text, extreme magnitudes and mismatched devices."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import generic_keep, inputs_for, make_inputs

import tokensieve as ts

# ----------------------------------------------------------------------------- random


def test_random_sample_does_not_depend_on_its_batch():
    x = torch.randn(4, 100, 16, generator=torch.Generator().manual_seed(0))
    full = ts.reduce(x, "random", 20, seed=11)
    for i in range(4):
        alone = ts.reduce(x[i:i + 1], "random", 20, seed=11)
        assert torch.equal(alone.indices[0], full.indices[i])
    # the same sample in another batch, at another position
    other = torch.cat([torch.randn(2, 100, 16), x[2:3]])
    assert torch.equal(ts.reduce(other, "random", 20, seed=11).indices[2], full.indices[2])
    # different samples get different draws; another seed gives another draw
    assert not torch.equal(full.indices[0], full.indices[1])
    assert not torch.equal(ts.reduce(x, "random", 20, seed=12).indices, full.indices)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_random_is_per_sample_in_every_dtype(dtype):
    x = torch.randn(3, 49, 8).to(dtype)
    full = ts.reduce(x, "random", 7, seed=0)
    for i in range(3):
        assert torch.equal(ts.reduce(x[i:i + 1], "random", 7, seed=0).indices[0],
                           full.indices[i])


# ------------------------------------------------------------------------ empty text


def _inputs(b: int = 2, n: int = 64, d: int = 32) -> tuple[torch.Tensor, dict]:
    inp = {k: v for k, v in make_inputs(b=b, n=n, d=d).items() if v is not None}
    return inp.pop("tokens"), inp


@pytest.mark.parametrize("method", ["cdpruner", "mmtok"])
def test_text_conditioned_methods_refuse_empty_text(method):
    x, inp = _inputs()
    for mask in (None, torch.zeros(2, 0, dtype=torch.bool)):
        with pytest.raises(ValueError, match=rf"'{method}' needs at least one text token.*"
                                             r"\(2, 0, 32\)"):
            ts.reduce(x, method, 16, text=torch.zeros(2, 0, 32), text_mask=mask)


def test_dart_treats_empty_text_as_no_text():
    x, inp = _inputs()
    alone = ts.reduce(x, "dart", 16)
    for mask in (None, torch.zeros(2, 0, dtype=torch.bool)):
        r = ts.reduce(x, "dart", 16, text=torch.zeros(2, 0, 32), text_mask=mask)
        assert torch.equal(r.indices, alone.indices)


# --------------------------------------------------------------- extreme magnitudes


def _extreme(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "big":
        return x * 1e30
    g = torch.Generator().manual_seed(5)
    mag = torch.where(torch.rand(x.shape[:2], generator=g) < 0.5, 1e-30, 1e30)
    return x * mag.unsqueeze(-1)


def _all_inputs(method: str) -> tuple[torch.Tensor, dict]:
    spec = ts.describe(method)
    full = inputs_for(method, b=2)
    x = full.pop("tokens")
    for name in spec.signals:  # a score signal the shared fixture does not build
        if full.get(name) is None:
            full[name] = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(1))
    return x, {k: v for k, v in full.items() if v is not None}


@pytest.mark.parametrize("kind", ["big", "mixed"])
@pytest.mark.parametrize("method", ts.list_methods())
def test_extreme_magnitudes_give_finite_tokens_and_valid_selection(method, kind):
    x, inp = _all_inputs(method)
    x = _extreme(kind, x)
    for key in ("keys", "values", "text"):
        inp[key] = _extreme(kind, inp[key])
    r = ts.reduce(x, method, generic_keep(method), **inp)
    assert torch.isfinite(r.tokens).all()
    if r.indices is not None:
        assert ((r.indices >= 0) & (r.indices < x.shape[1])).all()
        if r.mask is None:
            assert (r.indices.diff(dim=1) > 0).all()


CLUSTERING = [("divprune", {}), ("todre", {"distance": "euclidean"}), ("kmedoids", {}),
              ("kmedoids", {"distance": "cosine", "output": "means"}), ("tome", {}),
              ("turbo", {}), ("visionzip", {}), ("visiondrop", {}), ("mmtok", {}),
              ("cdpruner", {}), ("dart", {}), ("ats", {})]


@pytest.mark.parametrize("method,options", CLUSTERING)
def test_selection_is_invariant_to_a_power_of_two_scale(method, options):
    """Tokens near 1e30 (2**100) select what the unscaled tokens select: no overflow in
    norms, cosines or distances (scaling by a power of two is exact)."""
    x, inp = _inputs(n=144, d=64)
    scale = 2.0 ** 100
    a = ts.reduce(x, method, 32, **inp, **options)
    big = {k: (v * scale if k in ("keys", "values", "text") else v) for k, v in inp.items()}
    b = ts.reduce(x * scale, method, 32, **big, **options)
    assert (a.indices is None) == (b.indices is None)
    if a.indices is not None:
        assert torch.equal(a.indices, b.indices)
    if a.positions is not None:
        assert torch.equal(a.positions, b.positions)
    torch.testing.assert_close(b.tokens / scale, a.tokens, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- devices


@pytest.mark.parametrize("name", ["cls_attn", "attn_received", "keys", "values", "text",
                                  "text_mask", "partitions"])
def test_signal_on_another_device_is_named(name):
    x, inp = _all_inputs("hired")
    if name == "partitions":
        p = inp["partitions"]
        inp["partitions"] = ts.Partitions(p.ids.to("meta"), p.tiling, p.grid)
        label = "partitions.ids"
    else:
        inp[name] = inp[name].to("meta")
        label = name
    with pytest.raises(ValueError, match=rf"{label} is on device meta but tokens are on cpu"):
        ts.reduce(x, "hired", 64, **inp)


# ------------------------------------------------------- official rounding and order


def _partitions(b: int, side: int, tiling: tuple[int, int]) -> ts.Partitions:
    per = side * side
    ids = torch.arange(tiling[0] * tiling[1] + 1).repeat_interleave(per)
    return ts.Partitions(ids.expand(b, -1).clone(), tiling, (side, side))


def _official_hired(early, deep, side, tiling, k, alpha) -> list[int]:
    """A re-statement of HiRED's official selection for one sample (no newlines)."""
    per, crops = side * side, tiling[0] * tiling[1]
    full = min(int(k * alpha), per)
    sub = min(k - full, crops * per)
    kept = torch.topk(deep[:per], full).indices.tolist()
    if sub > 0:
        in_map = torch.zeros(per)
        in_map[torch.topk(early[:per], int(per * (1 - alpha))).indices] = 1
        counts = in_map.reshape(crops, -1).sum(dim=1)           # the row-major reshape
        budgets = (counts / counts.sum() * sub).int().clamp(max=per)
        for c in range(crops):
            lo = (c + 1) * per
            kept += (torch.topk(deep[lo:lo + per], int(budgets[c])).indices + lo).tolist()
    return sorted(kept)


@pytest.mark.parametrize("k", [20, 27, 33, 70])
def test_hired_default_matches_official_rounding(k):
    side, tiling = 4, (2, 2)
    n = 5 * side * side
    g = torch.Generator().manual_seed(k)
    x, attn = torch.randn(3, n, 8, generator=g), torch.rand(3, 2, n, generator=g)
    parts = _partitions(3, side, tiling)
    r = ts.reduce(x, "hired", k, cls_attn=attn, partitions=parts)
    for i in range(3):
        want = _official_hired(attn[i, 0], attn[i, 1], side, tiling, k, 0.5)
        got = r.indices[i] if r.mask is None else r.indices[i][r.mask[i]]
        assert got.tolist() == want
    exact = ts.reduce(x, "hired", k, cls_attn=attn, partitions=parts, exact_budget=True)
    assert exact.indices.shape == (3, k) and exact.mask is None


def _official_globalcom2(scores, side, tiling, k, temperature=10.0) -> list[int]:
    """A re-statement of GlobalCom2's official selection for one sample (no newlines)."""
    rows, cols = tiling
    per, crops = side * side, rows * cols
    r = k / ((crops + 1) * per)
    thumb = scores[:per].double()
    kept = torch.topk(thumb, int(per * r)).indices.tolist()
    region = [0.0] * crops
    for idx in range(per):
        i, j = divmod(idx, side)
        pi = min(i // max(side // rows, 1), rows - 1)
        pj = min(j // max(side // cols, 1), cols - 1)
        region[pi * cols + pj] += float(thumb[idx])
    top = max(region)
    e = [math.exp((s - top) / temperature) for s in region]
    soft = [v / (sum(e) + 1e-8) for v in e]
    mean = sum(soft) / crops
    scales = [min(r * (1 + s - mean), 1.0) for s in soft]
    big = torch.nn.functional.interpolate(scores[:per].float().reshape(1, 1, side, side),
                                          size=(rows * side, cols * side), mode="bilinear",
                                          align_corners=False)[0, 0]
    for c in range(crops):
        lo = (c + 1) * per
        local = scores[lo:lo + per].float()
        rr, cc = divmod(c, cols)
        glob = big[rr * side:(rr + 1) * side, cc * side:(cc + 1) * side].reshape(-1)
        combined = local / local.norm() + glob / glob.norm()
        kept += (torch.topk(combined, int(per * scales[c])).indices + lo).tolist()
    return sorted(kept)


@pytest.mark.parametrize("tiling,k", [((1, 2), 24), ((2, 2), 30), ((2, 2), 47)])
def test_globalcom2_default_matches_official_rounding(tiling, k):
    side = 4
    n = (tiling[0] * tiling[1] + 1) * side * side
    g = torch.Generator().manual_seed(k)
    x, scores = torch.randn(2, n, 8, generator=g), torch.randn(2, n, generator=g) * 20
    parts = _partitions(2, side, tiling)
    r = ts.reduce(x, "globalcom2", k, cls_attn=scores, partitions=parts)
    for i in range(2):
        got = r.indices[i] if r.mask is None else r.indices[i][r.mask[i]]
        assert got.tolist() == _official_globalcom2(scores[i], side, tiling, k)
    assert r.tokens.shape[1] < k  # the floors lose tokens here
    exact = ts.reduce(x, "globalcom2", k, cls_attn=scores, partitions=parts,
                      exact_budget=True)
    assert exact.indices.shape == (2, k)


def _official_dart(x, keys, text, k, offset=0, pivots=4, text_pivots=4) -> list[int]:
    """A re-statement of DART's official selection for one sample: pivots visited in the
    iteration order of a Python set of their sequence positions, equal floored shares."""
    n = x.shape[0]
    img = torch.topk(keys.abs().sum(-1), pivots).indices.tolist()
    txt = torch.topk(text.abs().sum(-1), text_pivots).indices.tolist()
    vec = {offset + i: x[i] for i in img} | {offset + n + j: text[j] for j in txt}
    share = (k - pivots) // (pivots + text_pivots)
    kept = set(img)
    for pos in list(set([offset + i for i in img] + [offset + n + j for j in txt])):
        free = [j for j in range(n) if j not in kept]
        cos = torch.nn.functional.cosine_similarity(vec[pos].unsqueeze(0), x[free], dim=-1)
        kept |= {free[int(t)] for t in torch.topk(-cos, share).indices}
    return sorted(kept)


@pytest.mark.parametrize("offset", [0, 35])
@pytest.mark.parametrize("k", [24, 31, 132])
def test_dart_default_matches_official_set_order_and_shares(k, offset):
    n = 40 if k < 100 else 400
    g = torch.Generator().manual_seed(k + offset)
    x, keys = torch.randn(2, n, 8, generator=g), torch.randn(2, n, 6, generator=g)
    text = torch.randn(2, 5, 8, generator=g)
    r = ts.reduce(x, "dart", k, keys=keys, text=text, image_offset=offset)
    for i in range(2):
        assert r.indices[i].tolist() == _official_dart(x[i], keys[i], text[i], k, offset)
    assert r.indices.shape[1] == 4 + 8 * ((k - 4) // 8)   # 132 -> the official 4 + 8 * 16


def test_dart_official_order_is_ascending_for_small_positions():
    from tokensieve.methods.dart import official_pivot_order

    positions = [9, 2, 14, 5, 16, 31, 17, 20]             # all below the 32-slot table
    order = official_pivot_order(positions)
    assert [positions[i] for i in order] == sorted(positions)
    # larger positions come by value mod the table size (8 slots for 4 pivots:
    # 40 -> 0, 1 -> 1, 66 -> 2, 35 -> 3)
    got = official_pivot_order([35, 40, 66, 1])
    assert [[35, 40, 66, 1][i] for i in got] == [40, 1, 66, 35]
