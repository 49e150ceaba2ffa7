"""Bipartite soft matching (ToMe) and multi-round merging, shared by ``tome`` and ``turbo``.

One round of bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster",
ICLR 2023) over ``T`` tokens:

1. L2-normalise the metric (keys or tokens) and split the tokens by parity: set A holds the
   even positions ``0, 2, 4, ...``, set B the odd positions ``1, 3, 5, ...``.
2. Every A token finds its most similar B token (cosine similarity; ties: lowest B index).
3. The ``r`` A tokens with the highest priority are merged into their B match. ToMe's
   priority is the best similarity; Turbo subtracts a per-token penalty (its weighted
   semantic value) from it. A protected first token (CLS) is never merged.

:func:`bipartite_soft_matching` returns a :class:`Matching` whose ``merge`` / ``unmerge`` /
``merge_wavg`` methods play the role of ToMe's closures, so an in-encoder patch can reuse
them block by block. :func:`merge_to_budget` repeats rounds until a budget is reached.

Output order: unlike the official code (which concatenates ``[unmerged A, B]``), the output
slots keep the original order of the surviving tokens (the unmerged A tokens and every B
token), so a protected CLS stays first and ``positions`` are ascending.

Sums over merged groups are accumulated in a fixed order (survivor first, then the merged
tokens by ascending index) without colliding atomic adds, so results are bitwise
reproducible on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.ops import gather_tokens, normalize
from tokensieve.core.reduction import Reduction

_MERGE_MODES = ("sum", "mean", "amax")


@dataclass(frozen=True)
class Matching:
    """One round of bipartite soft matching over ``T`` tokens that removes ``r`` of them.

    Attributes:
        slot: ``[B, T]`` long, the output slot of every input token (merged A tokens share
            the slot of their B match).
        kept: ``[B, T - r]`` long, ascending: the input index of the surviving token that
            represents each output slot.
        src: ``[B, r]`` long, input indices of the merged A tokens (in merge priority order).
        dst: ``[B, r]`` long, input indices of the B tokens they were merged into.
    """

    slot: Tensor
    kept: Tensor
    src: Tensor
    dst: Tensor

    def _shape(self, x: Tensor) -> tuple[int, int, int]:
        """``x``'s ``(B, T, C)``; ValueError unless ``T`` is the matched set's size."""
        b, t, c = x.shape
        if t != self.slot.shape[1]:
            raise ValueError(f"x has {t} tokens, expected {self.slot.shape[1]} (the matched set)")
        return b, t, c

    @property
    def num_out(self) -> int:
        """``T - r``, the number of output slots."""
        return int(self.kept.shape[1])

    def merge(self, x: Tensor, mode: str = "sum") -> Tensor:
        """Pool ``x`` ``[B, T, C]`` into ``[B, T - r, C]`` slot by slot.

        ``mode``: "sum", "mean" (unweighted over the tokens of a slot) or "amax". Computed in
        float32, returned in ``x``'s dtype.
        """
        if mode not in _MERGE_MODES:
            raise ValueError(f"mode={mode!r}: expected one of {_MERGE_MODES}")
        b, t, c = self._shape(x)
        k = self.num_out
        xf = x.float()
        if mode == "amax":  # order-independent, so the atomic reduction is deterministic
            flat = (self.slot + k * torch.arange(b, device=x.device).unsqueeze(1)).reshape(-1)
            out = torch.zeros(b * k, c, device=x.device, dtype=torch.float32)
            out = out.index_reduce_(0, flat, xf.reshape(b * t, c), "amax", include_self=False)
            return out.reshape(b, k, c).to(x.dtype)
        out = self._sum(xf)
        if mode == "mean":
            out = out / self.group_sizes().unsqueeze(-1)
        return out.to(x.dtype)

    def group_sizes(self) -> Tensor:
        """``[B, T - r]`` float32: how many input tokens each output slot holds."""
        b, k = self.slot.shape[0], self.num_out
        count = torch.ones(b, k, dtype=torch.long, device=self.slot.device)
        dst_slot = self.slot.gather(1, self.src)
        count.scatter_add_(1, dst_slot, torch.ones_like(dst_slot))  # integer: exact
        return count.float()

    def _levels(self, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """The merged A tokens grouped by destination slot, by ascending input index
        within a slot: ``(slot [B, r], src [B, r], level [B * r])``; ``level`` is each one's
        rank within its slot, so no two tokens of one level share a slot."""
        b, r = self.src.shape
        dst_slot = self.slot.gather(1, self.src)
        order = torch.argsort(dst_slot * t + self.src, dim=1)  # unique keys
        slot_sorted = dst_slot.gather(1, order)
        src_sorted = self.src.gather(1, order)
        pos = torch.arange(r, device=self.src.device).expand(b, -1)
        first = torch.ones_like(slot_sorted, dtype=torch.bool)
        first[:, 1:] = slot_sorted[:, 1:] != slot_sorted[:, :-1]
        level = (pos - torch.where(first, pos, 0).cummax(dim=1).values).reshape(-1)
        return slot_sorted, src_sorted, level

    def _sum(self, x: Tensor) -> Tensor:
        """Slot sums of float32 ``x`` ``[B, T, C]``, in a fixed order on every device.

        Each slot starts from its surviving token; the A tokens merged into it are added
        one level at a time (the j-th merged token of every slot, by ascending input index),
        so no two additions of a level touch the same slot: no atomics, bitwise
        reproducible on CPU and CUDA alike.
        """
        b, t, c = x.shape
        k, r = self.num_out, self.src.shape[1]
        dev = x.device
        rows = torch.arange(b, device=dev).unsqueeze(1)
        flat_x = x.reshape(b * t, c)
        out = flat_x.index_select(0, (self.kept + t * rows).reshape(-1))  # [B * k, C]
        if r:
            slot_sorted, src_sorted, level = self._levels(t)
            out_row = (slot_sorted + k * rows).reshape(-1)
            in_row = (src_sorted + t * rows).reshape(-1)
            for j in range(int(level.max()) + 1):
                sel = level == j  # distinct slots within a level: one add per row
                out.index_add_(0, out_row[sel], flat_x.index_select(0, in_row[sel]))
        return out.reshape(b, k, c)

    def unmerge(self, x: Tensor) -> Tensor:
        """Copy each slot back to every input token it holds: ``[B, T - r, C] -> [B, T, C]``."""
        return gather_tokens(x, self.slot)

    def merge_wavg(self, x: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Size-weighted average of the merged tokens (ToMe's ``merge_wavg``).

        Args:
            x: ``[B, T, C]`` tokens.
            sizes: ``[B, T]`` how many source tokens each input token stands for (ones if
                ``None``).

        Returns:
            ``(x' [B, T - r, C] in x's dtype, sizes' [B, T - r] float32)``.
        """
        b, t, c = self._shape(x)
        s = torch.ones(b, t, device=x.device) if sizes is None else sizes.float()
        new_sizes = self._sum(s.unsqueeze(-1)).squeeze(-1)
        # A slot that received no merged token is its survivor unchanged: gather them in x's
        # dtype, then recompute only the slots that did (at most r per image), in float32
        # and in _sum's order (survivor first, merged tokens level by level), so those are
        # bitwise what merging every slot gives. Measured at CLIP-L/14 width, bf16, one CPU
        # thread: the merge no longer converts and rescales every token of the layer.
        out = gather_tokens(x, self.kept)
        r = self.src.shape[1]
        if r == 0:
            return out, new_sizes
        k = self.num_out
        rows = torch.arange(b, device=x.device).unsqueeze(1)
        slot_sorted, src_sorted, level = self._levels(t)
        flat_slot = (slot_sorted + k * rows).reshape(-1)
        touched = torch.unique(flat_slot)  # sorted flat slots
        at = torch.searchsorted(touched, flat_slot)
        flat_x, flat_s = x.reshape(b * t, c), s.reshape(-1)
        survivor = (self.kept + t * rows).reshape(-1)[touched]
        acc = flat_x.index_select(0, survivor).float() * flat_s[survivor].unsqueeze(-1)
        in_row = (src_sorted + t * rows).reshape(-1)
        contrib = flat_x.index_select(0, in_row).float() * flat_s[in_row].unsqueeze(-1)
        for j in range(int(level.max()) + 1):
            sel = level == j  # distinct slots within a level: one add per row
            acc.index_add_(0, at[sel], contrib[sel])
        acc = acc / new_sizes.reshape(-1)[touched].unsqueeze(-1)
        out.view(b * k, c)[touched] = acc.to(x.dtype)
        return out, new_sizes


def bipartite_soft_matching(metric: Tensor, r: int, *, protect_first: bool = False,
                            penalty: Tensor | None = None) -> Matching:
    """One round of ToMe's bipartite soft matching.

    Args:
        metric: ``[B, T, C]`` features to compare (keys or tokens; normalised here, float32).
        r: how many tokens to remove, ``0 <= r <= (T - protect_first) // 2``.
        protect_first: never merge token 0 (a CLS token).
        penalty: optional ``[B, T]`` subtracted from each A token's best similarity before
            ranking (Turbo: ``100 * alpha * cls_attn``); it changes which A tokens merge, not
            where they merge.

    Returns:
        The :class:`Matching`. Merge priority ties are broken towards the lower A index.
    """
    b, t, _ = metric.shape
    protected = int(protect_first)
    limit = max((t - protected) // 2, 0)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= limit:
        raise ValueError(f"r={r!r}: expected an int in [0, {limit}] (at most half of the {t} "
                         f"tokens{', CLS excluded' if protect_first else ''})")
    dev = metric.device
    if r == 0:
        idx = torch.arange(t, device=dev).unsqueeze(0).expand(b, -1)
        empty = torch.zeros(b, 0, dtype=torch.long, device=dev)
        return Matching(slot=idx, kept=idx, src=empty, dst=empty)
    m = normalize(metric)
    sim = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|]
    best, best_b = sim.max(dim=-1)
    if penalty is not None:
        best = best - penalty.float()[:, ::2]
    if protect_first:
        best[:, 0] = -torch.inf
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src_a = order[:, :r]
    src = 2 * src_a
    dst = 2 * best_b.gather(1, src_a) + 1
    merged = torch.zeros(b, t, dtype=torch.bool, device=dev)
    merged.scatter_(1, src, True)
    survive = ~merged
    rank = survive.long().cumsum(dim=1) - 1
    slot = rank.scatter(1, src, rank.gather(1, dst))
    kept = torch.nonzero(survive)[:, 1].reshape(b, t - r)
    return Matching(slot=slot, kept=kept, src=src, dst=dst)


@dataclass(frozen=True)
class MergeResult:
    """Tokens merged down to a budget.

    Attributes:
        tokens: ``[B, K, D]`` size-weighted means of the merged groups, input dtype.
        sizes: ``[B, K]`` float32, source tokens (or prior sizes) per output token.
        positions: ``[B, K]`` long, ascending: the source position of each group's
            surviving token.
        assignment: ``[B, N]`` long, the output slot of every source token.
    """

    tokens: Tensor
    sizes: Tensor
    positions: Tensor
    assignment: Tensor


def check_sizes(sizes: Tensor, b: int, n: int, method: str) -> Tensor:
    """Validate prior token sizes ``[B, N]`` (finite and positive)."""
    if not isinstance(sizes, Tensor) or tuple(sizes.shape) != (b, n):
        got = tuple(sizes.shape) if isinstance(sizes, Tensor) else type(sizes).__name__
        raise ValueError(f"{method}: sizes: expected shape {(b, n)} ([B, N]), got {got}")
    s = sizes.float()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError(f"{method}: sizes: expected finite positive values, got min "
                         f"{float(s.min())}")
    return s


def merge_to_budget(tokens: Tensor, k: int, *, metric: Tensor | None = None,
                    sizes: Tensor | None = None, protect_first: bool = False,
                    attn: Tensor | None = None, attn_weight: float = 0.0) -> MergeResult:
    """Merge ``tokens`` ``[B, N, D]`` down to ``k`` tokens by repeated bipartite matching.

    Each round removes ``r = min(T - k, (T - protect_first) // 2)`` of the current ``T``
    tokens (ToMe's 50 % cap), so reaching ``k`` takes about ``log2(N / k)`` rounds. Between
    rounds the metric is merged by size-weighted average (as the official Turbo/FOLDER code
    does when it merges more than half of the tokens in one layer) and ``attn`` by an
    unweighted mean over each merged group (the official ``scatter_reduce(..., "mean")``).

    Args:
        tokens: ``[B, N, D]``.
        k: target count, ``1 + protect_first <= k <= N`` (validated by the caller).
        metric: ``[B, N, C]`` matching features (default: the tokens).
        sizes: optional prior sizes ``[B, N]`` (e.g. from earlier merges), positive.
        protect_first: token 0 is a CLS token that is never merged.
        attn: optional ``[B, N]`` per-token semantic value (Turbo); the matching penalty is
            ``attn_weight * attn``.
        attn_weight: weight of ``attn`` in the penalty.
    """
    b, n, _ = tokens.shape
    protected = int(protect_first)
    x = tokens.float()
    m = x if metric is None else metric.float()
    s = torch.ones(b, n, device=tokens.device) if sizes is None else sizes.float()
    a = None if attn is None else attn.float()
    positions = torch.arange(n, device=tokens.device).unsqueeze(0).expand(b, -1)
    assignment = positions
    t = n
    while t > k:
        r = min(t - k, (t - protected) // 2)
        if r <= 0:
            raise ValueError(f"keep={k}: cannot merge {t} tokens further "
                             f"(the protected CLS token is never merged)")
        match = bipartite_soft_matching(
            m, r, protect_first=protect_first, penalty=None if a is None else attn_weight * a)
        x, new_s = match.merge_wavg(x, s)
        if metric is None:
            m = x  # the tokens are the metric: their size-weighted means are already known
        else:
            m = match.merge(m * s.unsqueeze(-1), "sum") / new_s.unsqueeze(-1)
        if a is not None:
            a = match.merge(a.unsqueeze(-1), "mean").squeeze(-1)
        s = new_s
        positions = positions.gather(1, match.kept)
        assignment = match.slot.gather(1, assignment)
        t -= r
    return MergeResult(tokens=x.to(tokens.dtype), sizes=s, positions=positions,
                       assignment=assignment)


def merge_reduction(result: MergeResult, prior_sizes: Tensor | None = None) -> Reduction:
    """Wrap a merge result as a pure-merge ``Reduction`` (sizes as counts unless prior
    sizes were given, in which case they keep the prior sizes' dtype)."""
    sizes = result.sizes.round().long() if prior_sizes is None else result.sizes.to(
        prior_sizes.dtype)
    return Reduction(tokens=result.tokens, indices=None, positions=result.positions,
                     sizes=sizes, assignment=result.assignment)


# Validation shared by the method files of this family.


def check_flag(value: object, name: str, method: str) -> None:
    """Reject non-bool flags (``has_cls="yes"`` would otherwise be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{method}: {name}={value!r}: expected True or False")


def check_cls_budget(k: int, n: int, need: int, method: str, why: str) -> None:
    """Raise if the budget ``k`` is below ``need`` (e.g. CLS plus one more token)."""
    if k < need:
        raise ValueError(f"{method}: keep={k} is too small: {why} needs keep >= {need} "
                         f"(of {n} tokens)")
