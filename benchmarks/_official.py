"""Re-statements of the official implementations of the token-set methods, for timing.

Each function restates, in plain PyTorch, the algorithm of a method's official code as that
code runs it (its data flow, its loop structure, its per-step work), on the same inputs that
``tokensieve.reduce`` gets, so that ``bench_methods.py`` can time both in one process. They
are written from the algorithms (see ``/work/shared/methods.md`` and the papers), not copied.
They return the selected indices (ascending) or the output tokens, so the benchmark can check
that both sides agree.

* DivPrune (vbdi/divprune): the full ``N x N`` cosine-distance matrix, then per step the min
  over the rows of all earlier picks (``O(N k^2)`` in all); the first pick is the column whose
  second smallest entry (the nearest other token) is largest.
* CDPruner (Theia-4869/CDPruner): full kernel ``L = diag(r) S diag(r)`` and the fast greedy
  DPP MAP, each step subtracting the projections on *all* earlier Cholesky rows.
* MMTok (Ironieser/MMTok): the ``(m + N) x N`` coverage matrix, each step recomputing every
  gain from scratch (``sum_rows max(C - best, 0)``).
* VisionZip (dvlab-research/VisionZip): top-k of the CLS attention, masks, then a one-hot
  assignment of the remaining tokens to evenly spaced targets and a batched matmul.
* FasterVLM: top-k of the CLS attention, sorted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    """Rows of ``x`` divided by their L2 norm (float32), as the official codes do."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


def divprune(tokens: Tensor, k: int) -> Tensor:
    """DivPrune's loop on ``tokens`` ``[B, N, D]`` (one sample at a time) -> ``[B, k]``."""
    out = []
    for x in tokens:
        xn = _unit(x)
        dist = 1.0 - xn @ xn.T
        picks = torch.empty(k, dtype=torch.long)
        for i in range(k):
            if i == 0:
                score = torch.topk(dist, 2, dim=0, largest=False).values[1]
            else:
                score = torch.index_select(dist, 0, picks[:i]).min(dim=0).values
            picks[i] = torch.argmax(score)
        out.append(picks.sort().values)
    return torch.stack(out)


def cdpruner(tokens: Tensor, k: int, text: Tensor) -> Tensor:
    """CDPruner's relevance, kernel and batched fast greedy DPP MAP -> ``[B, k]``."""
    xn = _unit(tokens)                                                  # [B, N, D]
    sim = xn @ xn.transpose(1, 2)                                       # [B, N, N]
    rel = (-(xn @ _unit(text).transpose(1, 2))).mean(dim=-1)            # [B, N]
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    kernel = rel.unsqueeze(2) * sim * rel.unsqueeze(1)
    b, n = rel.shape
    rows = torch.arange(b)
    cis = torch.zeros(k, b, n)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picks = torch.empty(k, b, dtype=torch.long)
    for i in range(k):
        j = torch.argmax(di2s, dim=-1)
        picks[i] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) \
            / torch.sqrt(di2s[rows, j]).unsqueeze(-1)
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[rows, j] = -float("inf")
    return picks.T.sort(dim=1).values


def mmtok(tokens: Tensor, k: int, text: Tensor, alpha: float = 0.5, tau_tv: float = 0.02,
          tau_vv: float = 0.2) -> Tensor:
    """MMTok's coverage matrix and greedy loop with gains recomputed every step -> ``[B, k]``."""
    out = []
    for x, z in zip(tokens, text, strict=True):
        xn, zn = _unit(x), _unit(z)
        m, n = zn.shape[0], xn.shape[0]
        tv = torch.softmax(zn @ xn.T / tau_tv, dim=1) / m
        vv = torch.softmax(xn @ xn.T / tau_vv, dim=1) / n
        cover = torch.cat([tv, vv * alpha], dim=0)
        best = torch.zeros(m + n)
        mask = torch.zeros(n)
        picks = torch.empty(k, dtype=torch.long)
        for i in range(k):
            gain = (cover - best.unsqueeze(1)).clamp_min_(0).sum(dim=0)
            gain.add_(mask)
            j = torch.argmax(gain)
            picks[i] = j
            torch.maximum(best, cover[:, j], out=best)
            mask[j] = -float("inf")
        out.append(picks.sort().values)
    return torch.stack(out)


def visionzip(tokens: Tensor, k: int, cls_attn: Tensor, keys: Tensor) -> Tensor:
    """VisionZip's dominant + contextual tokens (no CLS in the token set) -> ``[B, k, D]``.

    Uses tokensieve's default split (``C = round(k * 10 / 64)``) and the head-mean CLS
    attention and keys that ``reduce`` gets (the official code sums the attention over
    heads: the same order)."""
    c = int(round(k * 10 / 64))
    d = k - c
    b, n, width = tokens.shape
    scores = cls_attn if cls_attn.dim() == 2 else cls_attn[:, -1]
    top = scores.topk(d, dim=1).indices
    keep = torch.ones(b, n, dtype=torch.bool).scatter_(1, top, False)
    dominant = tokens.masked_select(~keep.unsqueeze(-1)).view(b, d, width)
    if c == 0:
        return dominant
    rest_keys = keys[keep].view(b, n - d, keys.shape[-1])
    rest = tokens.masked_select(keep.unsqueeze(-1)).view(b, n - d, width)
    metric = rest_keys / rest_keys.norm(dim=-1, keepdim=True)
    step = max(1, metric.shape[1] // c)
    targets = torch.arange(0, metric.shape[1], step)[:c]
    others = ~torch.isin(torch.arange(metric.shape[1]), targets)
    sim = torch.bmm(metric[:, others], metric[:, targets].transpose(1, 2))
    onehot = torch.zeros(b, int(others.sum()), c).scatter_(2, sim.argmax(dim=2, keepdim=True), 1)
    counts = onehot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    merged = torch.bmm(onehot.transpose(1, 2), rest[:, others]) / counts
    return torch.cat([dominant, rest[:, targets] + merged], dim=1)


def fastervlm(tokens: Tensor, k: int, cls_attn: Tensor) -> Tensor:
    """FasterVLM: top-k of the CLS attention, kept in raster order, and the kept tokens
    gathered (as the official code indexes the image features) -> ``[B, k]`` indices."""
    scores = cls_attn if cls_attn.dim() == 2 else cls_attn[:, -1]
    idx = scores.topk(k, dim=1).indices.sort(dim=1).values
    torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return idx


def similarity_matmul(tokens: Tensor) -> Tensor:
    """The similarity matmul a greedy selection cannot avoid: L2-normalise and ``X X^T``
    (``[B, N, N]``, float32), the reference cost for the greedy methods."""
    xn = _unit(tokens)
    return xn @ xn.transpose(1, 2)


#: method -> (official re-statement taking ``(tokens, k, signals)``, whether the method is a
#: greedy selection on a similarity matrix).
OFFICIAL: dict[str, tuple[Callable[[Tensor, int, dict[str, Any]], Tensor], bool]] = {
    "divprune": (lambda x, k, s: divprune(x, k), True),
    "todre": (lambda x, k, s: divprune(x, k), True),
    "cdpruner": (lambda x, k, s: cdpruner(x, k, s["text"]), True),
    "mmtok": (lambda x, k, s: mmtok(x, k, s["text"]), True),
    "visionzip": (lambda x, k, s: visionzip(x, k, s["cls_attn"], s["keys"]), False),
    "fastervlm": (lambda x, k, s: fastervlm(x, k, s["cls_attn"]), False),
}
