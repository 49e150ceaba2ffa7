"""Greedy selection engines shared by the diversity / coverage / DPP methods.

Three recurrences live here, each written once:

* :func:`max_min_select` -- farthest-first traversal (max-min diversity, greedy k-centre),
  used by DivPrune, ToDRE and the KKZ initialisation of k-medoids. Distance rows are
  computed lazily in blocks and cached (:class:`LazyRows`), so at most ``N`` rows -- one
  ``N x N`` matrix -- ever exist, and usually far fewer.
* :func:`dpp_greedy` -- greedy MAP inference of a DPP with the incremental Cholesky update
  (CDPruner), on lazily computed kernel rows; :func:`dpp_greedy_dense` runs the same
  recurrence for a whole batch on dense kernels (CDPruner's path for small ``N``).
* :func:`greedy_coverage` -- greedy maximum coverage with incrementally updated gains (MMTok).

The lazy engines work on one sample (``[N, ...]``); the method files loop over the batch,
since the lazy caches differ per sample. The dense paths (:func:`max_min_dense`,
:func:`dpp_greedy_dense`) run a batch in one loop. Scores are float32; ties go to the lowest index
(``torch.argmax`` returns the first maximum).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from tokensieve.core.ops import normalize, pow2_rescale

RowFn = Callable[[Tensor], Tensor]
"""``rows(idx [c]) -> [c, N]`` float32 rows of a symmetric score matrix."""


def block_size(n: int) -> int:
    """How many rows :class:`LazyRows` computes at a time (one GEMM) for ``n`` tokens."""
    return max(16, min(256, n // 16))


class LazyRows:
    """Rows of a symmetric ``N x N`` matrix, computed on demand in blocks and cached.

    :meth:`fetch` computes a block of rows in one matrix product; a miss in :meth:`row`
    fetches the row together with ``prefetch - 1`` rows the caller expects to need soon.
    A greedy loop then costs a few GEMMs instead of one memory-bound matrix-vector product
    per step, and never more than the ``N`` rows of one ``N x N`` matrix.
    """

    def __init__(self, rows: RowFn, n: int, device: torch.device, block: int | None = None):
        self.rows_fn = rows
        self.n = n
        self.block = block or block_size(n)
        # Rows fetched on a miss in :meth:`row`: a greedy loop's next picks are hard to
        # guess far ahead, so prefetch fewer than a full block.
        self.prefetch = max(1, min(self.block, max(8, self.block // 4)))
        self.device = device
        self.cached = torch.zeros(n, dtype=torch.bool, device=device)
        self.store: list[Tensor] = []
        self.where: dict[int, tuple[int, int]] = {}

    def fetch(self, idx: Tensor) -> Tensor:
        """Compute and cache rows ``idx`` (``[c]``, not yet cached); returns ``[c, N]``."""
        block = self.rows_fn(idx)
        b = len(self.store)
        self.store.append(block)
        for r, j in enumerate(idx.tolist()):
            self.where[j] = (b, r)
        self.cached[idx] = True
        return block

    def row(self, j: int, priority: Tensor | None = None) -> Tensor:
        """Row ``j`` (``[N]``). On a miss, also fetches the ``prefetch - 1`` uncached rows with
        the highest ``priority`` (``[N]``, ``-inf`` = never needed)."""
        hit = self.where.get(j)
        if hit is not None:
            return self.store[hit[0]][hit[1]]
        idx = torch.tensor([j], device=self.device)
        if priority is not None and self.prefetch > 1:
            p = priority.masked_fill(self.cached, -math.inf)
            p[j] = -math.inf
            order = torch.sort(p, descending=True, stable=True).indices[: self.prefetch - 1]
            order = order[torch.isfinite(p[order])]
            idx = torch.cat([idx, order])
        return self.fetch(idx)[0]


BlockFn = Callable[[Tensor, slice, slice], Tensor]
"""``fn(block, rows, cols) -> block``: an elementwise map of a block of a symmetric matrix."""


def symmetric_gram(x: Tensor, out: Tensor | None = None, transform: BlockFn | None = None,
                   exact: bool = True) -> Tensor:
    """``f(x @ x.T)`` (``[N, N]``, float32, exactly symmetric) for ``x`` ``[N, D]``.

    Computes each off-diagonal block once and mirrors it: about half the multiply-adds of
    one GEMM, and half the work of ``transform``, a symmetric elementwise map applied to each
    computed block (``transform(block, rows, cols)`` may work in place). ``out`` (``[N, N]``
    contiguous float32) receives the result if given.

    ``exact=False``: the diagonal blocks stay as the GEMM computes them (symmetric up to
    rounding) and every block is written straight into ``out``, in row blocks of about
    192 (no block temporaries; two thirds of a GEMM's multiply-adds at N = 576: measured on
    one CPU thread at D = 1,024, interleaved, 3.63 ms against 3.88 ms with blocks of 288
    and 4.68 ms for one GEMM).
    """
    x = x.float()
    n = x.shape[0]
    if out is None:
        out = torch.empty(n, n, device=x.device)
    if not exact:
        step = -(-n // max(2, -(-n // 192)))
        for s in range(0, n, step):
            e = min(n, s + step)
            blk = out[s:e, s:]
            torch.mm(x[s:e], x[s:].T, out=blk)
            if transform is not None:
                transform(blk, slice(s, e), slice(s, n))
            if s:
                out[s:e, :s] = out[:s, s:e].T
        return out
    step = max(64, -(-n // 8))
    for s in range(0, n, step):
        e = min(n, s + step)
        blk = x[s:e] @ x[s:].T                                            # [e - s, n - s]
        if transform is not None:
            blk = transform(blk, slice(s, e), slice(s, n))
        diag = blk[:, : e - s]
        out[s:e, s:e] = torch.triu(diag) + torch.triu(diag, 1).T
        out[s:e, e:] = blk[:, e - s:]
        out[e:, s:e] = blk[:, e - s:].T
    return out


def cosine_distance_rows(x: Tensor) -> RowFn:
    """Rows of ``D = 1 - cos`` for tokens ``x`` ``[N, D]`` (L2-normalised here, float32;
    safe for any finite magnitude, see ``core.ops.normalize``)."""
    xn = normalize(x)

    def rows(idx: Tensor) -> Tensor:
        return 1.0 - xn[idx] @ xn.T

    return rows


def euclidean_distance_rows(x: Tensor) -> RowFn:
    """Rows of the Euclidean distance matrix of ``x`` ``[N, D]`` (float32), in units of a
    power of two chosen so that the largest magnitude is below 1 (exact scaling: the same
    farthest-first picks, and no overflow for tokens near 1e30)."""
    xf = pow2_rescale(x, dim=(0, 1)).float()

    def rows(idx: Tensor) -> Tensor:
        return torch.cdist(xf[idx], xf)

    return rows


def farthest_isolated(cache: LazyRows) -> int:
    """``argmax_j min_{i != j} D[i, j]``: the token whose nearest neighbour is farthest.

    Exact, without computing all rows in the usual case: every computed row ``i`` bounds
    the nearest-neighbour distance of every token ``j`` from above (``D[i, j]``, by
    symmetry), and a token whose bound is below the best exact value found so far cannot
    win. Rows are computed for the tokens with the largest bounds until none is left.
    """
    n, dev = cache.n, cache.device
    if n == 1:
        return 0
    upper = torch.full((n,), math.inf, device=dev)
    exact = torch.full((n,), -math.inf, device=dev)
    idx = torch.linspace(0, n - 1, min(cache.block, n), device=dev).round().long().unique()
    while True:
        rows = cache.fetch(idx).clone()
        rows[torch.arange(len(idx), device=dev), idx] = math.inf
        exact[idx] = rows.min(dim=1).values
        upper = torch.minimum(upper, rows.min(dim=0).values)
        best = exact.max()
        cand = (~cache.cached) & (upper >= best)
        if not bool(cand.any()):
            break
        score = upper.masked_fill(~cand, -math.inf)
        order = torch.sort(score, descending=True, stable=True).indices[: cache.block]
        idx = order[torch.isfinite(score[order])]
    return int(torch.argmax(exact))


def max_min_select(cache: LazyRows, k: int, seed: int) -> Tensor:
    """Farthest-first traversal: start from ``seed``, then repeatedly add
    ``argmax_j min_{i in S} D[i, j]``. Returns the ``k`` picks in pick order (``[k]`` long).

    Picked tokens are never picked again (their running minimum is ``-inf``), even when
    every remaining token duplicates a picked one.
    """
    dev = cache.device
    picks = torch.empty(k, dtype=torch.long, device=dev)
    picks[0] = seed
    mind = cache.row(seed).clone()
    mind[seed] = -math.inf
    for t in range(1, k):
        j = int(torch.argmax(mind))
        picks[t] = j
        torch.minimum(mind, cache.row(j, priority=mind), out=mind)
        mind[j] = -math.inf
    return picks


def dpp_greedy(kernel_rows: RowFn, diag: Tensor, k: int, rtol: float = 1e-6) -> Tensor:
    """Greedy MAP of a DPP with kernel ``L`` (``kernel_rows(idx) -> L[idx]``, ``diag(L)``).

    The fast incremental Cholesky update (Chen et al., NeurIPS 2018): ``d2 = diag(L)``;
    ``k`` times: ``j = argmax d2``, ``e = (L[j] - sum_t c_t[j] c_t) / sqrt(d2[j])``,
    ``d2 -= e^2``, ``d2[j] = -inf``. Each pick maximises ``log det L_S`` given the earlier
    picks. Once no remaining ``d2`` exceeds ``rtol * max(diag)`` (float32 rounding noise:
    the rank of ``L`` is exhausted, e.g. ``k > D`` or duplicate tokens), the rest are the
    unpicked tokens of highest ``diag(L)``; the official code would go on dividing by the
    square root of noise (or of a negative number). Returns the picks in pick order.

    Rows of ``L`` are fetched lazily in blocks (:class:`LazyRows`), and each fetched block
    already has the projections on the ``c_t`` known at that time subtracted (one GEMM), so
    a step only subtracts the few ``c_t`` added since -- instead of a memory-bound pass over
    all earlier ``c_t`` per step.
    """
    n, dev = diag.shape[0], diag.device
    d2 = diag.float().clone()
    floor = rtol * float(d2.max())
    coef = torch.zeros(k, n, device=dev)
    picks = torch.empty(k, dtype=torch.long, device=dev)
    filled = [0]                                              # rows of coef computed
    since = torch.zeros(n, dtype=torch.long, device=dev)      # c_t already subtracted

    def residual_rows(idx: Tensor) -> Tensor:
        t = filled[0]
        out = kernel_rows(idx).float()
        if t:
            out -= coef[:t, idx].T @ coef[:t]
        since[idx] = t
        return out

    cache = LazyRows(residual_rows, n, dev)
    for t in range(k):
        top, arg = torch.max(d2, dim=0)
        j, dj = int(arg), float(top)
        if not dj > floor:
            # The kernel restricted to the rest is (numerically) singular: every further
            # pick gives det 0. Fill up with the unpicked tokens of highest diag(L).
            rest = diag.float().clone()
            rest[picks[:t]] = -math.inf
            picks[t:] = torch.sort(rest, descending=True, stable=True).indices[: k - t]
            break
        picks[t] = j
        if t == k - 1:
            break
        filled[0] = t
        row = cache.row(j, priority=d2)
        t0 = int(since[j])
        inv = 1.0 / math.sqrt(dj)
        e = torch.mul(row, inv, out=coef[t])
        if t0 < t:
            e.addmv_(coef[t0:t].T, coef[t0:t, j], alpha=-inv)
        d2.addcmul_(e, e, value=-1.0)
        d2[j] = -math.inf
    return picks


def _dpp_greedy_dense_one(kernel: Tensor, diag: Tensor, k: int, rtol: float) -> Tensor:
    """:func:`dpp_greedy_dense` for one sample (``kernel`` ``[N, N]``): python-int indices,
    so each step's rows and columns are views, not gathers."""
    n, dev = diag.shape[0], diag.device
    d2 = diag.float().clone()
    floor = rtol * float(d2.max())
    coef = torch.empty(k, n, device=dev)
    picks: list[int] = []
    for t in range(k):
        top, arg = torch.max(d2, dim=0)
        j, dj = int(arg), float(top)
        if not dj > floor:
            rest = diag.float().clone()
            rest[picks] = -math.inf
            picks += torch.sort(rest, descending=True, stable=True).indices[: k - t].tolist()
            break
        picks.append(j)
        if t == k - 1:
            break
        inv = 1.0 / math.sqrt(dj)
        e = torch.mul(kernel[j], inv, out=coef[t])
        if t:
            e.addmv_(coef[:t].T, coef[:t, j], alpha=-inv)
        d2.addcmul_(e, e, value=-1.0)
        d2[j] = -math.inf
    return torch.tensor(picks, dtype=torch.long, device=dev)


def dpp_greedy_dense(kernel: Tensor, diag: Tensor, k: int, rtol: float = 1e-6) -> Tensor:
    """:func:`dpp_greedy` for every sample of a batch at once, on dense kernels.

    The same recurrence, tie-breaking (first index) and handling of an exhausted kernel:
    a sample whose largest remaining ``d2`` is not above ``rtol * max(diag)`` takes, from
    that step on, its unpicked tokens of highest ``diag``. Per step one batched argmax,
    one row gather and one ``baddbmm`` against the earlier ``c_t`` (``O(B N t)``, as the
    official loop), with no host synchronisation for ``B > 1``. An exhausted sample goes
    on with harmless values (its later picks are replaced), so the loop never branches
    per sample.

    Args:
        kernel: ``[B, N, N]`` float32 symmetric kernels ``L``.
        diag: ``[B, N]`` the diagonals the greedy starts from (``d2 = diag``).
        k: picks per sample.
        rtol: as in :func:`dpp_greedy`.

    Returns:
        ``[B, k]`` long, in pick order.
    """
    b, n = diag.shape
    dev = diag.device
    if b == 1:
        return _dpp_greedy_dense_one(kernel[0], diag[0], k, rtol).unsqueeze(0)
    d2 = diag.float().clone()
    floor = rtol * d2.amax(dim=1).double()                    # as dpp_greedy, in float64
    coef = torch.empty(b, k, n, device=dev)
    picks = torch.empty(b, k, dtype=torch.long, device=dev)
    tops = torch.empty(b, k, device=dev)
    ar = torch.arange(b, device=dev)
    for t in range(k):
        top, j = torch.max(d2, dim=1)
        picks[:, t] = j
        tops[:, t] = top
        if t == k - 1:
            break
        row = kernel[ar, j]                                   # [B, N]
        if t:
            cj = coef[ar, :t, j]                              # [B, t]: c_s[j], s < t
            row = torch.baddbmm(row.unsqueeze(1), cj.unsqueeze(1), coef[:, :t],
                                alpha=-1.0).squeeze(1)
        e = torch.mul(row, top.rsqrt().unsqueeze(1), out=coef[:, t])
        d2.addcmul_(e, e, value=-1.0)
        d2[ar, j] = -math.inf
    # the first step whose best d2 is not above the floor (NaN included), else k
    low = ~(tops.double() > floor.unsqueeze(1))
    stop = torch.where(low.any(dim=1), low.to(torch.int8).argmax(dim=1), k).tolist()
    for i, t in enumerate(stop):
        if t < k:
            rest = diag[i].float().clone()
            rest[picks[i, :t]] = -math.inf
            picks[i, t:] = torch.sort(rest, descending=True, stable=True).indices[: k - t]
    return picks


def _coverage_lost(cover: Tensor, gain: Tensor, rows: Tensor, old: Tensor, new: Tensor,
                   chunk: int) -> None:
    """``gain -= sum over rows of clamp(cover[rows], old, new) - old`` (the gain that the rows
    ``rows`` of ``cover`` ``[R, N]``, improved from ``old`` to ``new``, no longer offer), in
    row chunks of at most ``chunk``. ``max(c - old, 0) - max(c - new, 0) = clamp(c, old, new)
    - old``; ``minimum(maximum(c, old), new)`` is that clamp (a tensor-valued ``clamp`` is an
    order of magnitude slower on CPU)."""
    nr, r = rows.shape[0], cover.shape[0]
    for s in range(0, nr, chunk):
        o, hi = (old, new) if nr <= chunk else (old[s:s + chunk], new[s:s + chunk])
        o = o.unsqueeze(1)
        if nr == r:                               # every row improved (the first pick): no gather
            lost = torch.maximum(cover if nr <= chunk else cover[s:s + chunk], o)
        else:
            lost = cover.index_select(0, rows if nr <= chunk else rows[s:s + chunk])
            torch.maximum(lost, o, out=lost)
        torch.minimum(lost, hi.unsqueeze(1), out=lost)
        gain.sub_(lost.sub_(o).sum(dim=0))


def _coverage_chunk(n: int) -> int:
    return max(1, (1 << 21) // n)                 # rows gathered at once (~8 MB)


def greedy_coverage(cover: Tensor, k: int) -> Tensor:
    """Greedy maximum coverage over the columns of ``cover`` ``[R, N]`` (non-negative).

    Coverage of a column set ``S`` is ``sum_r max_{j in S} cover[r, j]``; each step picks
    ``argmax_j sum_r max(cover[r, j] - best[r], 0)`` and sets ``best = max(best, cover[:, j])``.
    Gains are updated incrementally: a pick only changes the rows it improves, so a step
    costs ``O(changed rows x N)`` instead of ``O(R x N)``. Returns picks in pick order.

    The rows a pick improves shrink fast (at N = 576 a few dozen after the first picks), so
    a step's cost is mostly per-call overhead. On CPU the loop therefore runs on NumPy views
    of the same memory (a NumPy call costs about a fifth of a torch call), with the same
    float32 operations in the same order; elsewhere it keeps to about a dozen tensor calls
    per step, each on the improved rows only.
    """
    cover = cover.float()
    if cover.device.type == "cpu" and not cover.requires_grad:
        return torch.from_numpy(_greedy_coverage_cpu(cover.contiguous(), k))
    dev = cover.device
    best = torch.zeros(cover.shape[0], device=dev)
    gain = cover.sum(dim=0)
    chunk = _coverage_chunk(cover.shape[1])
    picks: list[int] = []
    for t in range(k):
        j = int(torch.argmax(gain))
        picks.append(j)
        if t == k - 1:
            break
        col = cover.select(1, j)
        rows = torch.nonzero(col > best).squeeze(1)
        new = col.index_select(0, rows)
        _coverage_lost(cover, gain, rows, best.index_select(0, rows), new, chunk)
        best.index_copy_(0, rows, new)
        gain[j] = -math.inf
    return torch.tensor(picks, dtype=torch.long, device=dev)


def _greedy_coverage_cpu(cover: Tensor, k: int) -> np.ndarray:
    """:func:`greedy_coverage`'s loop on NumPy views of a contiguous CPU ``cover``: the
    same float32 operations in chunks of the same size, the row sums by torch (NumPy sums
    in another order, and near-ties then pick differently), so the same gains and picks
    (first index on ties)."""
    c = cover.numpy()
    r, n = c.shape
    best = np.zeros(r, dtype=np.float32)
    gain = cover.sum(dim=0).numpy().copy()
    chunk = _coverage_chunk(n)
    picks = np.empty(k, dtype=np.int64)
    for t in range(k):
        j = int(gain.argmax())
        picks[t] = j
        if t == k - 1:
            break
        col = c[:, j]
        rows = np.flatnonzero(col > best)
        for s in range(0, rows.shape[0], chunk):
            part = rows[s:s + chunk]
            if t == 0 and part.shape[0] == r:
                # the first pick improves every row from 0: max(c, 0) - 0 is c (c >= 0)
                lost = np.minimum(c, col[:, None])
            else:
                old = best[part][:, None]
                lost = c[part]
                np.maximum(lost, old, out=lost)
                np.minimum(lost, col[part][:, None], out=lost)
                lost -= old
            gain -= torch.from_numpy(lost).sum(dim=0).numpy()   # torch's summation order
        best[rows] = col[rows]
        gain[j] = -np.inf
    return picks


def greedy_coverage_batch(cover: Tensor, k: int) -> Tensor:
    """:func:`greedy_coverage` of every sample of ``cover`` ``[B, R, N]`` -> ``[B, k]`` long.

    The same arithmetic per sample (so the same picks), with the per-step calls shared by
    the batch: one argmax, one column gather and one gather of the improved rows of all
    samples; only the final row sums run per sample (on each sample's rows, in the order
    :func:`greedy_coverage` sums them). A step whose improved rows exceed one chunk (the
    first pick, for large ``R``) runs per sample.
    """
    cover = cover.float()
    b, r, n = cover.shape
    dev = cover.device
    if b == 1:
        return greedy_coverage(cover[0], k).unsqueeze(0)
    flat = cover.view(b * r, n)
    best = torch.zeros(b, r, device=dev)
    best_flat = best.view(-1)
    gain = cover.sum(dim=1)
    chunk = _coverage_chunk(n)
    ar = torch.arange(b, device=dev)
    elems = cover.view(-1)
    start = torch.arange(b * r, device=dev).mul_(n).view(b, r)   # flat index of each row
    picks = torch.empty(b, k, dtype=torch.long, device=dev)
    for t in range(k):
        j = torch.argmax(gain, dim=1)
        picks[:, t] = j
        if t == k - 1:
            break
        col = elems.index_select(0, (start + j.unsqueeze(1)).view(-1)).view(b, r)  # [B, R]
        mask = col > best
        counts = mask.sum(dim=1).tolist()
        if sum(counts) > chunk:
            for i in range(b):
                rows = torch.nonzero(mask[i]).squeeze(1)
                new = col[i].index_select(0, rows)
                _coverage_lost(cover[i], gain[i], rows, best[i].index_select(0, rows), new,
                               chunk)
                best[i].index_copy_(0, rows, new)
        else:
            rows = torch.nonzero(mask.view(-1)).squeeze(1)       # rows of flat, sample-major
            old = best_flat.index_select(0, rows).unsqueeze(1)
            new = col.view(-1).index_select(0, rows)
            lost = flat.index_select(0, rows)
            torch.maximum(lost, old, out=lost)
            torch.minimum(lost, new.unsqueeze(1), out=lost)
            lost.sub_(old)
            gain.sub_(torch.stack([p.sum(dim=0) for p in lost.split(counts)]))
            best_flat.index_copy_(0, rows, new)
        gain[ar, j] = -math.inf
    return picks


def distance_rows(x: Tensor, distance: str) -> RowFn:
    """Distance rows of ``x`` ``[N, D]`` for ``distance`` in ("cosine", "euclidean")."""
    if distance == "cosine":
        return cosine_distance_rows(x)
    if distance == "euclidean":
        return euclidean_distance_rows(x)
    raise ValueError(f"distance={distance!r}: expected 'cosine' or 'euclidean'")


#: Up to this many tokens :func:`max_min_indices` takes the dense path
#: (:func:`max_min_dense`): one symmetric ``N x N`` distance matrix and a loop of two
#: fused kernels per pick beat lazily fetched row blocks (whose small GEMMs re-read all the
#: tokens) and the per-step bookkeeping of :class:`LazyRows`. Above it, the lazy path
#: computes only the rows it needs (about ``k`` plus a few blocks), which wins as ``N`` grows
#: (measured on one CPU thread: dense 1.5x faster at N=576, even at 2,048, 1.6x slower at
#: 4,096 with k = N / 9), unless ``k >= N / 4`` and ``N <= 2 * DENSE_MAX_N``.
DENSE_MAX_N = 2048

#: The dense path's distance matrices of a batch are built this many bytes at a time.
DENSE_CHUNK_BYTES = 1 << 26


def dense_distances(tokens: Tensor, distance: str) -> Tensor:
    """All pairwise distances ``[B, N, N]`` (float32) of ``tokens`` ``[B, N, D]``.

    "cosine": ``1 - cos`` from :func:`symmetric_gram` (half the multiply-adds of a full
    GEMM, exactly symmetric); "euclidean": :func:`torch.cdist` in the power-of-two units of
    :func:`euclidean_distance_rows`. The same values, up to float32 rounding of the GEMM,
    as the rows :func:`distance_rows` gives.
    """
    b, n = tokens.shape[:2]
    out = torch.empty(b, n, n, device=tokens.device)
    for i in range(b):
        if distance == "cosine":
            symmetric_gram(normalize(tokens[i]), out=out[i],
                           transform=lambda blk, rows, cols: blk.neg_().add_(1.0))
        elif distance == "euclidean":
            xf = pow2_rescale(tokens[i], dim=(0, 1)).float()
            out[i] = torch.cdist(xf, xf)
        else:
            raise ValueError(f"distance={distance!r}: expected 'cosine' or 'euclidean'")
    return out


def max_min_dense(dist: Tensor, k: int, seeds: Tensor | None = None) -> Tensor:
    """Farthest-first traversal of every sample of a batch on dense distances.

    The same recurrence and tie-breaking as :func:`farthest_isolated` and
    :func:`max_min_select` (first index on ties), vectorised over the batch: per pick one
    ``argmax`` and one fused running-minimum update (``torch.minimum(..., out=)``), with the
    diagonal set to ``-inf`` so that a pick's own row excludes it from later picks.

    Args:
        dist: ``[B, N, N]`` float32 distances; its diagonal is overwritten.
        k: picks per sample.
        seeds: ``[B]`` first picks; ``None``: per sample ``argmax_j min_{i != j} D[j, i]``.

    Returns:
        ``[B, k]`` long, in pick order.
    """
    b = dist.shape[0]
    diag = torch.diagonal(dist, dim1=1, dim2=2)
    if seeds is None:
        diag.fill_(math.inf)
        seeds = dist.amin(dim=2).argmax(dim=1)
    diag.fill_(-math.inf)
    seeds = seeds.to(dist.device)
    if b == 1:
        rows = dist[0]
        j = int(seeds[0])
        picks = [j]
        mind = rows[j].clone()
        for _ in range(1, k):
            j = int(torch.argmax(mind))
            picks.append(j)
            torch.minimum(mind, rows[j], out=mind)
        return torch.tensor(picks, device=dist.device).unsqueeze(0)
    ar = torch.arange(b, device=dist.device)
    cols = [seeds]
    mind = dist[ar, seeds]
    for _ in range(1, k):
        j = torch.argmax(mind, dim=1)
        cols.append(j)
        torch.minimum(mind, dist[ar, j], out=mind)
    return torch.stack(cols, dim=1)


def max_min_indices(tokens: Tensor, k: int, distance: str = "cosine",
                    seeds: Tensor | None = None, dense: bool | None = None) -> Tensor:
    """Max-min diversity (farthest-first / greedy k-centre) subset of each sample.

    Args:
        tokens: ``[B, N, D]``.
        k: tokens to keep per sample.
        distance: "cosine" (``1 - cos``) or "euclidean".
        seeds: ``[B]`` first pick per sample; ``None``: the token whose nearest neighbour
            is farthest (:func:`farthest_isolated`, DivPrune's rule).
        dense: ``True``: the dense path (:func:`dense_distances` + :func:`max_min_dense`),
            ``False``: the lazy-row path (:func:`farthest_isolated` +
            :func:`max_min_select`), ``None``: by size (see :data:`DENSE_MAX_N`). Both
            pick the same tokens (up to float32 rounding in exact near-ties).

    Returns:
        ``[B, k]`` long, in pick order (not sorted).
    """
    if distance not in ("cosine", "euclidean"):
        raise ValueError(f"distance={distance!r}: expected 'cosine' or 'euclidean'")
    b, n = tokens.shape[:2]
    if dense is None:
        dense = n <= DENSE_MAX_N or (n <= 2 * DENSE_MAX_N and 4 * k >= n)
    if dense:
        step = max(1, DENSE_CHUNK_BYTES // max(1, 4 * n * n))
        return torch.cat([
            max_min_dense(dense_distances(tokens[s:s + step], distance), k,
                          None if seeds is None else seeds[s:s + step])
            for s in range(0, b, step)])
    out = []
    for b in range(tokens.shape[0]):
        cache = LazyRows(distance_rows(tokens[b], distance), tokens.shape[1], tokens.device)
        seed = farthest_isolated(cache) if seeds is None else int(seeds[b])
        out.append(max_min_select(cache, k, seed))
    return torch.stack(out)


def text_dim_check(tokens: Tensor, text: Tensor, method: str) -> None:
    """Text-conditioned methods compare text and tokens directly: their widths must agree."""
    if text.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"method {method!r}: text has width {text.shape[-1]} but tokens have "
                         f"{tokens.shape[-1]}; expected text embeddings in the tokens' space "
                         "(same last dimension)")
