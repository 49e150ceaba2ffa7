"""DPC-kNN clustering and merging (tokensieve.methods._dpc) against a brute-force restatement."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.methods._dpc import dpc_knn


def brute_dpc(x: list[list[float]], cluster_num: int, draws: list[float], noise: float,
              weights: list[float] | None = None, knn: int | None = None) -> dict:
    """The algorithm, token by token: distances / sqrt(D), density from the knn nearest
    (self included) plus draw * noise, "denser" by (density, then draw, then lower index),
    parent distance to the nearest denser token (the largest distance for the densest),
    centres by descending delta * rho (ties: the denser),
    each token to its nearest centre (ties: the earlier centre), centres to themselves,
    clusters = (weighted) member averages."""
    n, d = len(x), len(x[0])
    knn = knn or cluster_num
    dist = [[math.sqrt(sum((x[i][t] - x[j][t]) ** 2 for t in range(d))) / math.sqrt(d)
             for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(dist[i])[:knn]) / knn) + draws[i] * noise
           for i in range(n)]
    key = [(-rho[i], -draws[i], i) for i in range(n)]                # smaller: denser
    far = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(n) if key[j] < key[i]], default=far)
             for i in range(n)]
    score = [delta[i] * rho[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], key[i]))[:cluster_num]
    assign = [min(range(cluster_num), key=lambda c: (dist[centres[c]][i], c)) for i in range(n)]
    for c, i in enumerate(centres):
        assign[i] = c
    w = weights or [1.0] * n
    merged = []
    for c in range(cluster_num):
        members = [i for i in range(n) if assign[i] == c]
        total = sum(w[i] for i in members)
        merged.append([sum(w[i] * x[i][t] for i in members) / total for t in range(d)])
    sizes = [assign.count(c) for c in range(cluster_num)]
    return {"centres": centres, "assign": assign, "merged": merged, "sizes": sizes}


def _draws(n: int, seed: int) -> list[float]:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _check(x: torch.Tensor, cluster_num: int, seed: int = 0, noise: float = 1e-6,
           weights: torch.Tensor | None = None, knn: int | None = None) -> None:
    got = dpc_knn(x.unsqueeze(0), cluster_num, generator=torch.Generator().manual_seed(seed),
                  noise=noise, knn=knn, weights=None if weights is None else weights[None])
    ref = brute_dpc(x.double().tolist(), cluster_num, _draws(x.shape[0], seed), noise,
                    None if weights is None else weights.tolist(), knn)
    assert got.centres[0].tolist() == ref["centres"]
    assert got.assignment[0].tolist() == ref["assign"]
    assert got.sizes[0].tolist() == ref["sizes"]
    want = torch.tensor(ref["merged"], dtype=torch.float64)
    torch.testing.assert_close(got.tokens[0].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cluster_num", [1, 3, 5])
def test_random_tokens_match_brute_force(cluster_num):
    x = torch.randn(14, 6, generator=torch.Generator().manual_seed(3))
    _check(x, cluster_num)


def test_knn_and_weights_match_brute_force():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 4, generator=g)
    weights = torch.rand(11, generator=g) + 0.5
    _check(x, 3, knn=6, weights=weights)


def test_ties_without_noise_follow_the_stated_rule():
    # a symmetric lattice with duplicates: equal densities, distances and scores
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 0.0], [3.0, 0.0],
                      [1.5, 1.0], [1.5, -1.0]])
    for c in (1, 2, 3, 4):
        _check(x, c, noise=0.0)


def test_ties_are_broken_by_the_seeded_noise():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])
    for seed in (0, 1, 2):
        _check(x, 2, seed=seed)
    a = dpc_knn(x[None], 2, generator=torch.Generator().manual_seed(7))
    b = dpc_knn(x[None], 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.centres, b.centres) and torch.equal(a.tokens, b.tokens)


def test_as_many_clusters_as_tokens_keeps_every_token():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    _check(x, 9)
    r = dpc_knn(x[None], 9, generator=torch.Generator().manual_seed(0))
    assert sorted(r.centres[0].tolist()) == list(range(9))
    assert torch.equal(r.assignment[0][r.centres[0]], torch.arange(9))
    assert (r.sizes == 1).all()
    torch.testing.assert_close(r.tokens[0], x[r.centres[0]])


def test_batch_rows_equal_single_rows():
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(2))
    full = dpc_knn(x, 4, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        one = dpc_knn(x[i:i + 1], 4, generator=torch.Generator().manual_seed(0))
        assert torch.equal(one.centres[0], full.centres[i])
        assert torch.equal(one.assignment[0], full.assignment[i])
        torch.testing.assert_close(one.tokens[0], full.tokens[i])


def test_low_precision_tokens_keep_their_dtype():
    x = torch.randn(2, 16, 8).to(torch.bfloat16)
    r = dpc_knn(x, 3, generator=torch.Generator().manual_seed(0))
    assert r.tokens.dtype == torch.bfloat16 and r.tokens.shape == (2, 3, 8)
    assert (r.sizes.sum(dim=1) == 16).all() and torch.equal(r.mass, r.sizes.float())


@pytest.mark.parametrize("bad", [0, 7, 2.0, True])
def test_bad_cluster_num_is_refused(bad):
    with pytest.raises(ValueError, match="cluster_num"):
        dpc_knn(torch.randn(1, 6, 3), bad)
