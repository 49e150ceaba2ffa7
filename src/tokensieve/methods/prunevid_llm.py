"""PruneVid, question-guided KV pruning: after layer 10 keep the visual tokens the question
attends to most; the later layers (and their cache) hold only those.

Follows the official code (github.com/Visual-AI/PruneVid, ``VTPWindowCache`` in
``models/pllava/elastic_cache.py`` called from ``LlamaModel.forward`` in
``models/pllava/llama.py``; defaults of ``scripts/eval.sh``), read for its computations, not
copied (the repository is CC BY-NC-SA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep
from tokensieve.core.ops import select, select_mask, topk_indices
from tokensieve.core.options import Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import (
    AS_RUN,
    LlmSchedule,
    QueryRows,
    ScoreForm,
    ScoreSource,
    check_layer,
    check_positions,
    single_cut,
)
from tokensieve.core.signals import Signals
from tokensieve.methods._temporal import FLOOR, apportion

#: The official ``--selected_layer 10`` of the 32 decoder layers of PLLaVA-7B (Vicuna-7B):
#: layer 10 scores, layer 11 is the first without the dropped tokens.
OFFICIAL_LAYER, OFFICIAL_DEPTH = 11, 32
#: The official ``--alpha 0.4``: the share of visual tokens kept (``int(size * alpha)``).
OFFICIAL_ALPHA = 0.4
#: The official scores: the softmax of layer K-1's q / k logits before the rotary embedding
#: and over every key (the patched eager attention returns them for the prefill), maximum
#: over heads.
OFFICIAL_SCORES = ScoreForm(rotary=False, causal=False, heads="max")


@dataclass(frozen=True)
class PruneVidLlmConfig(LlmSchedule):
    """Options of PruneVid's question-guided KV pruning (official defaults of
    ``scripts/eval.sh``).

    Attributes:
        layer: K, the first decoder layer that sees only the kept visual tokens; the scores
            are the attention of layer K-1 (the official ``selected_layer`` is K-1).
            ``None``: the official ``selected_layer=10`` of a 32-layer LLM, i.e. K = 11
            scaled to the depth of the model at hand (``round(depth * 11 / 32)``).
        alpha: the share of a visual run's tokens kept when no ``keep`` is given
            (``int(N * alpha)``, floored as the official code; 0.4).
        positions: "keep" (official: kept tokens keep their position ids, decoding
            continues the original numbering) or "renumber".
        attention: "official" (the official scores: layer K-1's attention logits before the
            rotary embedding, softmaxed over every key of the sequence (no causal mask),
            maximum over heads) or "as-run" (the layer's attention as it runs: rotary,
            causal, head-mean, as the other in-LLM methods rank).
        cache: "official" (after the prefill the official code prunes the dropped tokens
            from the cache of the layers before the cut too: tokens decoded later see the
            kept tokens only, in every layer) or "keep" (the layers before the cut keep the
            whole cache, as the other in-LLM methods do).

    Counts: without ``keep`` ``int(N * alpha)``; with ``keep`` the ``keep`` tokens (a count
    or a fraction of the run) from layer K on.
    """

    scores: ClassVar[ScoreSource] = "previous"
    query: ClassVar[QueryRows] = "text"
    # with groups (after PruneVid's own merge) the per-group floors may keep fewer
    adaptive: ClassVar[bool] = True

    layer: int | None = None
    alpha: Share = OFFICIAL_ALPHA
    positions: str = "keep"
    attention: str = "official"
    cache: str = "official"

    def __post_init__(self) -> None:
        if self.layer is not None:
            check_layer("layer", self.layer, minimum=1)
        check_positions(self.positions)
        if self.attention not in ("official", "as-run"):
            raise ValueError(f"attention={self.attention!r}: expected 'official' (scores "
                             "before rotary, every key, maximum over heads) or 'as-run'")
        if self.cache not in ("official", "keep"):
            raise ValueError(f"cache={self.cache!r}: expected 'official' (decoding no longer "
                             "sees the dropped tokens in any layer) or 'keep' (the layers "
                             "before the cut keep them)")

    @property
    def hides_dropped_before_cut(self) -> bool:
        return self.cache == "official"

    @property
    def score_form(self) -> ScoreForm:
        return OFFICIAL_SCORES if self.attention == "official" else AS_RUN

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        return single_cut(self.layer, depth, OFFICIAL_LAYER / OFFICIAL_DEPTH)

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        if keep is None:
            return [int(n * self.alpha)]
        return [resolve_keep(keep, n)]


def question_scores(query_attn: Tensor) -> Tensor:
    """``[B, N]`` the largest attention any text row gives each visual token (the official
    reduction over the query rows); ``[B, N]`` input is one row already. All-zero padding
    rows cannot raise a maximum of probabilities."""
    attn = query_attn.float()
    return attn if attn.dim() == 2 else attn.amax(dim=1)


def group_counts(sizes: list[int], k: int, official: bool, alpha: float) -> list[int]:
    """Tokens each group keeps: ``official`` (the default count) the official
    ``int(size * alpha)`` per group (which may total fewer than ``k``); otherwise the groups
    share exactly ``k`` by the same floor rule at the ratio that fits
    (:func:`~tokensieve.methods._temporal.apportion`)."""
    if official:
        return [int(size * alpha) for size in sizes]
    return apportion(sizes, k, [FLOOR] * len(sizes))


@register(
    "prunevid-llm",
    paper="PruneVid: Visual Token Pruning for Efficient Video Large Language Models "
          "(Huang et al., Findings of ACL 2025), question-guided KV pruning",
    stage="llm", kind="subset", signals=("query_attn",), optional_signals=("groups",),
    config=PruneVidLlmConfig,
)
def prunevid_llm(tokens: Tensor, k: int, signals: Signals, config: PruneVidLlmConfig,
                 generator: torch.Generator | None) -> Reduction:
    """The ``k`` visual tokens with the largest attention from the text after them, in
    original order.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` one visual run's tokens per row (hidden states at layer K).
        query_attn: ``[B, R, N]`` the attention probabilities of layer K-1 from the ``R``
            text tokens after the run (all-zero rows: padding) to its tokens, combined over
            heads (see ``attention``); ``[B, N]``: one row.
        groups: optional ``[B, N]`` group ids (PruneVid's pre-LLM merge gives them: a
            segment's static tokens, a frame's dynamic ones): the top tokens of each group
            are kept, ``int(size * alpha)`` each at the default count as the official code
            does (fewer than ``k`` in total, or none from a group that small; ``mask`` pads
            a batch), the groups sharing ``k`` otherwise; tokens of group ``-1`` (in no
            group, e.g. a video's newline) are kept and count towards ``k``.

    In a model (``tokensieve.apply``) the cut happens before layer K: layers from K on see
    and cache only the kept visual tokens, at their original positions.

    Scores (``attention="official"``, the default): as the official patched eager attention
    returns them for the prefill, the softmax of layer K-1's q / k logits before the rotary
    embedding and over every key (no causal mask), reduced by the maximum over heads, then
    over the text rows (padding keys excluded). ``attention="as-run"``: the layer's
    attention as it runs (rotary, causal), averaged over heads.

    Cache (``cache="official"``, the default): the official code prunes the dropped tokens
    from the KV cache of the layers before the cut after the prefill, so decoded tokens
    see only the kept ones in every layer. Here those layers' masks hide them while
    decoding (the same outputs; the columns stay allocated); ``cache="keep"``: those
    layers keep seeing the whole cache.

    Groups: ``tokensieve.apply(model, "prunevid")`` hands the groups of its pre-LLM merge
    to this stage, as the official code prunes per group; without them (this stage alone)
    the whole visual run is one group.

    Differences from the official code: it handles one visual block of a batch of one;
    here every visual run of every row is pruned on its own.
    """
    scores = signals.require("query_attn", "prunevid-llm")
    assert isinstance(scores, Tensor)
    rated = question_scores(scores)
    if signals.groups is None:
        return select(tokens, topk_indices(rated, k), ascending=True)
    b, n = rated.shape
    groups = signals.groups.to(rated.device)
    keep = groups < 0                                    # in no group: kept
    for i in range(b):
        ids = groups[i]
        members = [torch.nonzero(ids == g).squeeze(1) for g in torch.unique(ids).tolist()
                   if g >= 0]
        counts = group_counts([m.numel() for m in members], k - int(keep[i].sum()),
                              k == int(n * config.alpha), config.alpha)
        for m, c in zip(members, counts, strict=True):
            if c:
                keep[i, m[topk_indices(rated[i, m][None], c)[0]]] = True
    return select_mask(tokens, keep)
