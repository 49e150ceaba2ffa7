"""ZipVL: per layer, keep the fewest image tokens holding a share tau of the attention.

"ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification"
(He et al., 2024, arXiv:2410.08584). No official code was found (the paper's project page
lists none; no public repository holds it): this follows the paper's description and
``/work/shared/methods.md``. The mixed-precision / evicted KV cache of the less important
tokens is out of scope: here the tokens a layer does not keep leave the sequence from that
layer on (the stage's cut), which also evicts their KV from the later layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import Tensor

from tokensieve.core.ops import select_mask
from tokensieve.core.options import Range
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import (
    LlmSchedule,
    QueryRows,
    ScoreSource,
    check_depth,
    check_layer_list,
)
from tokensieve.core.signals import Signals
from tokensieve.methods._adaptive import capped, rater_rows, uniform_cap

#: Unverified default of tau (the official code is not public; see :class:`ZipVLConfig`).
DEFAULT_TAU = 0.975


@dataclass(frozen=True)
class ZipVLConfig(LlmSchedule):
    """Options.

    In a model (``tokensieve.apply``) each layer of ``layers`` scores the image tokens
    with its own attention (its input norm, q/k projections and rotary embedding applied
    to its input, head-mean) from every text token after the image (the paper's probe
    tokens approximate the full attention map with recent and random tokens; here the
    text after the image, the recent ones, are the query rows), and only the kept tokens
    enter it and the layers after it (original positions: the paper sparsifies attention
    and keeps every token's position).

    Budget: tau decides how many tokens each layer keeps (adaptive). ``keep=None``: tau
    alone. ``keep`` (a count or a fraction of the image's tokens) bounds the average image
    tokens per LLM layer: every cut keeps at most ``c`` tokens (see
    :func:`tokensieve.methods._adaptive.uniform_cap`). ``tau=1`` keeps every token.

    Attributes:
        tau: the share of the image's attention mass the kept tokens must reach. The
            paper's default could not be verified (no code; the text was not reachable
            here): 0.975 is an unverified choice.
        layers: decoder layers at whose input the image tokens are scored and cut;
            ``None``: every layer from 1 on (the paper assigns a ratio to each layer; layer
            0 sees the whole prompt here, as no in-LLM cut in this toolkit comes before
            layer 1).
        positions: "keep" (original position ids with gaps) or "renumber".

    Differences from the paper: the paper selects important tokens among the whole
    sequence, per layer independently (a token left out of one layer's sparse attention
    is still in the next layer's input), ranks them by attention normalised by the
    number of queries that see each key, and uses probe tokens; here only image tokens
    are selected, a token left out at one layer stays out of all later ones (the stage
    cuts), and the query rows are the text after the image, which all see every image
    token, so the normalised and the accumulated scores rank alike.
    """

    scores: ClassVar[ScoreSource] = "own"
    query: ClassVar[QueryRows] = "text"
    adaptive: ClassVar[bool] = True

    tau: Annotated[float, Range(0.0, 1.0, lo_open=True)] = DEFAULT_TAU
    layers: tuple[int, ...] | None = None
    positions: Literal["keep", "renumber"] = "keep"

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not (
                0 < self.tau <= 1):
            raise ValueError(f"tau={self.tau!r}: expected a float in (0, 1]")
        check_layer_list(self.layers, minimum=1)
        if self.positions not in ("keep", "renumber"):
            raise ValueError(f"positions={self.positions!r}: expected 'keep' or 'renumber'")

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        if self.layers is None:
            if depth < 2:
                raise ValueError(f"zipvl: an LLM of {depth} decoder layer(s) has no layer to "
                                 "cut before; expected at least 2")
            return tuple(range(1, depth))
        return check_depth(self.layers, depth)

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        """The most image tokens each cut keeps (tau may keep fewer): ``n`` without
        ``keep``, else the cap of :func:`~tokensieve.methods._adaptive.uniform_cap`."""
        return uniform_cap(n, keep, self.cut_layers(depth), depth, "zipvl")


def mass_count(scores: Tensor, tau: float) -> Tensor:
    """``[B]`` the smallest ``p`` whose ``p`` largest ``scores`` ``[B, N]`` (>= 0) sum to at
    least ``tau`` of the row's total (the paper's adaptive ratio: ``p = min{p : sum_{j<=p}
    sorted(a)_j >= tau * sum(a)}``), in float64; ``tau = 1``: ``N``; at least 1."""
    b, n = scores.shape
    if tau >= 1:
        return torch.full((b,), n, dtype=torch.long, device=scores.device)
    s = torch.sort(scores.double(), dim=1, descending=True).values
    cum = torch.cumsum(s, dim=1)
    below = (cum < tau * cum[:, -1:]).sum(dim=1)
    return (below + 1).clamp(max=n)


@register(
    "zipvl",
    paper="ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification "
          "(He et al., 2024), token sparsification without the KV quantisation",
    stage="llm", kind="subset", signals=("query_attn",), config=ZipVLConfig,
)
def zipvl(tokens: Tensor, k: int, signals: Signals, config: ZipVLConfig,
          generator: torch.Generator | None) -> Reduction:
    """One ZipVL layer: the fewest image tokens holding ``tau`` of the attention mass, at
    most ``k``.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` one image's remaining tokens per row (hidden states at the cut).
        query_attn: ``[B, R, N]`` head-mean attention probabilities the ``R`` query rows
            give the image's tokens at the layer (all-zero rows are padding), or ``[B, N]``.
        k: the most tokens a row keeps; ``k = N`` is no cap (the in-LLM stage without
            ``keep``), so a call with ``k = N`` may drop tokens.

    Steps: accumulated attention ``a_j = sum_r query_attn[r, j]``; ``p`` =
    :func:`mass_count`; keep the ``min(p, k)`` largest ``a_j`` (ties to the lower index),
    returned in original order.
    """
    attn = rater_rows(signals.require("query_attn", "zipvl"))  # type: ignore[arg-type]
    b, n, _ = tokens.shape
    if attn.shape[0] != b or attn.shape[-1] != n:
        raise ValueError(f"query_attn: shape {tuple(attn.shape)} does not match the tokens "
                         f"[{b}, {n}, ...]; expected [B, N] or [B, R, N]")
    score = attn.sum(dim=1)
    p = mass_count(score, config.tau)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=tokens.device).expand(b, n))
    keep = rank < p.unsqueeze(1)
    return select_mask(tokens, capped(keep, score, k))
