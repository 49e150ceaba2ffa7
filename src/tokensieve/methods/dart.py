"""DART: duplication-aware token selection around a few pivot tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.ops import normalize, select
from tokensieve.core.options import Count, PositiveCount
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._greedy import text_dim_check


@dataclass(frozen=True)
class DARTConfig:
    """Options (official defaults).

    Attributes:
        pivots: image pivot tokens (4): the tokens with the largest L1 norm of their
            ``keys`` (of the tokens themselves when no keys are given).
        text_pivots: text pivot tokens (4), used when ``text`` is given: the real text
            tokens with the largest L1 norm (the official code ranks them by the L1 norm
            of their keys, which a token-set method does not receive).
    """

    pivots: PositiveCount = 4
    text_pivots: Count = 4

    def __post_init__(self) -> None:
        for name in ("pivots", "text_pivots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: expected an int >= 0")
        if self.pivots == 0:
            raise ValueError("pivots=0: expected at least one image pivot")


def pivot_shares(valid: Tensor, rest: int) -> Tensor:
    """Split ``rest`` tokens over the valid pivots of each sample (``valid`` ``[B, P]``):
    equal shares, the remainder going one each to the first pivots. ``[B, P]`` long."""
    nvalid = valid.sum(dim=1, keepdim=True).clamp(min=1)
    rank = torch.cumsum(valid.long(), dim=1) - 1
    share = rest // nvalid + (rank < rest % nvalid).long()
    return torch.where(valid, share, torch.zeros_like(share))


@register(
    "dart",
    paper="Stop Looking for Important Tokens in Multimodal Language Models: Duplication "
          "Matters More (DART, Wen et al., 2025)",
    stage="llm", kind="subset", optional_signals=("keys", "text", "text_mask"),
    config=DARTConfig,
)
def dart(tokens: Tensor, k: int, signals: Signals, config: DARTConfig,
         generator: torch.Generator | None) -> Reduction:
    """Pivots plus, for each pivot, the tokens least similar to it -> ``k`` tokens per sample.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` visual hidden states (the official method runs on the input
            of LLM layer K=2, normed; pass those).
        keys: optional ``[B, N, Dk]`` keys of the same layer; pivots rank by their L1 norm.
        text: optional ``[B, M, D]`` text hidden states (``text_mask`` ``[B, M]``), for the
            text pivots.

    Steps: the ``pivots`` image tokens of largest L1 norm are kept. Then, pivot by pivot
    (image pivots by descending norm, then text pivots by descending norm), each pivot
    adds the not-yet-kept image tokens of lowest cosine similarity to it.

    Budget: the official code gives each of its 4 + 4 pivots ``budget // 8`` tokens (16 at
    128) on top of the 4 image pivots, so it keeps ``budget + 4`` tokens. Here exactly
    ``k`` are kept: ``min(pivots, k)`` image pivots, and the other ``k - pivots`` split
    evenly over all pivots (remainder to the first ones): 15 or 16 per pivot at 128 with
    text, 31 at 128 without. Samples with fewer real text tokens than ``text_pivots``
    share the budget among the pivots they have. The official code visits the pivots in
    Python-set order; here the order is fixed as above.
    """
    b, n, _ = tokens.shape
    dev = tokens.device
    source = tokens if signals.keys is None else signals.keys
    norms = source.float().abs().sum(dim=-1)
    n_img = min(config.pivots, k)
    img = torch.sort(norms, dim=1, descending=True, stable=True).indices[:, :n_img]
    kept = torch.zeros(b, n, dtype=torch.bool, device=dev)
    kept.scatter_(1, img, True)
    rest = k - n_img
    if rest == 0:
        return select(tokens, img)
    xn = normalize(tokens)
    pivots = torch.gather(xn, 1, img.unsqueeze(-1).expand(-1, -1, xn.shape[-1]))
    valid = torch.ones(b, n_img, dtype=torch.bool, device=dev)
    if signals.text is not None and config.text_pivots > 0:
        text_dim_check(tokens, signals.text, "dart")
        tnorm = signals.text.float().abs().sum(dim=-1)
        if signals.text_mask is not None:
            tnorm = tnorm.masked_fill(~signals.text_mask, -math.inf)
        n_txt = min(config.text_pivots, tnorm.shape[1])
        top = torch.sort(tnorm, dim=1, descending=True, stable=True)
        tn = normalize(signals.text)
        tpiv = torch.gather(tn, 1, top.indices[:, :n_txt].unsqueeze(-1).expand(-1, -1,
                                                                               tn.shape[-1]))
        pivots = torch.cat([pivots, tpiv], dim=1)
        valid = torch.cat([valid, torch.isfinite(top.values[:, :n_txt])], dim=1)
    shares = pivot_shares(valid, rest)
    sims = pivots @ xn.transpose(1, 2)                                   # [B, P, N]
    ranks = torch.arange(n, device=dev).unsqueeze(0)
    for p in range(pivots.shape[1]):
        s = sims[:, p].masked_fill(kept, math.inf)
        order = torch.sort(s, dim=1, stable=True).indices
        take = ranks < shares[:, p:p + 1]
        kept.scatter_(1, order, take | torch.gather(kept, 1, order))
    return select(tokens, torch.nonzero(kept)[:, 1].reshape(b, k))
