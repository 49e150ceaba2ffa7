"""Dominant + contextual tokens (VisionZip's scheme, shared by VisionZip and VisionDrop).

Dominant tokens are the top-scoring tokens (plus the CLS token when the token set has
one), kept unchanged. The remaining tokens are grouped around ``C`` targets spread
evenly over them; every non-target token joins its most similar target (cosine of the
L2-normalised keys) and each group becomes one contextual token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokensieve.core.ops import gather_tokens, normalize, topk_indices
from tokensieve.core.reduction import Reduction

CONTEXTUAL_MERGES = ("target+mean", "mean")


def split_budget(k: int, ratio: float, dominant: int | None, contextual: int | None,
                 method: str) -> tuple[int, int]:
    """The ``(D, C)`` split of a budget ``k``.

    Both given: they must add up to ``k``. One given: the other is the rest of ``k``.
    Neither: ``C = round(k * ratio)`` contextual tokens and ``D = k - C`` dominant ones
    (``ratio`` is the method's default contextual share, e.g. 10/64 for VisionZip).
    """
    for name, value in (("dominant", dominant), ("contextual", contextual)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValueError(f"{method}: {name}={value!r}; expected a non-negative int or None")
    if dominant is not None and contextual is not None:
        if dominant + contextual != k:
            raise ValueError(f"{method}: dominant={dominant} + contextual={contextual} != "
                             f"keep={k}; the two parts must add up to the budget")
        d, c = dominant, contextual
    elif dominant is not None:
        d, c = dominant, k - dominant
    elif contextual is not None:
        d, c = k - contextual, contextual
    else:
        c = int(round(k * ratio))
        d = k - c
    if d < 1 or c < 0:
        raise ValueError(f"{method}: keep={k} split into dominant={d}, contextual={c}; "
                         "expected dominant >= 1 and contextual >= 0")
    return d, c


def dominant_contextual(
    tokens: Tensor,
    scores: Tensor,
    keys: Tensor,
    dominant: int,
    contextual: int,
    *,
    has_cls: bool,
    merge: str,
    method: str,
) -> Reduction:
    """Keep ``dominant`` tokens by ``scores`` and merge the rest into ``contextual`` tokens.

    Args:
        tokens: ``[B, N, D]`` (``tokens[:, 0]`` is CLS when ``has_cls``).
        scores: ``[B, N]`` importance of each token (the CLS entry is ignored).
        keys: ``[B, N, Dk]`` the similarity metric of the contextual step (head-mean keys).
        dominant: ``D``, dominant tokens including CLS when ``has_cls``.
        contextual: ``C``, contextual tokens (``C <= N - D``).
        has_cls: whether ``tokens[:, 0]`` is a CLS token (always dominant, output first).
        merge: "target+mean" (official: target + mean of the tokens assigned to it) or
            "mean" (corrected: mean of the target and its assigned tokens).
        method: name used in error messages.

    Returns:
        A :class:`Reduction` with tokens ``[B, D + C, D]`` (dominant in raster order, then
        contextual in target order), ``indices`` ``[B, D]`` (dominant, ascending),
        ``positions`` ``[B, D + C]`` (dominant indices, then target indices), ``sizes``
        (1 per dominant token, 1 + assigned count per contextual token) and
        ``assignment`` ``[B, N]`` (the output slot of every source token).
    """
    if merge not in CONTEXTUAL_MERGES:
        raise ValueError(f"{method}: contextual_merge={merge!r}; expected one of "
                         f"{CONTEXTUAL_MERGES}")
    b, n, _ = tokens.shape
    dev = tokens.device
    rank_scores = scores.float()
    if has_cls:
        # CLS always ranks first; its own entry (self attention) is ignored.
        rank_scores = rank_scores.clone()
        rank_scores[:, 0] = float("inf")
    dom = topk_indices(rank_scores, dominant)  # [B, D] ascending; CLS (0) first if present
    is_dom = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, dom, True)
    n_rem = n - dominant
    slot = torch.full((b, n), -1, dtype=torch.long, device=dev)
    slot.scatter_(1, dom, torch.arange(dominant, device=dev).expand(b, -1))
    out_tokens = gather_tokens(tokens, dom)
    positions = dom
    sizes = torch.ones(b, dominant, dtype=torch.long, device=dev)
    if contextual > 0:
        # Remaining tokens in raster order: stable sort puts non-dominant tokens first.
        rem = torch.sort(is_dom.long(), dim=1, stable=True).indices[:, :n_rem]  # [B, N_rem]
        step = max(1, n_rem // contextual)
        tgt_local = torch.arange(0, n_rem, step, device=dev)[:contextual]  # [C]
        is_tgt = torch.zeros(n_rem, dtype=torch.bool, device=dev)
        is_tgt[tgt_local] = True
        other_local = torch.nonzero(~is_tgt).squeeze(1)  # [N_rem - C]
        tgt = rem[:, tgt_local]  # [B, C] source positions of the targets
        other = rem[:, other_local]  # [B, N_rem - C]
        metric = normalize(keys)
        sim = gather_tokens(metric, other) @ gather_tokens(metric, tgt).transpose(1, 2)
        choice = sim.argmax(dim=2)  # [B, N_rem - C] target of each merged token
        # One-hot matmul rather than scatter_add: deterministic on every device.
        onehot = F.one_hot(choice, contextual).float()  # [B, N_rem - C, C]
        acc = onehot.transpose(1, 2) @ gather_tokens(tokens, other).float()  # [B, C, D]
        count = onehot.sum(dim=1)  # [B, C]
        target = gather_tokens(tokens, tgt).float()
        if merge == "target+mean":
            ctx = target + acc / count.clamp(min=1.0).unsqueeze(-1)
        else:
            ctx = (target + acc) / (1.0 + count).unsqueeze(-1)
        out_tokens = torch.cat([out_tokens, ctx.to(tokens.dtype)], dim=1)
        positions = torch.cat([dom, tgt], dim=1)
        sizes = torch.cat([sizes, 1 + count.long()], dim=1)
        slot.scatter_(1, tgt, dominant + torch.arange(contextual, device=dev).expand(b, -1))
        slot.scatter_(1, other, dominant + choice)
    return Reduction(tokens=out_tokens, indices=dom, positions=positions, sizes=sizes,
                     assignment=slot)
