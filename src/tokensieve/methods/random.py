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


def random_indices(b: int, n: int, k: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """``k`` distinct positions out of ``n`` drawn uniformly per sample, ascending ``[B, K]``."""
    scores = torch.rand(b, n, generator=generator, device=device)
    return topk_indices(scores, k)


@register("random", paper="Uniformly random token selection (baseline)", stage="pre-llm",
          kind="subset", config=RandomConfig)
def random_select(tokens: Tensor, k: int, signals: Signals, config: RandomConfig,
                  generator: torch.Generator | None) -> Reduction:
    """Keep ``k`` tokens chosen uniformly at random, in original order."""
    b, n, _ = tokens.shape
    return select(tokens, random_indices(b, n, k, generator, tokens.device))
