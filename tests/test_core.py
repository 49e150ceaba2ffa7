"""The public contract: budgets, errors, registry, shared ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_anyres_inputs, make_inputs

import tokensieve as ts
from tokensieve.core.budget import resolve_keep
from tokensieve.core.grid import target_grid
from tokensieve.core.ops import merge_into_slots, select_mask, topk_indices


@pytest.mark.parametrize("keep,n,expected", [(64, 576, 64), (576, 576, 576), (0.5, 576, 288),
                                             (1.0, 10, 10), (0.04, 10, 0)])
def test_resolve_keep(keep, n, expected):
    if expected == 0:
        with pytest.raises(ValueError, match="rounds to 0"):
            resolve_keep(keep, n)
    else:
        assert resolve_keep(keep, n) == expected


@pytest.mark.parametrize("keep", [0, -3, 577, 0.0, 1.5, -0.2, float("nan"), True, "64", None])
def test_bad_keep_raises_naming_value(keep):
    with pytest.raises(ValueError, match="keep="):
        ts.reduce(torch.randn(1, 576, 8), "random", keep)


def test_unknown_method_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean 'fastervlm'"):
        ts.reduce(torch.randn(1, 16, 8), "fastervlmm", 4)


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="unknown option"):
        ts.reduce(torch.randn(1, 16, 8), "random", 4, alpha=0.3)


def test_missing_signal_is_named():
    with pytest.raises(ValueError, match="'cls_attn'"):
        ts.reduce(torch.randn(1, 16, 8), "fastervlm", 4)


@pytest.mark.parametrize("bad", [
    {"tokens": torch.randn(16, 8)},
    {"tokens": torch.randint(0, 3, (1, 16, 8))},
    {"tokens": torch.full((1, 16, 8), float("nan"))},
    {"cls_attn": torch.rand(2, 16)},
    {"cls_attn": torch.rand(1, 15)},
    {"cls_attn": torch.tensor([[float("inf")] * 16])},
    {"cls_attn": torch.rand(1, 2, 3, 16)},
    {"grid": (3, 5)},
])
def test_bad_inputs_raise(bad):
    kwargs = {"tokens": torch.randn(1, 16, 8), "cls_attn": torch.rand(1, 16)}
    kwargs.update(bad)
    tokens = kwargs.pop("tokens")
    with pytest.raises(ValueError):
        ts.reduce(tokens, "fastervlm" if "grid" not in bad else "pool", 4, **kwargs)


def test_finite_check_is_exact_at_extreme_magnitudes():
    """The sum-based check never flags finite values (sums that overflow, float16) and
    always flags NaN / +inf / -inf, wherever they are."""
    from tokensieve.core.signals import _all_finite

    big = torch.full((2, 64, 32), 3e38)                    # the sum overflows to inf
    assert _all_finite(big) and _all_finite(-big) and _all_finite(big * 1e-8)
    assert _all_finite(torch.full((4, 8), 6e4, dtype=torch.float16))
    assert _all_finite(torch.empty(0, 3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for x in (torch.randn(2, 64, 32), big.clone()):
            x[1, 63, 31] = bad
            assert not _all_finite(x)
    x = torch.full((8,), 3e38)
    x[3] = -float("inf")
    assert not _all_finite(x)


def test_kept_tokens_checked_for_methods_reading_only_them():
    """fastervlm reads the tokens only where it keeps them: a NaN/inf in a kept token raises
    the tokens' ValueError (counting every bad value), one in a dropped token cannot change
    the result and is not an error; values near 1e30 are not flagged."""
    x = torch.randn(2, 16, 8)
    attn = torch.rand(2, 16)
    want = ts.reduce(x, "fastervlm", 4, cls_attn=attn)
    dropped = int(attn[0].argmin())
    kept = int(want.indices[0, 0])
    bad = x.clone()
    bad[0, dropped, 0] = float("nan")
    assert torch.equal(ts.reduce(bad, "fastervlm", 4, cls_attn=attn).tokens, want.tokens)
    bad[1, kept, 3] = float("inf")
    bad[0, kept, 2] = -float("inf")
    with pytest.raises(ValueError, match="tokens contains 3 NaN/inf"):
        ts.reduce(bad, "fastervlm", 4, cls_attn=attn)
    huge = ts.reduce(x * 1e30, "fastervlm", 4, cls_attn=attn)
    assert torch.equal(huge.indices, want.indices)
    assert ts.describe("fastervlm").reads_tokens == "kept"
    assert ts.describe("divprune").reads_tokens == "all"
    nan_dropped = torch.randn(1, 16, 8)
    nan_dropped[0, 0] = float("nan")
    with pytest.raises(ValueError, match="tokens contains 8 NaN/inf"):
        ts.reduce(nan_dropped, "divprune", 4)


def test_topk_indices_ascending_and_correct():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2]])
    assert topk_indices(scores, 3).tolist() == [[1, 2, 3]]


def test_topk_indices_equals_stable_sort_with_and_without_boundary_ties():
    """The top-(k+1) fast path and the stable-sort path give the stable sort's set: ties at
    the k-th value go to the lower index, in any row of a batch."""
    g = torch.Generator().manual_seed(3)
    for scores in (torch.rand(4, 50, generator=g),
                   torch.randint(0, 4, (4, 50), generator=g).float(),
                   torch.zeros(2, 9), torch.tensor([[-0.0, 0.0, 1.0, 0.0]])):
        n = scores.shape[1]
        for k in (0, 1, 3, n - 1, n):
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
            want = order[:, :k].sort(dim=-1).values
            assert torch.equal(topk_indices(scores, k), want)
            for row in range(scores.shape[0]):                   # the batch-1 path
                assert torch.equal(topk_indices(scores[row:row + 1], k), want[row:row + 1])
    tied = torch.tensor([[0.9, 0.5, 0.1, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    assert topk_indices(tied, 2).tolist() == [[0, 1], [3, 4]]


def test_pool_equals_avg_pool2d():
    x = torch.randn(2, 576, 32)
    r = ts.reduce(x, "pool", 64)
    ref = F.avg_pool2d(x.transpose(1, 2).reshape(2, 32, 24, 24), 3).reshape(2, 32, 64)
    torch.testing.assert_close(r.tokens, ref.transpose(1, 2))
    assert r.indices is None
    assert r.sizes.sum(dim=1).tolist() == [576, 576]
    # Each source token is assigned to the window that contains it.
    assert r.assignment[0, 0] == 0 and r.assignment[0, 3] == 1 and r.assignment[0, 24 * 3] == 8


def test_pool_rejects_unfactorable_budget():
    with pytest.raises(ValueError, match="try one of"):
        ts.reduce(torch.randn(1, 576, 8), "pool", 61)


def test_target_grid():
    assert target_grid(64, (24, 24)) == (8, 8)
    assert target_grid(192, (24, 24)) in {(12, 16), (16, 12)}
    assert target_grid(61, (24, 24)) is None


def test_uniform_is_grid_strided():
    r = ts.reduce(torch.randn(1, 576, 8), "uniform", 64)
    rows, cols = r.indices[0] // 24, r.indices[0] % 24
    assert sorted(set(rows.tolist())) == list(range(1, 24, 3))
    assert sorted(set(cols.tolist())) == list(range(1, 24, 3))


def test_fastervlm_is_top_cls_attention():
    inp = make_inputs(b=2, n=100)
    r = ts.reduce(inp["tokens"], "fastervlm", 10, cls_attn=inp["attn_received"])
    ref = inp["attn_received"].topk(10, dim=1).indices.sort(dim=1).values
    assert torch.equal(r.indices, ref)


def test_fastervlm_anyres_keeps_newlines_and_splits_budget():
    inp = make_anyres_inputs(b=2, newlines=True)
    r = ts.reduce(inp["tokens"], "fastervlm", 100, cls_attn=inp["attn_received"],
                  partitions=inp["partitions"])
    ids = inp["partitions"].ids[0]
    kept = ids[r.indices[0]]
    assert (kept == -1).sum() == 12  # every newline kept
    counts = torch.bincount(kept[kept >= 0], minlength=5)
    assert counts.tolist() == [18, 18, 18, 17, 17]  # 88 shared by largest remainder


def test_random_is_deterministic_with_seed():
    x = torch.randn(3, 100, 8)
    a = ts.reduce(x, "random", 10, seed=1).indices
    b = ts.reduce(x, "random", 10, seed=1).indices
    c = ts.reduce(x, "random", 10, seed=2).indices
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each sample draws its own subset


def test_merge_into_slots_weighted_mean():
    x = torch.tensor([[[1.0], [3.0], [10.0]]])
    out, total = merge_into_slots(x, torch.tensor([[0, 0, -1]]), 1, torch.tensor([[1.0, 3.0, 5.0]]))
    assert out.item() == pytest.approx(2.5) and total.item() == 4.0


def test_describe_lists_defaults_and_needs():
    spec = ts.describe("fastervlm")
    assert spec.signals == ("cls_attn",) and "FasterVLM" in spec.paper
    assert isinstance(spec.defaults(), dict)


def test_select_mask_rows_that_keep_nothing():
    """A row that keeps no token pads with index 0 (masked), and a batch in which no row
    keeps any gives [B, 0, D]; the kept rows are unchanged."""
    x = torch.randn(2, 5, 3)
    r = select_mask(x, torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool))
    assert r.indices.tolist() == [[1, 3], [0, 0]]
    assert r.mask.tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(r.tokens[0], x[0, [1, 3]])
    assert not r.tokens[1].any()
    r = select_mask(x, torch.zeros(2, 5, dtype=torch.bool), always_mask=True)
    assert r.tokens.shape == (2, 0, 3) and r.indices.shape == (2, 0) and r.mask.shape == (2, 0)
