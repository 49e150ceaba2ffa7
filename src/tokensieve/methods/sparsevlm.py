"""SparseVLM: text raters rank the image tokens inside the LLM; the dropped ones are recycled.

"SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"
(Zhang et al., ICML 2025), version 1 (token recycling, contiguous positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep
from tokensieve.core.ops import gather_tokens
from tokensieve.core.options import PositiveCount, Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import (
    LlmSchedule,
    QueryRows,
    ScoreSource,
    check_layer_list,
    layer_average,
    scaled_layers,
)
from tokensieve.core.signals import Signals
from tokensieve.methods._dpc import dpc_knn

#: The official pruning layers of the 32-layer LLaVA LLMs: their attention scores the image
#: tokens and their outputs are pruned (the cut is before the next layer).
OFFICIAL_LAYERS = (2, 6, 15)
OFFICIAL_DEPTH = 32
#: The official schedules (top-k image tokens kept at each pruning layer) for 576 tokens.
SCHEDULE_192 = (300, 200, 110)
SCHEDULE_128 = (303, 110, 36)
SCHEDULE_64 = (66, 30, 17)
OFFICIAL_TOKENS = 576


def kept_count(k: int, n: int) -> int:
    """Tokens a stage keeps by relevance: ``min(k, n - 1)`` (the official code always drops
    at least one token; with recycling it comes back as a cluster of one), ``n`` if ``n == 1``."""
    return min(k, n - 1) if n > 1 else n


def recycled_count(dropped: int, ratio: float) -> int:
    """Dropped tokens recycled: ``int(dropped * ratio) + 1`` (official: 30 %), at most
    ``dropped``; 0 when nothing was dropped."""
    return min(dropped, int(dropped * ratio) + 1) if dropped > 0 else 0


def cluster_count(recycled: int, ratio: float) -> int:
    """Clusters the recycled tokens form: ``int(recycled * ratio) + 1`` (official:
    ``int(m / 10) + 1``), at most ``recycled``; 0 when none are recycled."""
    return min(recycled, int(recycled * ratio) + 1) if recycled > 0 else 0


def rater_relevance(query_attn: Tensor) -> Tensor:
    """``[B, N]`` relevance: ``query_attn`` ``[B, N]`` itself, or of ``[B, R, N]`` the mean over
    the real rater rows (all-zero rows are padding), in float32."""
    attn = query_attn.float()
    if attn.dim() == 2:
        return attn
    real = (attn != 0).any(dim=-1)                                     # [B, R]
    return attn.sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)


@dataclass(frozen=True)
class SparseVLMConfig(LlmSchedule):
    """Options (official defaults of the LLaVA-1.5 scripts, SparseVLM v1).

    In a model (``tokensieve.apply``) the text tokens after the image that :meth:`raters`
    picks rate the image tokens at each layer of ``layers``; the image keeps its top tokens
    by their attention from the next layer on (plus the recycled clusters), and the kept
    sequence gets contiguous positions.

    Attributes:
        layers: the decoder layers whose attention scores the image tokens; the cut is
            right after each (:meth:`cut_layers` gives ``layer + 1``). ``None``: the
            official (2, 6, 15) of a 32-layer LLM, scaled to the depth at hand (the cuts
            at 3/32, 7/32, 16/32 of the depth, at least layer 1; stages that land on one
            cut keep the later count).
        schedule: top-k image tokens kept at each layer, for a 576-token image (scaled by
            ``N / 576`` for other sizes): the official 192-token setting (300, 200, 110);
            the official code also lists (303, 110, 36) for 128 and (66, 30, 17) for 64.
            With ``keep`` the schedule is scaled by one factor (see :meth:`counts`).
        positions: "renumber" (official v1: position ids re-indexed after each cut) or
            "keep" (original position ids with gaps, as SparseVLM v2 does; a merged token
            takes its centre's position).
        recycle: recycle the dropped tokens (official v1: True): the most relevant of them
            are clustered (DPC-kNN) and each cluster's average joins the kept tokens.
        recycle_ratio: the share of the dropped tokens recycled (``int(d * 0.3) + 1``).
        cluster_ratio: clusters per recycled token (``int(m * 0.1) + 1`` clusters).
    """

    scores: ClassVar[ScoreSource] = "previous"
    query: ClassVar[QueryRows] = "text"

    layers: tuple[int, ...] | None = None
    schedule: tuple[PositiveCount, ...] = SCHEDULE_192
    positions: Literal["keep", "renumber"] = "renumber"
    recycle: bool = True
    recycle_ratio: Share = 0.3
    cluster_ratio: Share = 0.1

    def __post_init__(self) -> None:
        check_layer_list(self.layers, minimum=0)
        sched = self.schedule
        if (not isinstance(sched, (tuple, list)) or not sched or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in sched)):
            raise ValueError(f"schedule={sched!r}: expected a non-empty tuple of counts >= 1")
        if any(b > a for a, b in zip(sched[:-1], sched[1:], strict=True)):
            raise ValueError(f"schedule={tuple(sched)}: expected non-increasing counts")
        stages = len(OFFICIAL_LAYERS) if self.layers is None else len(self.layers)
        if len(sched) != stages:
            raise ValueError(f"schedule={tuple(sched)} has {len(sched)} stages but there are "
                             f"{stages} layers (layers={self.layers!r}); expected one count "
                             "per layer")
        if self.positions not in ("keep", "renumber"):
            raise ValueError(f"positions={self.positions!r}: expected 'keep' or 'renumber'")
        for name in ("recycle_ratio", "cluster_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name}={v!r}: expected a float in [0, 1]")

    # -- schedule ------------------------------------------------------------------------
    def _stages(self, depth: int) -> list[tuple[int, int]]:
        """(scoring layer, schedule entry) per stage for an LLM of ``depth`` layers."""
        if self.layers is not None:
            if self.layers[-1] + 1 >= depth:
                raise ValueError(f"layers={tuple(self.layers)}: the LLM has {depth} decoder "
                                 f"layers and the cut is after each; expected layers in "
                                 f"[0, {depth - 1})")
            return [(layer, i) for i, layer in enumerate(self.layers)]
        if depth < 2:
            raise ValueError(f"sparsevlm: an LLM of {depth} decoder layer(s) has no layer to "
                             "cut before; expected at least 2")
        stages: list[tuple[int, int]] = []
        for i, layer in enumerate(OFFICIAL_LAYERS):
            # the official cut (layer + 1 of 32) at its fraction of this depth
            at = scaled_layers(((layer + 1) / OFFICIAL_DEPTH,), depth)[0] - 1
            if stages and stages[-1][0] == at:
                stages[-1] = (at, i)           # two stages on one layer: the later count
            else:
                stages.append((at, i))
        return stages

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        """Decoder layers before which image tokens are cut: each scoring layer + 1."""
        return tuple(layer + 1 for layer, _ in self._stages(depth))

    def image_tokens(self, n: int, counts: list[int]) -> list[int]:
        """The image's tokens from each cut on (kept plus recycled clusters), when ``n``
        enter and each stage keeps ``counts[i]`` by relevance (see :func:`sparsevlm`)."""
        out, cur = [], n
        for c in counts:
            kept = kept_count(c, cur)
            extra = 0
            if self.recycle:
                extra = cluster_count(recycled_count(cur - kept, self.recycle_ratio),
                                      self.cluster_ratio)
            cur = kept + extra
            out.append(cur)
        return out

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        """Image tokens kept by relevance (top-k, before recycling) from each cut on.

        Without ``keep``: ``schedule`` scaled by ``N / 576`` and rounded (the official
        (300, 200, 110) for ``N = 576``; (66, 30, 17) and (303, 110, 36) are the official
        64- and 128-token lists, option ``schedule``). With ``keep`` (a count or a fraction
        of ``N``): the average number of image tokens per LLM layer (all layers, the
        recycled clusters counted) is ``keep`` as closely as the integer counts allow, the
        schedule scaled by one factor found by bisection (each count at least 1 and at most
        the previous one). By that measure the official 192 setting averages 206.5 tokens
        per layer at N = 576 over 32 layers. Raises ``ValueError`` when ``keep`` is below
        what the layers allow (the layers before the first cut see all ``N`` tokens).
        """
        stages = self._stages(depth)
        base = [self.schedule[i] for _, i in stages]
        if keep is None:
            return _scaled(base, n / OFFICIAL_TOKENS, n)
        target = resolve_keep(keep, n)
        cuts = self.cut_layers(depth)

        def average(f: float) -> float:
            return layer_average(n, self.image_tokens(n, _scaled(base, f, n)), cuts, depth)

        lo, hi = 0.0, n / min(base) + 1.0
        low = average(lo)
        if target < low - 1e-9:
            raise ValueError(
                f"keep={keep!r}: with cuts after layers {tuple(c - 1 for c in cuts)} of {depth} "
                f"an image of {n} tokens averages at least {low:.4g} tokens per layer; pass "
                "a larger keep or earlier layers=(...)")
        if average(hi) <= target:
            return _scaled(base, hi, n)
        for _ in range(100):                   # average(lo) < target <= average(hi)
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if average(mid) < target else (lo, mid)
        below, above = average(lo), average(hi)
        return _scaled(base, lo if target - below < above - target else hi, n)

    def raters(self, image: Tensor, text: Tensor) -> Tensor:
        """The official rater rule (SparseVLM Sec. 3.2), on the LLM input embeddings.

        Each text token's relevance is the mean over the image tokens of the softmax over
        the text of ``image @ text^T``; the raters are the text tokens whose relevance
        exceeds the mean (all of them when none does).

        Args:
            image: ``[N, D]`` the image's input embeddings.
            text: ``[M, D]`` the text after the image.

        Returns:
            ``[M]`` bool (computed in float32; the official code in the model's dtype).
        """
        relevance = torch.softmax(image.float() @ text.float().T, dim=-1).mean(dim=0)
        pick = relevance > relevance.mean()
        return pick if bool(pick.any()) else torch.ones_like(pick)


def _scaled(base: list[int], factor: float, n: int) -> list[int]:
    """``round(c * factor)`` per stage, at least 1, at most the previous count (and ``n``)."""
    out, prev = [], n
    for c in base:
        prev = min(prev, max(1, round(c * factor)))
        out.append(prev)
    return out


@register(
    "sparsevlm",
    paper="SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model "
          "Inference (Zhang et al., ICML 2025)",
    stage="llm", kind="subset+merge", signals=("query_attn",), config=SparseVLMConfig,
)
def sparsevlm(tokens: Tensor, k: int, signals: Signals, config: SparseVLMConfig,
              generator: torch.Generator | None) -> Reduction:
    """One SparseVLM stage: the top-``k`` image tokens by rater attention, plus the recycled
    clusters of the most relevant dropped tokens.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` one image's tokens per row (their hidden states at the cut).
        query_attn: ``[B, R, N]`` head-mean attention probabilities the ``R`` rater text
            tokens give the image's tokens at the scoring layer (all-zero rows are
            padding), or ``[B, N]``. Relevance = the mean over the real rater rows.

    Steps (official v1): keep ``min(k, N - 1)`` tokens of highest relevance (the official
    code always drops one; ties to the lower index). With ``recycle``, the
    ``int(0.3 d) + 1`` most relevant of the ``d`` dropped tokens are clustered into
    ``int(m * 0.1) + 1`` clusters by DPC-kNN (:func:`tokensieve.methods._dpc.dpc_knn`, its
    tie-breaking noise drawn from ``generator``) and each cluster becomes its members'
    average (the official code divides by ``size + 1e-6``; here the exact mean).

    Returns:
        A :class:`Reduction`: ``tokens`` ``[B, K + C, D]`` (the kept tokens ascending, then
        the merged ones in descending centre score, the order the official code inserts
        them), ``indices`` ``[B, K]`` the kept positions, ``positions`` ``[B, K + C]`` (the
        kept positions, then each cluster's centre), ``sizes`` ``[B, K + C]`` (1 for kept
        tokens, the cluster sizes), ``assignment`` ``[B, N]`` (each token's output slot,
        ``-1`` if dropped). So a stage outputs ``K + C`` tokens, not ``k``.
    """
    b, n, _ = tokens.shape
    dev = tokens.device
    relevance = rater_relevance(signals.require("query_attn", "sparsevlm"))  # type: ignore[arg-type]
    kept_n = kept_count(k, n)
    order = torch.sort(relevance, dim=1, descending=True, stable=True).indices
    keep_idx = order[:, :kept_n].sort(dim=1).values
    ones = torch.ones(b, kept_n, dtype=torch.long, device=dev)
    assignment = torch.full((b, n), -1, dtype=torch.long, device=dev)
    assignment.scatter_(1, keep_idx, torch.arange(kept_n, device=dev).expand(b, -1))
    kept = gather_tokens(tokens, keep_idx)
    m = recycled_count(n - kept_n, config.recycle_ratio) if config.recycle else 0
    if m == 0:
        return Reduction(tokens=kept, indices=keep_idx, positions=keep_idx, sizes=ones,
                         assignment=assignment)
    recycled = order[:, kept_n:kept_n + m]             # descending relevance, as official
    clusters = dpc_knn(gather_tokens(tokens, recycled), cluster_count(m, config.cluster_ratio),
                       generator=generator)
    centres = torch.gather(recycled, 1, clusters.centres)
    assignment.scatter_(1, recycled, kept_n + clusters.assignment)
    return Reduction(
        tokens=torch.cat([kept, clusters.tokens], dim=1),
        indices=keep_idx,
        positions=torch.cat([keep_idx, centres], dim=1),
        sizes=torch.cat([ones, clusters.sizes], dim=1),
        assignment=assignment,
    )
