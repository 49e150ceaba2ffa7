"""MustDrop, prefill (LLM) stage: drop image tokens the text attends to little, globally and
individually.

"Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model"
(MustDrop, Liu et al., 2024). Official code: github.com/liuting20/MustDrop
(``LlamaDynamicvitModel.dual_attention_filter`` in
``llava/model/language_model/modelling_sparse_llama.py``; thresholds from the
``scripts/v1_5/eval/*.sh`` settings). This is the prefill stage; the vision-encoder stage
(3x3 local merging and the key set) is ``mustdrop-merge``, which runs this stage after it
by default and protects its key set here; the decode-stage KV-cache pruning is not
reproduced (see :class:`MustDropConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from tokensieve.core.ops import select_mask
from tokensieve.core.options import Count, Share
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import (
    LlmSchedule,
    QueryRows,
    ScoreSource,
    check_layer_list,
    scaled_layers,
)
from tokensieve.core.signals import Signals
from tokensieve.methods._adaptive import capped, rater_rows, uniform_cap

#: The official pruning layers of the 32-layer LLaVA-1.5 LLM: each layer's own attention
#: scores the image tokens and its output is pruned (the cut is before the next layer).
OFFICIAL_LAYERS = (2, 6, 10, 14)
OFFICIAL_DEPTH = 32
#: The official (global_thr, individual_thr) per LLaVA-1.5 budget (TextVQA scripts); the
#: VizWiz 64-token script uses (0.005, 0.001).
OFFICIAL_THRESHOLDS = {64: (0.011, 0.01), 128: (0.0012, 0.001), 192: (0.001, 0.001)}


@dataclass(frozen=True)
class MustDropConfig(LlmSchedule):
    """Options (official defaults: the 64-token setting of LLaVA-1.5-7B).

    In a model (``tokensieve.apply``) the text after each image rates it at each layer of
    ``layers`` (that layer's attention, head-mean, every text token after the image as a
    query row, as the official code takes all the sequence after the image); the tokens
    the thresholds keep go on from the next layer, with contiguous positions.

    Budget: the thresholds decide how many tokens stay (adaptive). ``keep=None``: the
    thresholds alone. ``keep`` (a count or a fraction of the image's tokens) bounds the
    average image tokens per LLM layer: every cut keeps at most ``c`` tokens, ``c`` chosen
    so that a run keeping ``c`` from the first cut on averages ``keep`` per layer (see
    :func:`tokensieve.methods._adaptive.uniform_cap`); a cut whose thresholds keep more
    keeps the ``c`` with the largest total received attention. ``keep=1.0`` is therefore
    the thresholds alone too; ``global_thr=0`` (or ``individual_thr=0``) drops nothing.

    Attributes:
        layers: decoder layers whose attention scores the image tokens; the cut is right
            after each (:meth:`cut_layers` gives ``layer + 1``). ``None``: the official
            (2, 6, 10, 14) of a 32-layer LLM, scaled to the depth at hand (cuts at 3/32,
            7/32, 11/32, 15/32 of the depth, at least layer 1; cuts landing on one layer
            merge).
        global_thr: g: a token is dropped only if its total received text attention is
            below ``g`` times the image's total (official 64-token setting 0.011; 128:
            0.0012; 192: 0.001; ``OFFICIAL_THRESHOLDS``).
        individual_thr: i: ... and the most attention any one text token gives it is below
            ``i`` (64: 0.01; 128 and 192: 0.001).
        protect: indices of the tokens a call gets that are never dropped (MustDrop's key
            set). As an option, function-level only (``ts.reduce``: ``apply`` refuses it,
            fixed indices cannot follow the tokens through the cuts); in a model the key
            set comes from ``mustdrop-merge``'s encoder stage, mapped onto each cut.
        positions: "renumber" (official: the kept sequence's position ids are contiguous)
            or "keep" (original position ids with gaps).

    Differences from the official code: the official prefill also prunes, once the prompt
    is done, the KV cache of every layer from the first pruning layer to the last to the
    final kept set (the scoring layers' own caches included) and decodes each layer at
    its cache length; here each layer's cache holds what that layer saw at prefill
    (the stage's convention). The official code runs batch 1; here rows of a batch keep
    their own counts. An image the thresholds would empty keeps its most-attended token
    (officially the key set, 8 % of the tokens, always survives).
    """

    scores: ClassVar[ScoreSource] = "previous"
    query: ClassVar[QueryRows] = "text"
    adaptive: ClassVar[bool] = True

    layers: tuple[int, ...] | None = None
    global_thr: Share = 0.011
    individual_thr: Share = 0.01
    protect: tuple[Count, ...] = ()
    positions: Literal["keep", "renumber"] = "renumber"

    def __post_init__(self) -> None:
        check_layer_list(self.layers, minimum=0)
        for name in ("global_thr", "individual_thr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name}={v!r}: expected a float in [0, 1]")
        if not isinstance(self.protect, (tuple, list)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.protect):
            raise ValueError(f"protect={self.protect!r}: expected a tuple of token indices >= 0")
        if self.positions not in ("keep", "renumber"):
            raise ValueError(f"positions={self.positions!r}: expected 'keep' or 'renumber'")

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        """Decoder layers before which image tokens are cut: each scoring layer + 1."""
        if self.protect:
            raise ValueError("protect: the in-LLM stage cannot follow a key set through its "
                             "cuts yet; use protect with tokensieve.reduce only")
        if self.layers is not None:
            if self.layers[-1] + 1 >= depth:
                raise ValueError(f"layers={tuple(self.layers)}: the LLM has {depth} decoder "
                                 f"layers and the cut is after each; expected layers in "
                                 f"[0, {depth - 1})")
            return tuple(layer + 1 for layer in self.layers)
        if depth < 2:
            raise ValueError(f"mustdrop: an LLM of {depth} decoder layer(s) has no layer to "
                             "cut before; expected at least 2")
        return scaled_layers(tuple((la + 1) / OFFICIAL_DEPTH for la in OFFICIAL_LAYERS), depth)

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        """The most image tokens each cut keeps (the thresholds may keep fewer): ``n``
        without ``keep``, else the cap of :func:`~tokensieve.methods._adaptive.uniform_cap`."""
        return uniform_cap(n, keep, self.cut_layers(depth), depth, "mustdrop")


def dual_attention_keep(query_attn: Tensor, global_thr: float, individual_thr: float) -> Tensor:
    """MustDrop's dual-attention filter: ``[B, N]`` True for the tokens it keeps.

    Args:
        query_attn: ``[B, R, N]`` head-mean attention probabilities that ``R`` text tokens
            give the image's ``N`` tokens (all-zero rows are padding), or ``[B, N]``.
        global_thr: g; individual_thr: i.

    A token is dropped iff ``sum_r a[r, j] < g * sum_{r, j'} a[r, j']`` and
    ``max_r a[r, j] < i`` (strict, as the official code); ties at a threshold stay.
    """
    attn = rater_rows(query_attn)
    total = attn.sum(dim=1)                                        # [B, N] global attention
    peak = attn.max(dim=1).values                                  # [B, N] individual
    drop = (total < total.sum(dim=1, keepdim=True) * global_thr) & (peak < individual_thr)
    return ~drop


@register(
    "mustdrop",
    paper="Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language "
          "Model (MustDrop, Liu et al., 2024), prefill stage",
    stage="llm", kind="subset", signals=("query_attn",), config=MustDropConfig,
)
def mustdrop(tokens: Tensor, k: int, signals: Signals, config: MustDropConfig,
             generator: torch.Generator | None) -> Reduction:
    """One MustDrop prefill cut: the tokens the dual-attention filter keeps, at most ``k``.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` one image's remaining tokens per row (hidden states at the cut).
        query_attn: ``[B, R, N]`` head-mean attention probabilities the text after the
            image gives its tokens at the scoring layer (all-zero rows are padding), or
            ``[B, N]`` (one row).
        k: the most tokens a row keeps; ``k = N`` (the in-LLM stage without ``keep``) is
            no cap, so unlike fixed-count methods a call with ``k = N`` may drop tokens.

    Steps: :func:`dual_attention_keep`; the ``protect`` indices are kept; a row keeping
    more than ``k`` keeps the protected tokens, then the rest by total received attention
    (descending, ties to the lower index); a row keeping none keeps its most-attended one.

    Returns:
        A subset :class:`Reduction` of the kept tokens in original order; ``mask``
        ``[B, K']`` when rows keep different counts.
    """
    attn = rater_rows(signals.require("query_attn", "mustdrop"))  # type: ignore[arg-type]
    b, n, _ = tokens.shape
    if attn.shape[0] != b or attn.shape[-1] != n:
        raise ValueError(f"query_attn: shape {tuple(attn.shape)} does not match the tokens "
                         f"[{b}, {n}, ...]; expected [B, N] or [B, R, N]")
    keep = dual_attention_keep(attn, config.global_thr, config.individual_thr)
    first = None
    if config.protect:
        if max(config.protect) >= n:
            raise ValueError(f"protect={tuple(config.protect)}: indices must be < {n} (the "
                             "number of tokens)")
        first = torch.zeros_like(keep)
        first[:, list(config.protect)] = True
        keep = keep | first
    return select_mask(tokens, capped(keep, attn.sum(dim=1), k, first))
