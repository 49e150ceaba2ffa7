"""MMTok: pick the visual tokens that best cover both the text and the image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokensieve.core.ops import normalize, select
from tokensieve.core.options import NonNegative, Positive
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._greedy import (
    greedy_coverage,
    greedy_coverage_batch,
    symmetric_gram,
    text_dim_check,
)


@dataclass(frozen=True)
class MMTokConfig:
    """Options with the official defaults.

    Attributes:
        alpha: weight of the vision-vision coverage term (0.5).
        tau_tv: softmax temperature of text -> vision similarities (0.02).
        tau_vv: softmax temperature of vision -> vision similarities (0.2).
    """

    alpha: NonNegative = 0.5
    tau_tv: Positive = 0.02
    tau_vv: Positive = 0.2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha={self.alpha!r}: expected a finite value >= 0")
        for name in ("tau_tv", "tau_vv"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r}: expected a finite temperature > 0")


def unit_scales(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, 1 / ||x||)``: float32 tokens ``[N, D]`` and the inverse norms ``[N]`` that make
    ``x_i . x_j * inv_i * inv_j`` their cosine, without a normalised copy of the tokens.
    Tokens whose norms leave ``[2^-40, 2^40]`` (where float32 dot products could overflow
    or lose the direction) are normalised first (:func:`~tokensieve.core.ops.normalize`)."""
    xf = tokens.float()
    norm = xf.norm(2, -1)
    lo, hi = torch.aminmax(norm)
    if not (float(hi) <= 2.0 ** 40 and float(lo) >= 2.0 ** -40):
        xf = normalize(tokens)
        norm = xf.norm(2, -1)
    return xf, 1.0 / norm.clamp_min(1e-12)


def coverage_matrix(tokens: Tensor, text: Tensor, text_mask: Tensor | None,
                    config: MMTokConfig, out: Tensor | None = None) -> Tensor:
    """MMTok's coverage matrix of one sample: ``[m + N, N]`` float32, ``C = [P; alpha Q]``.

    ``P = softmax_row(cos(text, x) / tau_tv) / m`` over the ``m`` real text tokens and
    ``Q = softmax_row(cos(x, x) / tau_vv) / N``, for ``tokens`` ``[N, D]``, ``text`` ``[M, D]``.
    ``out`` (``[m + N, N]`` contiguous float32) receives it if given.
    """
    xs, inv = unit_scales(tokens)
    zn = normalize(text if text_mask is None else text[text_mask])
    m, n = zn.shape[0], xs.shape[0]
    cover = torch.empty(m + n, n, device=xs.device) if out is None else out
    cover[:m] = torch.softmax((zn @ xs.T).mul_(inv).mul_(1.0 / config.tau_tv), dim=1) / m
    inv_tau = 1.0 / config.tau_vv

    def cosine_over_tau(blk: Tensor, rows: slice, cols: slice) -> Tensor:
        return blk.mul_(inv[rows, None]).mul_(inv[cols] * inv_tau)

    # the one N x N matrix of cosines, already divided by the temperature, softmaxed in
    # place (no N x N temporary: a fresh buffer of that size costs page faults every call)
    q = symmetric_gram(xs, out=cover[m:], exact=False, transform=cosine_over_tau)
    step = max(1, (1 << 19) // n)             # row chunks of ~2 MB stay in cache
    for s in range(0, n, step):
        chunk = q[s:s + step]
        torch.softmax(chunk, dim=1, out=chunk).mul_(config.alpha / n)
    return cover


#: The coverage matrices of a batch go through one greedy loop this many bytes at a time.
COVER_BATCH_BYTES = 1 << 26


@register(
    "mmtok",
    paper="MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs "
          "(Dong et al., 2025)",
    stage="pre-llm", kind="subset", signals=("text",), optional_signals=("text_mask",),
    config=MMTokConfig,
)
def mmtok(tokens: Tensor, k: int, signals: Signals, config: MMTokConfig,
          generator: torch.Generator | None) -> Reduction:
    """Greedy maximum coverage of text and vision -> ``k`` tokens per sample.

    Args (via ``reduce``):
        tokens: ``[B, N, D]`` visual tokens.
        text: ``[B, M, D]`` text token embeddings in the tokens' space (the official code
            uses the LLM's word embeddings of the question's keywords, i.e. the space of
            the projected visual tokens); ``text_mask`` ``[B, M]`` drops padding.

    Each step adds the token with the largest coverage gain over the rows of
    ``C = [P; alpha Q]`` (see :func:`coverage_matrix`); kept tokens in original order.

    ``xc``, the vision-vision features: the official code compares CLIP vision-tower
    features (before the projector) for ``Q`` and the projected tokens for ``P``. A method
    here sees one token set, so ``Q`` uses the given tokens too: identical to the official
    method when the tokens are the vision-tower features, a documented approximation when
    they are projected tokens (the projector is a per-token MLP, so similarities change
    but not which token is which). An empty ``text`` ``[B, 0, D]`` is refused (``reduce``
    raises ``ValueError``): the text rows of ``C`` need at least one text token.
    """
    text = signals.require("text", "mmtok")
    assert isinstance(text, Tensor)
    text_dim_check(tokens, text, "mmtok")
    mask = signals.text_mask
    b, n = tokens.shape[:2]
    if tokens.device.type == "cpu":
        # one sample at a time in one reused buffer: the greedy loop (NumPy on CPU, see
        # greedy_coverage) reads the matrix while it is still in cache
        buf = torch.empty(n + text.shape[1], n)
        picks = []
        for i in range(b):
            m = text.shape[1] if mask is None else int(mask[i].sum())
            cover = coverage_matrix(tokens[i], text[i], None if mask is None else mask[i],
                                    config, out=buf[: n + m])
            picks.append(greedy_coverage(cover, k))
        return select(tokens, torch.stack(picks))
    rows = n + (text.shape[1] if mask is None else int(mask.sum(dim=1).max()))
    # elsewhere samples whose coverage matrices share a shape run one batched greedy loop
    # (fewer kernel launches), up to COVER_BATCH_BYTES of matrices at a time
    step = max(1, COVER_BATCH_BYTES // max(1, 4 * rows * n))
    picks = []
    for s in range(0, b, step):
        e = min(b, s + step)
        if mask is None or bool(mask[s:e].sum(dim=1).eq(rows - n).all()):
            covers = torch.empty(e - s, rows, n, device=tokens.device)
            for i in range(s, e):
                coverage_matrix(tokens[i], text[i], None if mask is None else mask[i], config,
                                out=covers[i - s])
            picks.append(greedy_coverage_batch(covers, k))
        else:                                 # text lengths differ: one sample at a time
            picks.append(torch.stack([
                greedy_coverage(coverage_matrix(tokens[i], text[i], mask[i], config), k)
                for i in range(s, e)]))
    return select(tokens, torch.cat(picks))
