"""tome, turbo, evit and ats against brute-force references and exact invariants."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.core.ops import merge_into_slots
from tokensieve.methods._matching import bipartite_soft_matching
from tokensieve.methods.ats import ats_significance
from tokensieve.methods.tome import tome_merge
from tokensieve.methods.turbo import turbo_merge


def _data(b: int = 3, n: int = 64, d: int = 16, seed: int = 0) -> dict:
    """Different tokens / attention / keys / values per sample."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(b, n, generator=g) ** 3
    return {
        "tokens": torch.randn(b, n, d, generator=g, dtype=torch.float64).float(),
        "cls_attn": attn / attn.sum(1, keepdim=True),
        "keys": torch.randn(b, n, 8, generator=g),
        "values": torch.randn(b, n, 8, generator=g),
    }


def _weighted_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() * w.double().unsqueeze(-1)).sum(1)


# --------------------------------------------------------------------------- naive references


def _naive_merge(x: torch.Tensor, metric: torch.Tensor, k: int, protect: bool,
                 attn: torch.Tensor | None = None, weight: float = 0.0
                 ) -> tuple[torch.Tensor, list[int], list[int]]:
    """Rounds of ToMe matching on one sample ``[N, D]`` with Python loops, down to ``k``.

    Each round removes ``min(T - k, (T - protect) // 2)`` tokens; a merged group's token and
    metric are size-weighted means, its attention the plain mean of its members'.
    Returns (tokens in original order, sizes, surviving positions)."""
    toks = [row.double() for row in x]
    mets = [row.double() for row in metric]
    att = [0.0] * len(toks) if attn is None else [float(v) for v in attn]
    sizes, pos = [1.0] * len(toks), list(range(len(toks)))
    while len(toks) > k:
        t = len(toks)
        r = min(t - k, (t - protect) // 2)
        a_set, b_set = list(range(0, t, 2)), list(range(1, t, 2))
        unit = [v / v.norm() for v in mets]
        best = {}
        for a in a_set:
            sims = [float(unit[a] @ unit[b]) for b in b_set]
            j = max(range(len(sims)), key=lambda i: (sims[i], -i))  # first maximum
            best[a] = (sims[j] - weight * att[a], b_set[j])
        candidates = [a for a in a_set if not (protect and a == 0)]
        merged = sorted(candidates, key=lambda a: -best[a][0])[:r]  # stable: lower a first
        groups = {i: [i] for i in range(t) if i not in merged}
        for a in merged:
            groups[best[a][1]].append(a)
        keep = sorted(groups)
        total = [sum(sizes[m] for m in groups[i]) for i in keep]
        toks = [sum(sizes[m] * toks[m] for m in groups[i]) / total[j] for j, i in enumerate(keep)]
        mets = [sum(sizes[m] * mets[m] for m in groups[i]) / total[j] for j, i in enumerate(keep)]
        att = [sum(att[m] for m in groups[i]) / len(groups[i]) for i in keep]
        sizes, pos = total, [pos[i] for i in keep]
    return torch.stack(toks), [int(v) for v in sizes], pos


def _naive_ats(sig: torch.Tensor, m: int) -> list[int]:
    """ATS inverse transform sampling on one sample, following the official steps."""
    sorted_scores, order = torch.sort(sig, stable=True)
    cdf = torch.cumsum(sorted_scores, 0)
    ncdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
    start = float(ncdf[ncdf > 0].min())
    if m == 1:
        ys = [1.0]
    else:
        ys = [start + (1.0 - start) * (i / (m - 1)) for i in range(m)]
    picks = {int(torch.argmin((torch.tensor(y) - ncdf).abs())) for y in ys}
    return sorted(int(order[p]) for p in picks)


# --------------------------------------------------------------------------------------- tome


@pytest.mark.parametrize("has_cls", [False, True])
@pytest.mark.parametrize("n,k", [(64, 40), (64, 7), (576, 64), (15, 9)])
def test_tome_preserves_size_weighted_mean_and_total_size(has_cls, n, k):
    d = _data(n=n)
    r = ts.reduce(d["tokens"], "tome", k, keys=d["keys"], has_cls=has_cls)
    assert r.tokens.shape == (3, k, 16) and r.indices is None
    assert r.sizes.dtype == torch.long and (r.sizes.sum(1) == n).all()
    torch.testing.assert_close(_weighted_sum(r.tokens, r.sizes), d["tokens"].double().sum(1),
                               rtol=1e-5, atol=1e-4)
    # The assignment reproduces every output token as the mean of its source group.
    pooled, count = merge_into_slots(d["tokens"], r.assignment, k)
    torch.testing.assert_close(r.tokens, pooled, rtol=1e-5, atol=1e-5)
    assert torch.equal(count.long(), r.sizes)
    # Positions ascend and each one belongs to its own group.
    assert (r.positions.diff(dim=1) > 0).all()
    assert torch.equal(r.assignment.gather(1, r.positions), torch.arange(k).expand(3, -1))


@pytest.mark.parametrize("has_cls", [False, True])
@pytest.mark.parametrize("t,r", [(10, 3), (11, 5), (9, 4), (16, 8), (7, 1)])
def test_tome_single_round_matches_naive_loop(has_cls, t, r):
    if r > (t - has_cls) // 2:
        pytest.skip("more than half")
    d = _data(n=t, seed=t * 10 + r)
    out = tome_merge(d["tokens"], t - r, metric=d["keys"], has_cls=has_cls)
    for i in range(3):
        ref, sizes, keep = _naive_merge(d["tokens"][i], d["keys"][i], t - r, has_cls)
        torch.testing.assert_close(out.tokens[i].double(), ref, rtol=1e-5, atol=1e-6)
        assert out.sizes[i].tolist() == sizes
        assert out.positions[i].tolist() == keep


@pytest.mark.parametrize("method", ["tome", "turbo"])
@pytest.mark.parametrize("has_cls", [False, True])
def test_multi_round_merging_matches_naive_loop(method, has_cls):
    d = _data(n=45, seed=3)
    attn = d["cls_attn"] * 45 / 100  # comparable to the similarities after the x100 scale
    r = ts.reduce(d["tokens"], method, 6, keys=d["keys"], cls_attn=attn, has_cls=has_cls,
                  **({"alpha": 0.5} if method == "turbo" else {}))
    for i in range(3):
        ref, sizes, keep = _naive_merge(d["tokens"][i], d["keys"][i], 6, has_cls, attn[i],
                                        50.0 if method == "turbo" else 0.0)
        torch.testing.assert_close(r.tokens[i].double(), ref, rtol=1e-5, atol=1e-6)
        assert r.sizes[i].tolist() == sizes and r.positions[i].tolist() == keep


def test_matching_closures_merge_unmerge():
    d = _data(n=12)
    match = bipartite_soft_matching(d["keys"], 4)
    x = d["tokens"]
    merged = match.merge(x, "sum")
    torch.testing.assert_close(merged.sum(1), x.sum(1), rtol=1e-5, atol=1e-5)
    mean = match.merge(x, "mean")
    back = match.unmerge(mean)
    assert back.shape == x.shape
    # Every token of a group unmerges to its group's mean; survivors of size 1 are unchanged.
    solo = torch.ones(3, 12, dtype=torch.bool)
    solo.scatter_(1, match.src, False)
    solo.scatter_(1, match.dst, False)
    torch.testing.assert_close(back[solo], x[solo])
    torch.testing.assert_close(back.gather(1, match.src.unsqueeze(-1).expand(-1, -1, 16)),
                               back.gather(1, match.dst.unsqueeze(-1).expand(-1, -1, 16)))
    with pytest.raises(ValueError, match="r=7"):
        bipartite_soft_matching(d["keys"], 7)


def test_matching_with_one_large_group_sums_every_member():
    # Tokens along one direction (power-of-two scales normalise exactly) tie on cosine
    # similarity, so every A token picks the first B token: one group of 21.
    scale = 2.0 ** (torch.arange(40) % 8).float()
    x = scale.reshape(1, 40, 1).expand(2, -1, 3).contiguous()
    match = bipartite_soft_matching(x, 20)
    assert int(match.group_sizes().max()) == 21 and (match.dst == 1).all()
    torch.testing.assert_close(match.merge(x, "sum").sum(1), x.sum(1))
    merged, sizes = match.merge_wavg(x)
    assert (sizes[:, 0] == 21).all()
    torch.testing.assert_close(merged[:, 0], (x[:, 0::2].sum(1) + x[:, 1]) / 21)


def test_tome_never_merges_cls():
    d = _data(n=33)
    x = d["tokens"].clone()
    x[:, 0] = x[:, 3]  # CLS identical to a B token: the best possible merge if unprotected
    free = tome_merge(x, 9)
    assert (free.sizes[:, 0] > 1).any() or (free.positions[:, 0] != 0).any()
    r = ts.reduce(x, "tome", 9, has_cls=True)
    assert (r.positions[:, 0] == 0).all() and (r.sizes[:, 0] == 1).all()
    assert torch.equal(r.tokens[:, 0], x[:, 0])
    assert ((r.assignment == 0).sum(1) == 1).all()


def test_tome_uses_keys_and_prior_sizes():
    d = _data(n=64)
    by_keys = ts.reduce(d["tokens"], "tome", 20, keys=d["keys"])
    by_tokens = ts.reduce(d["tokens"], "tome", 20, keys=d["keys"], use_keys=False)
    assert not torch.equal(by_keys.positions, by_tokens.positions)
    assert torch.equal(by_tokens.tokens, ts.reduce(d["tokens"], "tome", 20).tokens)
    prior = torch.randint(1, 5, (3, 64)).float()
    out = tome_merge(d["tokens"], 20, metric=d["keys"], sizes=prior)
    torch.testing.assert_close(out.sizes.sum(1), prior.sum(1))
    torch.testing.assert_close(_weighted_sum(out.tokens, out.sizes),
                               _weighted_sum(d["tokens"], prior), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="sizes"):
        tome_merge(d["tokens"], 20, sizes=-prior)


def test_tome_batch_rows_are_independent_and_bad_budget_named():
    d = _data(n=49)
    full = ts.reduce(d["tokens"], "tome", 10, keys=d["keys"], has_cls=True)
    for i in range(3):
        one = ts.reduce(d["tokens"][i:i + 1], "tome", 10, keys=d["keys"][i:i + 1], has_cls=True)
        assert torch.equal(one.tokens[0], full.tokens[i])
        assert torch.equal(one.assignment[0], full.assignment[i])
    with pytest.raises(ValueError, match="keep=1"):
        ts.reduce(d["tokens"], "tome", 1, has_cls=True)
    with pytest.raises(ValueError, match="has_cls"):
        ts.reduce(d["tokens"], "tome", 4, has_cls="yes")


# -------------------------------------------------------------------------------------- turbo


@pytest.mark.parametrize("has_cls", [False, True])
def test_turbo_preserves_mean_and_protects_cls(has_cls):
    d = _data(n=100)
    r = ts.reduce(d["tokens"], "turbo", 24, cls_attn=d["cls_attn"], has_cls=has_cls)
    assert r.tokens.shape == (3, 24, 16) and (r.sizes.sum(1) == 100).all()
    torch.testing.assert_close(_weighted_sum(r.tokens, r.sizes), d["tokens"].double().sum(1),
                               rtol=1e-5, atol=1e-4)
    pooled, _ = merge_into_slots(d["tokens"], r.assignment, 24)
    torch.testing.assert_close(r.tokens, pooled, rtol=1e-5, atol=1e-5)
    if has_cls:
        assert (r.positions[:, 0] == 0).all() and (r.sizes[:, 0] == 1).all()
        assert torch.equal(r.tokens[:, 0], d["tokens"][:, 0])


@pytest.mark.parametrize("has_cls", [False, True])
def test_turbo_single_round_matches_naive_loop_with_penalty(has_cls):
    d = _data(n=21, seed=5)
    out = turbo_merge(d["tokens"], 21 - 6, d["cls_attn"], alpha=0.7, metric=d["keys"],
                      has_cls=has_cls)
    for i in range(3):
        ref, sizes, keep = _naive_merge(d["tokens"][i], d["keys"][i], 21 - 6, has_cls,
                                        d["cls_attn"][i], 70.0)
        torch.testing.assert_close(out.tokens[i].double(), ref, rtol=1e-5, atol=1e-6)
        assert out.sizes[i].tolist() == sizes and out.positions[i].tolist() == keep


def test_turbo_alpha_zero_is_tome_and_attention_protects_tokens():
    d = _data(n=64)
    plain = ts.reduce(d["tokens"], "turbo", 16, cls_attn=d["cls_attn"], alpha=0.0)
    assert torch.equal(plain.tokens, ts.reduce(d["tokens"], "tome", 16).tokens)
    # A few A tokens with dominant CLS attention are never merged when alpha is large (one
    # round removing 24 of the 32 A tokens; a round removing all of A merges every A token).
    attn = torch.full((3, 64), 1e-4)
    star = torch.tensor([4, 10, 30])
    attn[:, star] = 0.3
    r = ts.reduce(d["tokens"], "turbo", 40, cls_attn=attn, alpha=10.0)
    plain = ts.reduce(d["tokens"], "turbo", 40, cls_attn=attn, alpha=0.0)
    for i in range(3):
        for s in star.tolist():
            slot = int(r.assignment[i, s])
            assert int(r.positions[i, slot]) == s and int(r.sizes[i, slot]) == 1
    assert not all(int(plain.sizes[i, plain.assignment[i, s]]) == 1
                   and int(plain.positions[i, plain.assignment[i, s]]) == s
                   for i in range(3) for s in star.tolist())


# --------------------------------------------------------------------------------------- evit


@pytest.mark.parametrize("has_cls", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_evit_keeps_top_attention_and_fuses_the_rest(has_cls, normalize):
    d = _data(n=50)
    attn = d["cls_attn"].clone()
    attn[:, 0] = 10.0  # CLS self attention: ignored with has_cls, the top token otherwise
    k = 12
    r = ts.reduce(d["tokens"], "evit", k, cls_attn=attn, has_cls=has_cls,
                  fuse_normalize=normalize)
    c = int(has_cls)
    assert r.tokens.shape == (3, k, 16) and r.indices.shape == (3, k - 1)
    for i in range(3):
        order = sorted(range(c, 50), key=lambda j: -float(attn[i, j]))
        top = sorted(order[:k - 1 - c])
        assert r.indices[i].tolist() == [0] * c + top
        dropped = [j for j in range(c, 50) if j not in top]
        w = attn[i, dropped].double()
        if normalize:
            w = w / w.sum()
        fused = (w.unsqueeze(-1) * d["tokens"][i, dropped].double()).sum(0)
        torch.testing.assert_close(r.tokens[i, -1].double(), fused, rtol=1e-5, atol=1e-6)
        assert int(r.sizes[i, -1]) == len(dropped) and int(r.positions[i, -1]) == order[k - 1 - c]
        assert (r.assignment[i, dropped] == k - 1).all()
    assert torch.equal(r.tokens[:, :-1], torch.gather(
        d["tokens"], 1, r.indices.unsqueeze(-1).expand(-1, -1, 16)))
    assert (r.sizes.sum(1) == 50).all()


def test_evit_without_fusion_is_a_subset_and_budgets_are_exact():
    d = _data(n=36)
    r = ts.reduce(d["tokens"], "evit", 9, cls_attn=d["cls_attn"], fuse=False, has_cls=True)
    assert r.indices.shape == (3, 9) and r.sizes is None and (r.indices[:, 0] == 0).all()
    ref = torch.sort(d["cls_attn"][:, 1:], dim=1, descending=True, stable=True).indices[:, :8]
    assert torch.equal(r.indices[:, 1:], ref.sort(dim=1).values + 1)
    for k in (1, 2, 36):
        assert ts.reduce(d["tokens"], "evit", k, cls_attn=d["cls_attn"]).tokens.shape[1] == k
    with pytest.raises(ValueError, match="keep=1"):
        ts.reduce(d["tokens"], "evit", 1, cls_attn=d["cls_attn"], has_cls=True)


# ---------------------------------------------------------------------------------------- ats


@pytest.mark.parametrize("has_cls", [False, True])
@pytest.mark.parametrize("k", [8, 20, 63])
def test_ats_matches_naive_inverse_transform_sampling(has_cls, k):
    d = _data(n=64, seed=k)
    r = ts.reduce(d["tokens"], "ats", k, cls_attn=d["cls_attn"], values=d["values"],
                  has_cls=has_cls)
    c = int(has_cls)
    for i in range(3):
        sig = d["cls_attn"][i, c:] * d["values"][i, c:].norm(dim=-1)
        expect = [0] * c + [j + c for j in _naive_ats(sig / sig.sum(), k - c)]
        count = int(r.mask[i].sum())
        assert r.indices[i, :count].tolist() == expect
        assert torch.equal(r.tokens[i, :count], d["tokens"][i, expect])
    assert r.tokens.shape[1] <= k


def test_ats_count_adapts_and_pads_with_mask():
    d = _data(b=2, n=100)
    attn = torch.full((2, 100), 1e-3)
    attn[0, 40:45] = 1.0  # peaked: a few tokens hold the mass
    values = torch.ones(2, 100, 8)
    r = ts.reduce(d["tokens"], "ats", 40, cls_attn=attn, values=values)
    counts = r.mask.sum(1)
    assert counts[0] < counts[1] == 40 and r.tokens.shape == (2, 40, 16)
    assert set(range(40, 45)) <= set(r.indices[0, :int(counts[0])].tolist())
    pad = ~r.mask[0]
    assert (r.tokens[0, pad] == 0).all()
    assert (r.indices[0, pad] == r.indices[0, int(counts[0]) - 1]).all()
    single = ts.reduce(d["tokens"][:1], "ats", 40, cls_attn=attn[:1], values=values[:1])
    assert single.tokens.shape[1] == int(counts[0]) and single.mask.all()
    assert torch.equal(single.indices[0], r.indices[0, :int(counts[0])])


def test_ats_value_norms_weight_significance():
    d = _data(b=1, n=64)
    attn = torch.full((1, 64), 1e-3)
    attn[0, 7] = 1.0
    values = torch.ones(1, 64, 8)
    assert 7 in ts.reduce(d["tokens"], "ats", 16, cls_attn=attn, values=values).indices[0]
    values[0, 7] = 0.0  # no value norm: no significance despite the attention
    sig = ats_significance(attn, values)
    assert float(sig[0, 7]) == 0.0
    assert 7 not in ts.reduce(d["tokens"], "ats", 16, cls_attn=attn, values=values).indices[0]
    # Attention-only variant ignores the values.
    assert 7 in ts.reduce(d["tokens"], "ats", 16, cls_attn=attn, use_values=False).indices[0]


def test_ats_errors_and_keep_all():
    d = _data(n=64)
    with pytest.raises(ValueError, match="'values'"):
        ts.reduce(d["tokens"], "ats", 16, cls_attn=d["cls_attn"])
    with pytest.raises(ValueError, match="keep=5"):
        ts.reduce(d["tokens"], "ats", 5, cls_attn=d["cls_attn"], values=d["values"])
    r = ts.reduce(d["tokens"], "ats", 5, cls_attn=d["cls_attn"], values=d["values"],
                  min_tokens=1, has_cls=True)
    assert (r.indices[:, 0] == 0).all() and r.tokens.shape[1] <= 5
    full = ts.reduce(d["tokens"], "ats", 64, cls_attn=d["cls_attn"], values=d["values"])
    assert torch.equal(full.tokens, d["tokens"]) and full.mask.all()
    with pytest.raises(ValueError, match="sums to"):
        ts.reduce(d["tokens"], "ats", 16, cls_attn=torch.zeros(3, 64), values=d["values"])


@pytest.mark.parametrize("method", ["tome", "turbo", "evit", "ats"])
def test_low_precision_keeps_dtype_and_matches_float32_structure(method):
    d = _data(n=64)
    kw = {"cls_attn": d["cls_attn"], "values": d["values"], "keys": d["keys"]}
    ref = ts.reduce(d["tokens"], method, 16, **kw)
    low = ts.reduce(d["tokens"].bfloat16(), method, 16,
                    **{k: v.bfloat16() for k, v in kw.items()})
    assert low.tokens.dtype == torch.bfloat16 and low.tokens.shape[0] == 3
    assert torch.isfinite(low.tokens.float()).all()
    if ref.sizes is not None:
        assert (low.sizes.sum(1) == ref.sizes.sum(1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_wavg_equals_the_weighted_mean_of_every_slot(dtype):
    """Only the slots that received merged tokens are recomputed; every slot equals the
    size-weighted mean of its members, and a slot that received none is its survivor."""
    from tokensieve.methods._matching import bipartite_soft_matching

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 41, 16, generator=g).to(dtype)
    sizes = torch.randint(1, 5, (3, 41), generator=g).float()
    m = bipartite_soft_matching(torch.randn(3, 41, 8, generator=g), 15, protect_first=True)
    out, new_sizes = m.merge_wavg(x, sizes)
    for b in range(3):
        num = torch.zeros(m.num_out, 16).index_add_(0, m.slot[b], x[b].float() * sizes[b, :, None])
        den = torch.zeros(m.num_out).index_add_(0, m.slot[b], sizes[b])
        torch.testing.assert_close(new_sizes[b], den)
        torch.testing.assert_close(out[b].float(), (num / den[:, None]).to(dtype).float(),
                                   atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
        lone = torch.ones(m.num_out, dtype=torch.bool)
        lone[m.slot[b, m.src[b]]] = False
        assert torch.equal(out[b][lone], x[b, m.kept[b]][lone])
