"""Every registered method honours the public contract (shapes, order, dtypes, batching)."""

from __future__ import annotations

import pytest
import torch
from conftest import generic_keep, inputs_for, make_anyres_inputs, make_inputs, make_video_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensieve as ts

GRID_ONLY_BUDGETS = {"pool": 64, "dct": 64}
# Methods whose official default couples the samples of a batch (documented quirks) are
# checked for batch independence with their per-sample variant.
PER_SAMPLE_OPTIONS = {"cdpruner": {"relevance_norm": "sample"}}
# Methods whose official rounding floors shares may keep fewer than ``keep`` tokens
# (``exact_budget=True`` keeps exactly ``keep``).
AT_MOST_KEEP = {"dart", "globalcom2", "hired"}
# Adaptive in-LLM methods: thresholds decide how many tokens stay, ``keep`` only caps it
# (a call with ``keep = N`` is no cap and may still drop tokens).
ADAPTIVE = {"mustdrop", "zipvl"}
# Methods that keep ``keep`` tokens and add merged ones on top (SparseVLM's recycled
# clusters): ``indices`` holds the ``keep`` kept tokens, ``tokens`` has more.
ADDS_MERGED = {"sparsevlm"}


def _inputs_for(method: str, **kw) -> dict:
    return inputs_for(method, **kw)


def _run(method: str, inputs: dict, keep, **options):
    inputs = dict(inputs)
    tokens = inputs.pop("tokens")
    inputs = {k: v for k, v in inputs.items() if v is not None}
    return ts.reduce(tokens, method, keep, **inputs, **options)


def _assert_ascending(r) -> None:
    """Strictly ascending indices; with a ``mask`` (adaptive counts), among the real entries,
    which come before the padding (padded entries are ignored)."""
    if r.mask is None:
        assert (r.indices.diff(dim=1) > 0).all(), "indices must be strictly ascending"
        return
    real = r.mask[:, :r.indices.shape[1]]
    assert not (~real[:, :-1] & real[:, 1:]).any(), "padding must follow the real tokens"
    assert ((r.indices.diff(dim=1) > 0) | ~real[:, 1:]).all(), "indices must be ascending"


@pytest.mark.parametrize("method", ts.list_methods())
def test_contract_shapes_and_order(method):
    inputs = _inputs_for(method, b=2)
    n = inputs["tokens"].shape[1]
    k = generic_keep(method)
    r = _run(method, inputs, k)
    spec = ts.describe(method)
    assert r.tokens.dim() == 3 and r.tokens.shape[0] == 2 and r.tokens.shape[2] == 64
    assert r.tokens.dtype == inputs["tokens"].dtype
    assert torch.isfinite(r.tokens).all()
    if method in ADDS_MERGED:
        assert r.indices.shape[1] == 64 and r.tokens.shape[1] > 64
    elif r.mask is None and method not in AT_MOST_KEEP | ADAPTIVE:
        assert r.tokens.shape[1] == k
    else:
        assert r.tokens.shape[1] <= 64
        assert r.mask is None or r.mask.shape == r.tokens.shape[:2]
    if spec.kind == "merge":
        assert r.indices is None
    else:
        assert r.indices is not None and r.indices.dtype == torch.long
        assert r.indices.shape[0] == 2
        _assert_ascending(r)
        assert r.indices.min() >= 0 and r.indices.max() < n
    if spec.kind == "subset" and r.mask is None:
        assert r.indices.shape == (2, r.tokens.shape[1])
        expect = torch.gather(inputs["tokens"], 1, r.indices.unsqueeze(-1).expand(-1, -1, 64))
        if method in AT_MOST_KEEP:
            exact = _run(method, inputs, 64, exact_budget=True)
            assert exact.tokens.shape[1] == 64 and exact.mask is None
        torch.testing.assert_close(r.tokens, expect)
    assert r.positions is not None and r.positions.shape == r.tokens.shape[:2]


@pytest.mark.parametrize("method", ts.list_methods())
def test_keep_all_returns_input_for_subset_methods(method):
    spec = ts.describe(method)
    if spec.kind != "subset":
        pytest.skip("merging methods change tokens by design")
    if method in ADAPTIVE:
        pytest.skip("adaptive thresholds decide the count; keep only caps it")
    inputs = _inputs_for(method, b=2)
    n = inputs["tokens"].shape[1]
    r = _run(method, inputs, n)
    assert torch.equal(r.indices, torch.arange(n).expand(2, -1))
    assert torch.equal(r.tokens, inputs["tokens"])


@pytest.mark.parametrize("method", ts.list_methods())
def test_batch_equals_single_samples(method):
    inputs = _inputs_for(method, b=3)
    options = PER_SAMPLE_OPTIONS.get(method, {})
    keep = generic_keep(method)
    full = _run(method, inputs, keep, **options)
    for i in range(3):
        one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if inputs.get("partitions") is not None:
            p = inputs["partitions"]
            one["partitions"] = ts.Partitions(p.ids[i:i + 1], p.tiling, p.grid)
        single = _run(method, one, keep, **options)
        if full.mask is None:
            torch.testing.assert_close(single.tokens[0], full.tokens[i], rtol=1e-4, atol=1e-4)
        else:
            real = int(full.mask[i].sum())
            assert single.tokens.shape[1] == real
            torch.testing.assert_close(single.tokens[0, :real], full.tokens[i, :real],
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ts.list_methods())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(method, dtype):
    inputs = _inputs_for(method, b=2, dtype=dtype)
    r = _run(method, inputs, generic_keep(method))
    assert r.tokens.dtype == dtype and torch.isfinite(r.tokens.float()).all()


@pytest.mark.parametrize("method", ts.list_methods())
def test_missing_required_signal_is_named(method):
    spec = ts.describe(method)
    if not spec.signals:
        pytest.skip("needs no signals")
    inputs = _inputs_for(method, b=1)
    dropped = spec.signals[0]
    inputs[dropped] = None
    if dropped == "text":
        inputs["text_mask"] = inputs["text_keys"] = None
    with pytest.raises(ValueError, match=repr(dropped)):
        _run(method, inputs, 64)


@pytest.mark.parametrize("method", ts.list_methods())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_shapes_dtypes_budgets(method, data):
    spec = ts.describe(method)
    b = data.draw(st.integers(1, 3), label="b")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    if "partitions" in spec.signals:
        side = data.draw(st.integers(3, 6), label="side")
        inputs = make_anyres_inputs(b=b, side=side, d=8, dtype=dtype, seed=side)
    elif "frames" in spec.signals:
        side = data.draw(st.integers(2, 6), label="side")
        frames = data.draw(st.integers(1, 6), label="frames")
        inputs = make_video_inputs(b=b, frames=frames, side=side, d=8, dtype=dtype, seed=side)
    else:
        side = data.draw(st.integers(2, 9), label="side")
        inputs = make_inputs(b=b, n=side * side, d=data.draw(st.sampled_from([4, 8, 33])),
                             dtype=dtype, seed=side)
    n = inputs["tokens"].shape[1]
    if method in GRID_ONLY_BUDGETS:
        h = data.draw(st.integers(1, side), label="h")
        keep = h * h
    else:
        keep = data.draw(st.one_of(st.integers(1, n), st.floats(1.0 / n, 1.0)), label="keep")
    try:
        r = _run(method, inputs, keep)
    except ValueError as err:
        # A method may refuse a budget it cannot meet, but must say which value is wrong.
        assert "keep" in str(err) or "budget" in str(err), str(err)
        return
    assert r.tokens.shape[0] == b and r.tokens.shape[2] == inputs["tokens"].shape[2]
    assert torch.isfinite(r.tokens.float()).all()
    if r.indices is not None:
        _assert_ascending(r)
