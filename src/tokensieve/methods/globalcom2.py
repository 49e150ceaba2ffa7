"""GlobalCom2: the thumbnail's CLS scores steer how much of every anyres crop is kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokensieve.core.grid import topk_per_partition_mask
from tokensieve.core.ops import normalize, select, select_mask
from tokensieve.core.options import Positive
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Partitions, Signals
from tokensieve.methods._anyres import (
    crop_regions,
    fill_to_total,
    partition_positions,
    scatter_partition_scores,
)


@dataclass(frozen=True)
class GlobalCom2Config:
    """GlobalCom2 options.

    Attributes:
        temperature: softmax temperature over the crops' thumbnail scores (official 10).
        exact_budget: ``False`` (official): the thumbnail keeps ``int(H*W * r)`` and crop
            ``i`` keeps ``int(H*W * scale_i)`` tokens, as the official code floors them,
            so up to one token per partition is lost (fewer than ``keep`` may come out;
            a batch whose samples differ is padded, see ``Reduction.mask``). ``True``:
            the floors are completed to exactly ``keep`` (largest remainder first).
    """

    temperature: Positive = 10.0
    exact_budget: bool = False


def globalcom2_budgets(scores: Tensor, pos: Tensor, partitions: Partitions, k: int,
                       temperature: float, exact_budget: bool = False
                       ) -> tuple[Tensor, Tensor]:
    """Per-partition budgets ``[B, P+1]`` (column 0: thumbnail) and crop scales ``[B, P]``.

    With ``T = k - #always-kept`` and ``r = T / #other tokens`` (the retention ratio):
    the thumbnail's target is ``H*W * r``; crop ``i``'s is ``H*W * scale_i`` with
    ``scale_i = min(r (1 + s_i - mean(s)), 1)``, ``s = softmax(S / temperature)`` and
    ``S_i`` the sum of the thumbnail scores over crop ``i``'s 2D region.

    ``exact_budget=False`` (official): every target is floored (``int(N * scale)``) and the
    softmax is the official one, ``exp(S - max S) / (sum exp + 1e-8)`` in float64.
    ``exact_budget=True``: the floors are completed to exactly ``T`` by
    :func:`fill_to_total` (largest fractional part first, capacity ``H*W`` per partition;
    clipped scales leave tokens that go to partitions with room).
    """
    b, n_parts, per = pos.shape
    n_crops = n_parts - 1
    always = partitions.ids < 0
    n_always = always.sum(dim=1)
    if bool((n_always > k).any()):
        raise ValueError(f"globalcom2: keep={k} is smaller than the {int(n_always.max())} "
                         "always-kept tokens (e.g. image newlines) of the anyres layout")
    total = k - n_always
    ratio = total.double() / (n_parts * per)
    thumb = torch.gather(scores, 1, pos[:, 0]).double()  # [B, H*W]
    region = crop_regions(partitions.grid, partitions.tiling, "2d", scores.device)
    region_sum = thumb @ F.one_hot(region, n_crops).double()  # [B, P], deterministic
    if exact_budget:
        soft = torch.softmax(region_sum / temperature, dim=1)
    else:
        shifted = torch.exp((region_sum - region_sum.amax(dim=1, keepdim=True)) / temperature)
        soft = shifted / (shifted.sum(dim=1, keepdim=True) + 1e-8)
    scale = (ratio.unsqueeze(1) * (1 + soft - soft.mean(dim=1, keepdim=True))).clamp(max=1.0)
    target = torch.cat([(ratio * per).unsqueeze(1), scale * per], dim=1)
    if not exact_budget:
        return target.floor().long(), scale
    cap = torch.full_like(target, per, dtype=torch.long)
    return fill_to_total(target, cap, total), scale


def crop_scores(scores: Tensor, pos: Tensor, partitions: Partitions) -> Tensor:
    """Scores ``[B, P+1, H*W]``: the thumbnail's own scores, and for every crop the
    L2-normalised local scores plus the L2-normalised thumbnail scores bilinearly
    resized (``align_corners=False``) to the whole tiled image and cut to the crop."""
    b, n_parts, per = pos.shape
    (h, w), (rows, cols) = partitions.grid, partitions.tiling
    part = torch.gather(scores.float(), 1, pos.reshape(b, -1)).reshape(b, n_parts, per)
    thumb = part[:, 0].reshape(b, 1, h, w)
    big = F.interpolate(thumb, size=(rows * h, cols * w), mode="bilinear", align_corners=False)
    # [B, rows*h, cols*w] -> [B, rows*cols, h*w] in the crops' raster order.
    resized = big.reshape(b, rows, h, cols, w).permute(0, 1, 3, 2, 4).reshape(b, rows * cols,
                                                                              h * w)
    combined = normalize(part[:, 1:]) + normalize(resized)
    return torch.cat([part[:, :1], combined], dim=1)


@register(
    "globalcom2",
    paper="Compression with Global Guidance: Towards Training-free High-Resolution MLLMs "
          "Acceleration (GlobalCom2, Liu et al., 2025)",
    stage="pre-llm", kind="subset", signals=("partitions", "cls_attn"),
    config=GlobalCom2Config, features="vision",
)
def globalcom2(tokens: Tensor, k: int, signals: Signals, config: GlobalCom2Config,
               generator: torch.Generator | None) -> Reduction:
    """GlobalCom2 on an anyres (LLaVA-NeXT) token set ``tokens`` ``[B, N, D]``.

    ``cls_attn``: ``[B, N]`` CLS score of every token within its own partition's encoder
    pass (with ``[B, L, N]`` the last layer). The official scores are the last layer's
    pre-softmax, head-mean CLS logits; post-softmax attention works too but, being small
    numbers, makes ``softmax(S / temperature)`` nearly uniform (every crop gets about
    ``r``). The thumbnail keeps its top tokens by its own scores; each crop keeps its
    top tokens by :func:`crop_scores`; budgets from :func:`globalcom2_budgets`.
    Always-kept tokens are kept and count towards ``keep``.

    Count: by default (official floors) at most ``keep`` tokens, up to one fewer per
    partition; samples with different counts are padded (``mask``).
    ``exact_budget=True``: exactly ``keep``. ``keep = N`` keeps every token (the contract of
    every subset method; the official scales would still drop tokens of crops below the
    mean).
    """
    if not config.temperature > 0:
        raise ValueError(f"globalcom2: temperature={config.temperature!r}; expected > 0")
    partitions = signals.require("partitions", "globalcom2")
    assert isinstance(partitions, Partitions)
    scores = signals.layer("cls_attn", "globalcom2").float()
    pos = partition_positions(partitions, "globalcom2")
    if k >= tokens.shape[1]:
        return select(tokens, torch.arange(k, device=tokens.device).expand(tokens.shape[0], -1))
    budget, _ = globalcom2_budgets(scores, pos, partitions, k, config.temperature,
                                   config.exact_budget)
    per_token = scatter_partition_scores(crop_scores(scores, pos, partitions), pos,
                                         tokens.shape[1])
    always = partitions.ids < 0
    return select_mask(tokens, topk_per_partition_mask(per_token, budget, partitions, always))
