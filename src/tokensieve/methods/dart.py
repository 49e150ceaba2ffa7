"""DART: duplication-aware token selection around a few pivot tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep
from tokensieve.core.ops import normalize, select, select_mask
from tokensieve.core.options import Count, PositiveCount, Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import LlmSchedule, ScoreSource, check_layer, single_cut
from tokensieve.core.signals import Signals
from tokensieve.methods._greedy import text_dim_check


@dataclass(frozen=True)
class DARTConfig(LlmSchedule):
    """Options (official defaults).

    In a model (``tokensieve.apply``) DART cuts before decoder layer ``layer`` (K=2): the
    pivots rank by the L1 norm of layer K-1's keys (after its rotary embedding, heads
    concatenated), the duplication is the cosine similarity of the layer-K input states
    normed by the LLM's final norm, text pivots are the text tokens after the image, kept
    tokens keep their position ids.

    Attributes:
        layer: K, the first decoder layer that sees only the kept image tokens.
        ratio: the reduction ratio without ``keep``: ``round(N (1 - ratio))`` tokens are
            shared by the pivots on top of the image pivots (0.778: 128 of 576, the
            official scripts' ``max_num_trunction``, so 132 tokens stay).
        positions: "keep" (official) or "renumber".
        pivots: image pivot tokens (4): the tokens with the largest L1 norm of their
            ``keys`` (of the tokens themselves when no keys are given).
        text_pivots: text pivot tokens (4), used when ``text`` is given: the real text
            tokens with the largest L1 norm (the official code ranks them by the L1 norm
            of their keys, which a token-set method does not receive).
        exact_budget: ``False`` (official): every pivot adds ``(keep - pivots) // P``
            tokens (``P`` the pivots, image and text), as the official
            ``max_num_trunction // 8`` does, so up to ``P - 1`` fewer than ``keep`` tokens
            come out. ``True``: the remainder goes one each to the first pivots visited,
            so exactly ``keep`` tokens come out.
        pivot_order: "official": pivots are visited in the order CPython iterates the
            official code's ``set`` of pivot positions (image pivot ``i`` at position
            ``image_offset + i``, text pivot ``j`` at ``image_offset + N + j``; see
            :func:`official_pivot_order`). "norm": image pivots by descending norm, then
            text pivots by descending norm.
        image_offset: the sequence position of the first image token in the official
            code's positions (35 in LLaVA-1.5's prompt; 0: the token set's own indices).
            It only changes the visiting order.
    """

    scores: ClassVar[ScoreSource] = "keys"

    pivots: PositiveCount = 4
    text_pivots: Count = 4
    exact_budget: bool = False
    pivot_order: Literal["official", "norm"] = "official"
    image_offset: Count = 0
    layer: int = 2
    ratio: Share = 0.778
    positions: Literal["keep", "renumber"] = "keep"

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        check_layer("layer", self.layer, minimum=1)
        return single_cut(self.layer, depth)

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        if keep is None:
            return [min(n, self.pivots + round(n * (1 - self.ratio)))]
        return [resolve_keep(keep, n)]

    def __post_init__(self) -> None:
        for name in ("pivots", "text_pivots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: expected an int >= 0")
        if self.pivots == 0:
            raise ValueError("pivots=0: expected at least one image pivot")


def official_pivot_order(positions: list[int]) -> list[int]:
    """The order in which the official code visits its pivots: iteration over
    ``set(positions)`` (image pivots by descending key norm, then text pivots), returned
    as indices into ``positions``.

    CPython stores small ints at hash slot ``value mod table size`` (probing on
    collisions), so a set of 8 pivot positions (a 32-slot table) iterates positions below
    32 in ascending order and larger ones by ``value mod 32``; iterating a real ``set`` here
    reproduces whatever order the interpreter gives.
    """
    slot = {pos: i for i, pos in enumerate(positions)}
    return [slot[pos] for pos in set(positions)]


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
    stage="llm", kind="subset", optional_signals=("keys", "text", "text_mask", "text_keys"),
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
        text_keys: optional ``[B, M, Dk]`` keys of the text tokens; text pivots rank by
            their L1 norm (as the official code does), else by the norm of ``text``.

    Steps: the ``pivots`` image tokens of largest L1 norm are kept. Then, pivot by pivot
    (``pivot_order``: by default the official set order, see
    :func:`official_pivot_order`), each pivot adds the not-yet-kept image tokens of lowest
    cosine similarity to it.

    Budget: the official code gives each of its 4 + 4 pivots ``max_num_trunction // 8``
    tokens (16 at 128) on top of the 4 image pivots, keeping ``4 + 8 * 16 = 132``. Here
    ``keep`` counts the pivots: ``min(pivots, keep)`` image pivots, and each pivot adds
    ``(keep - pivots) // P`` tokens (``exact_budget=False``, official: ``keep=132`` gives
    the official 132 tokens; other budgets lose up to ``P - 1``), or the remainder also
    goes one each to the first pivots visited (``exact_budget=True``: exactly ``keep``).
    Samples with fewer real text tokens than ``text_pivots`` share among the pivots they
    have (so counts may differ per sample: the batch is then padded, see ``mask``).
    Without text, or with an empty ``text`` ``[B, 0, D]``, only image pivots are used.
    ``keep = N`` keeps every token.
    """
    b, n, _ = tokens.shape
    dev = tokens.device
    if k >= n:  # keeping every token (the contract of every subset method)
        return select(tokens, torch.arange(n, device=dev).expand(b, -1))
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
    top_text = None
    if signals.text is not None and config.text_pivots > 0:
        text_dim_check(tokens, signals.text, "dart")
        tsource = signals.text if signals.text_keys is None else signals.text_keys
        tnorm = tsource.float().abs().sum(dim=-1)
        if signals.text_mask is not None:
            tnorm = tnorm.masked_fill(~signals.text_mask, -math.inf)
        n_txt = min(config.text_pivots, tnorm.shape[1])
        top = torch.sort(tnorm, dim=1, descending=True, stable=True)
        tn = normalize(signals.text)
        tpiv = torch.gather(tn, 1, top.indices[:, :n_txt].unsqueeze(-1).expand(-1, -1,
                                                                               tn.shape[-1]))
        pivots = torch.cat([pivots, tpiv], dim=1)
        valid = torch.cat([valid, torch.isfinite(top.values[:, :n_txt])], dim=1)
        top_text = top.indices[:, :n_txt]
    if config.pivot_order == "official":
        perm = torch.tensor([_set_order(img[i], valid[i], n, config.image_offset,
                                        top_text[i] if top_text is not None else None)
                             for i in range(b)], device=dev)
        pivots = torch.gather(pivots, 1, perm.unsqueeze(-1).expand(-1, -1, pivots.shape[-1]))
        valid = torch.gather(valid, 1, perm)
    if config.exact_budget:
        shares = pivot_shares(valid, rest)
    else:
        nvalid = valid.sum(dim=1, keepdim=True).clamp(min=1)
        shares = torch.where(valid, rest // nvalid, torch.zeros_like(nvalid))
    sims = pivots @ xn.transpose(1, 2)                                   # [B, P, N]
    ranks = torch.arange(n, device=dev).unsqueeze(0)
    for p in range(pivots.shape[1]):
        s = sims[:, p].masked_fill(kept, math.inf)
        order = torch.sort(s, dim=1, stable=True).indices
        take = ranks < shares[:, p:p + 1]
        kept.scatter_(1, order, take | torch.gather(kept, 1, order))
    return select_mask(tokens, kept)


def _set_order(img: Tensor, valid: Tensor, n: int, offset: int, text: Tensor | None
               ) -> list[int]:
    """One sample's pivot visiting order (a permutation of its ``P`` pivot slots): the
    official set order over the valid pivots, then the invalid slots (which add nothing)."""
    positions = [offset + int(i) for i in img.tolist()]
    if text is not None:
        positions += [offset + n + int(j) for j in text.tolist()]
    ok = valid.tolist()
    real = [i for i in range(len(positions)) if ok[i]]
    order = [real[i] for i in official_pivot_order([positions[i] for i in real])]
    return order + [i for i in range(len(positions)) if not ok[i]]
