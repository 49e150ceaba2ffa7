"""Random selection: the baseline every reduction method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.ops import select, topk_indices
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals


@dataclass(frozen=True)
class RandomConfig:
    """No options: the seed of ``reduce`` decides the draw."""


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_fingerprints(tokens: Tensor) -> list[int]:
    """One integer per sample of ``tokens`` ``[B, N, D]`` that depends only on that sample.

    The sum of the sample's raw bit patterns (read as 8-, 16- or 32-bit integers, added as
    int64, so exact and the same on every device), mixed with ``N`` and ``D``.
    """
    b, n, d = tokens.shape
    x = tokens.contiguous()
    size = x.element_size()
    bits = x.view({1: torch.int8, 2: torch.int16}.get(size, torch.int32))
    sums = bits.reshape(b, -1).to(torch.int64).sum(dim=1).tolist()
    return [_mix64((s & _MASK64) ^ _mix64(n * 1_000_003 + d)) for s in sums]


def sample_generators(tokens: Tensor, generator: torch.Generator | None) -> list[torch.Generator]:
    """A generator per sample of ``tokens`` ``[B, N, D]``, seeded from the sample alone.

    One 63-bit base value is drawn from ``generator`` (``reduce`` creates it fresh from its
    ``seed``; ``None``: torch's global RNG); sample ``i``'s generator is seeded with
    ``mix64(base xor mix64(fingerprint_i))`` (see :func:`sample_fingerprints`). So a
    sample's draw depends on the seed and its own values only, not on its position or
    the other samples of the batch; identical samples get identical draws.
    """
    base = int(torch.randint(0, 1 << 62, (1,), generator=generator).item())
    out = []
    for fp in sample_fingerprints(tokens):
        g = torch.Generator(device=tokens.device)
        g.manual_seed(_mix64(base ^ _mix64(fp)) >> 1)
        out.append(g)
    return out


def random_indices(b: int, n: int, k: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """``k`` distinct positions out of ``n`` drawn uniformly per sample, ascending ``[B, K]``
    (one draw from ``generator`` for the whole batch)."""
    scores = torch.rand(b, n, generator=generator, device=device)
    return topk_indices(scores, k)


@register("random", paper="Uniformly random token selection (baseline)", stage="pre-llm",
          kind="subset", config=RandomConfig)
def random_select(tokens: Tensor, k: int, signals: Signals, config: RandomConfig,
                  generator: torch.Generator | None) -> Reduction:
    """Keep ``k`` tokens chosen uniformly at random, in original order.

    Each sample gets its own draw from a generator derived from the seed and the sample's
    own values (:func:`sample_generators`), so sample ``i`` of a batch keeps the same
    tokens as the same sample reduced alone with the same seed.
    """
    b, n, _ = tokens.shape
    rows = [random_indices(1, n, k, g, tokens.device) for g in sample_generators(tokens,
                                                                                  generator)]
    return select(tokens, torch.cat(rows, dim=0))
