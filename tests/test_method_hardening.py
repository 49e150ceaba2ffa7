"""Hardening of the token-set methods: per-sample random draws, official rounding and pivot
order by default, empty text, extreme magnitudes and mismatched devices."""

from __future__ import annotations

import pytest
import torch
from conftest import make_anyres_inputs, make_inputs

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
    full = make_anyres_inputs(b=2) if "partitions" in spec.signals else make_inputs(b=2)
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
    r = ts.reduce(x, method, 64, **inp)
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
