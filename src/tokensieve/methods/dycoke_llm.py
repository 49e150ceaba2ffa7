"""DyCoke, stage 2: dynamic pruning of the visual KV cache while decoding.

"DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (Tao et al.,
CVPR 2025). Official code: github.com/KD-TAO/DyCoke (``PrunableDynamicCache`` in
``llava/model/language_model/modeling_qwen2.py``; ``dycoke_l=3, dycoke_p=0.7`` in the
README's evaluation command). At every decoding step (one new token):

1. the layers before ``L`` attend to the whole cache;
2. the new token's attention at layer ``L - 1`` (head mean, over the whole cache) is read
   over the video's tokens, and compared (cosine similarity) with the same row of the
   previous step (the first step compares with nothing: similarity 0);
3. when the similarity is below 0.9, the layers from ``L`` on attend, in this step, only
   to the ``int(N (1 - P))`` video tokens with the largest attention (and to every text
   token); otherwise they attend to the whole cache (official: the selection is reset at
   every step and only made again when the attention moved).

The cache itself keeps every token (the official code gathers the selected columns from
the full cache for the later layers; here the later layers' attention mask hides the
others: the same outputs). In a model, ``ts.apply(model, "dycoke")`` runs this stage after
DyCoke's temporal token merging by default; ``ts.apply(model, "dycoke-llm")`` runs it
alone. Every visual run of a prompt (each video, and each image) is pruned on its own
with its own previous row; the official code has one video per prompt and batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep
from tokensieve.core.options import Range
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.schedule import LlmSchedule, check_layer, single_cut
from tokensieve.core.signals import Signals
from tokensieve.methods._adaptive import rater_rows

#: The official decoding layer of the 28-layer LLaVA-OneVision-7B LLM (``dycoke_l``).
OFFICIAL_LAYER = 3
OFFICIAL_DEPTH = 28
#: The official share of a video's tokens hidden at a pruning step (``dycoke_p``).
OFFICIAL_RATIO = 0.7
#: A step prunes when its attention row's cosine similarity to the previous one is below.
OFFICIAL_SIMILARITY = 0.9


@dataclass(frozen=True)
class DyCokeLlmConfig(LlmSchedule):
    """Options (official defaults: ``dycoke_l=3``, ``dycoke_p=0.7``, similarity 0.9).

    Attributes:
        layer: L, the first decoder layer that sees only the selected video tokens; the
            attention of layer ``L - 1`` selects them. ``None``: 3 of a 28-layer LLM,
            scaled to the depth (at least 1).
        ratio: P, the share of a visual run's tokens hidden at a pruning step
            (``int(N (1 - P))`` stay visible); ``keep`` (a count or a fraction of the run)
            replaces it.
        similarity: a step prunes when the cosine similarity of its attention row over
            the run to the previous step's is below this (official 0.9; 1.01: every step).
    """

    decode: ClassVar[bool] = True

    layer: int | None = None
    ratio: Annotated[float, Range(0.0, 1.0)] = OFFICIAL_RATIO
    similarity: Annotated[float, Range(-1.0, 2.0)] = OFFICIAL_SIMILARITY

    def __post_init__(self) -> None:
        if self.layer is not None:
            check_layer("layer", self.layer, minimum=1)

    def decode_layer(self, depth: int) -> int:
        """L in a ``depth``-layer LLM."""
        return single_cut(self.layer, depth, OFFICIAL_LAYER / OFFICIAL_DEPTH)[0]

    def visible(self, n: int, keep: int | float | None) -> int:
        """Video tokens a pruning step leaves visible of a run of ``n``."""
        if keep is None:
            return int(n * (1 - self.ratio))
        return resolve_keep(keep, n)

    # No prefill cut: the prompt runs whole.
    def cut_layers(self, depth: int) -> tuple[int, ...]:
        return ()

    def counts(self, n: int, keep: int | float | None, depth: int) -> list[int]:
        return []


def top_attended(attn: Tensor, k: int) -> Tensor:
    """``[B, k]`` ascending indices of the ``k`` largest entries of ``attn`` ``[B, N]`` (ties:
    the lower index)."""
    order = torch.sort(attn.float(), dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


@register(
    "dycoke-llm",
    paper="DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models "
          "(Tao et al., CVPR 2025), stage 2 (dynamic KV pruning while decoding)",
    stage="llm", kind="subset", signals=("query_attn",), config=DyCokeLlmConfig,
)
def dycoke_llm(tokens: Tensor, k: int, signals: Signals, config: DyCokeLlmConfig,
               generator: torch.Generator | None) -> Reduction:
    """One pruning step's selection: the ``k`` tokens with the largest attention.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` a visual run's tokens (in a model: its cached columns).
        query_attn: ``[B, N]`` the new token's head-mean attention at layer ``L - 1`` over
            them (``[B, 1, N]`` accepted).

    Returns:
        A subset :class:`Reduction` of the ``k`` most attended tokens, in original order
        (ties: the lower index). The similarity test that decides whether a step prunes
        at all needs the previous step, so it lives in the decoding stage
        (:class:`tokensieve.models._decode.DecodeStage`).
    """
    attn = rater_rows(signals.require("query_attn", "dycoke-llm")).sum(dim=1)  # [B, N]
    b, n, _ = tokens.shape
    if attn.shape != (b, n):
        raise ValueError(f"query_attn: shape {tuple(attn.shape)} does not match the tokens "
                         f"[{b}, {n}, ...]; expected [B, N] or [B, 1, N]")
    idx = top_attended(attn, k)
    return Reduction(tokens=torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1,
                                                                              tokens.shape[2])),
                     indices=idx)
