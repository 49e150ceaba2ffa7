"""Hardening of the token-set methods: per-sample random draws, official rounding and pivot
order by default, empty text, extreme magnitudes and mismatched devices."""

from __future__ import annotations

import pytest
import torch

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
