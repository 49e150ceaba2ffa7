"""HoliTom, inner-LLM merge: at layer K keep the visual tokens the last prompt token attends
to most, and merge every other visual token into its most similar kept one.

Follows the official code (github.com/cokeshao/HoliTom, ``Qwen2Model_holitom.forward`` in
``holitom/modeling_qwen2.py``, with ``HOLITOM_k=18 HOLITOM_r=0.5`` as every evaluation script
in ``scripts/`` sets them), read for its computations, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from tokensieve.core.ops import cosine_similarity, gather_tokens, topk_indices
from tokensieve.core.options import Range
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import (
    LlmSchedule,
    check_layer,
    check_positions,
    single_cut,
    single_cut_count,
)
from tokensieve.core.signals import Signals

#: The official layer: ``HOLITOM_k=18`` of the 28 decoder layers of Qwen2-7B (LLaVA-OneVision
#: 7B, LLaVA-Video 7B): layer 18 is the first to see the merged tokens, ranked by layer 17's
#: attention.
OFFICIAL_LAYER, OFFICIAL_DEPTH = 18, 28
#: The official ratio removed, ``HOLITOM_r=0.5``.
OFFICIAL_RATIO = 0.5


@dataclass(frozen=True)
class HoliTomLlmConfig(LlmSchedule):
    """Options of HoliTom's inner-LLM merge (official defaults of ``scripts/eval_*.sh``).

    Attributes:
        layer: K, the first decoder layer that sees only the kept (merged) visual tokens;
            the scores are the attention of layer K-1 (``output_attentions`` at
            ``HOLITOM_k - 1``, as the official code reads it). ``None``: the official
            ``HOLITOM_k=18`` of a 28-layer LLM, scaled to the depth of the model at hand
            (``round(depth * 18 / 28)``).
        ratio: R, the share of a visual run's tokens removed when no ``keep`` is given
            (``HOLITOM_r=0.5``; ``round(N (1 - R))`` stay, Python rounding as the official
            code).
        merge: "sequential" (official: each dropped token, in position order, replaces its
            target by ``(target + token) / 2``, so the last merged token weighs half and the
            kept token itself ``2^-m`` after ``m`` merges) or "mean" (corrected: the target
            becomes the mean of itself and the tokens merged into it).
        positions: "keep" (official: kept tokens keep their position ids, with gaps) or
            "renumber" (contiguous positions after the cut; M-RoPE models always keep).
    """

    layer: int | None = None
    ratio: Annotated[float, Range(0.0, 1.0, hi_open=True)] = OFFICIAL_RATIO
    merge: Literal["sequential", "mean"] = "sequential"
    positions: str = "keep"

    def __post_init__(self) -> None:
        if self.layer is not None:
            check_layer("layer", self.layer, minimum=1)
        check_positions(self.positions)

    def cut_layers(self, depth: int) -> tuple[int, ...]:
        return single_cut(self.layer, depth, OFFICIAL_LAYER / OFFICIAL_DEPTH)

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        return [single_cut_count(n, keep, self.ratio)]


def merge_into_kept(tokens: Tensor, kept: Tensor, merge: str) -> tuple[Tensor, Tensor]:
    """Merge every token of ``tokens`` ``[B, N, D]`` not in ``kept`` ``[B, K]`` (ascending)
    into the kept token of highest cosine similarity (on the unmerged tokens).

    Returns:
        ``[B, K, D]`` float32 merged kept tokens and ``[B, K]`` the source tokens each
        stands for (itself plus those merged into it).

    ``merge="sequential"`` is the official in-place loop over the dropped tokens in
    ascending position, ``h_t <- (h_t + x_i) / 2``: after merging ``x_1 .. x_m`` (in that
    order) ``h_t = 2^-m t + sum_j 2^-(m - j + 1) x_j``, computed here in closed form.
    """
    b, n, _ = tokens.shape
    k = kept.shape[1]
    x = tokens.float()
    dropped = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    dropped.scatter_(1, kept, False)
    base = gather_tokens(x, kept)  # [B, K, D]
    if k == n:
        return base, torch.ones(b, k, dtype=torch.long, device=tokens.device)
    drop_idx = torch.nonzero(dropped)[:, 1].view(b, n - k)  # ascending per row
    others = gather_tokens(x, drop_idx)  # [B, M, D]
    target = cosine_similarity(others, base).argmax(dim=-1)  # [B, M]
    onehot = torch.nn.functional.one_hot(target, k).to(x.dtype)  # [B, M, K]
    assigned = onehot.sum(dim=1)  # [B, K]
    if merge == "mean":
        merged = (base + onehot.transpose(1, 2) @ others) / (assigned + 1).unsqueeze(-1)
    elif merge == "sequential":
        # c_i: dropped tokens at or after i with i's target; x_i weighs 2^-c_i, the kept
        # token 2^-m (m: all tokens merged into it).
        later = onehot.flip(1).cumsum(dim=1).flip(1)  # [B, M, K]
        c = torch.gather(later, 2, target.unsqueeze(-1)).squeeze(-1)  # [B, M]
        weights = onehot * torch.pow(0.5, c).unsqueeze(-1)  # [B, M, K]
        merged = torch.pow(0.5, assigned).unsqueeze(-1) * base + weights.transpose(1, 2) @ others
    else:
        raise ValueError(f"merge={merge!r}: expected 'sequential' or 'mean'")
    return merged, assigned.long() + 1


@register(
    "holitom-llm",
    paper="HoliTom: Holistic Token Merging for Fast Video Large Language Models "
          "(Shao et al., NeurIPS 2025), inner-LLM merge",
    stage="llm", kind="subset+merge", signals=("query_attn",), config=HoliTomLlmConfig,
)
def holitom_llm(tokens: Tensor, k: int, signals: Signals, config: HoliTomLlmConfig,
                generator: torch.Generator | None) -> Reduction:
    """The top-``k`` visual tokens by the last prompt token's attention, each dropped token
    merged into its most similar kept token (cosine of the hidden states at the cut).

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` one visual run's tokens per row (their hidden states at the
            input of layer K, as the official code merges them).
        query_attn: ``[B, N]`` head-mean attention probability from the last prompt token
            at layer K-1 (over the whole sequence; the run's columns).

    Returns:
        ``[B, k, D]`` the kept tokens in original order with the dropped ones merged in;
        ``indices`` / ``positions`` their source positions, ``sizes`` the tokens each
        stands for. ``k = N`` keeps the run unchanged.

    Differences from the official code: the official code acts on the first image (the
    whole video block) of sample 0's sequence only and batches share its columns; here
    every visual run of every row is merged on its own. Ties in the attention ranking keep
    the lower index (the official ``topk`` leaves them to the backend).
    """
    scores = signals.layer("query_attn", "holitom-llm")
    if scores.dim() != 2:
        raise ValueError(f"query_attn: holitom-llm uses one query row ([B, N]); got shape "
                         f"{tuple(scores.shape)}")
    b, n, _ = tokens.shape
    kept = topk_indices(scores, k)
    if k >= n:
        return Reduction(tokens=tokens, indices=kept)
    merged, sizes = merge_into_kept(tokens, kept, config.merge)
    return Reduction(tokens=merged.to(tokens.dtype), indices=kept, positions=kept, sizes=sizes)
