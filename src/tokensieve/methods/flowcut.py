"""FlowCut: prune by information flow inside the vision tower (Tong et al., NeurIPS 2025).

"FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models"
(Tong et al., NeurIPS 2025; official code ``TungChintao/FlowCut``). After the MLP of each
CLIP layer (LLaVA-1.5's tower) a patch token's score is

    s_j = (a_j / sum_i a_i + e_j / sum_i e_i) * ||v_j||_1

with ``a`` the head-mean CLS attention row of the layer, ``e`` the head-mean softmax over
the tokens of ``v_cls . v_j`` (each head's value of the CLS token against the others',
unscaled) and ``v_j`` the head-mean value of token ``j``. The scores accumulate across
layers (``S <- 0.5 S + 0.5 s``). With ``rpl = L - i - 1`` layers left before the feature
layer ``L`` (``len(layers) - 2``), every layer with even ``rpl`` prunes

    r = round((N - target) / sqrt(rpl) * (1 - H^2))

tokens (``H``: the entropy of the CLS attention over the ``N`` patches over ``log N``; at
``rpl = 0`` down to ``target``), keeping the patches of largest accumulated score in their
original order, never fewer than ``target``. The feature layer then runs on CLS +
``target`` patches.

Two uses: ``flowcut`` on a token set (``ts.reduce``: one cut to ``keep`` tokens by ``s``)
and inside a vision encoder (``ts.apply(llava, "flowcut", target_num=64)``,
:class:`FlowCutSchedule`). The official code takes the largest ``r`` of its batch; here each
image prunes its own count (the batch is padded, as ATS's; at batch size 1, the official
evaluation, both agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokensieve.core.encoder_schedule import EncoderSchedule, LayerStep, register_encoder_schedule
from tokensieve.core.ops import select
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import register
from tokensieve.core.signals import Signals
from tokensieve.methods._matching import check_cls_budget
from tokensieve.methods.ats import padded_subset_step


@dataclass(frozen=True)
class FlowCutConfig:
    """Options of ``flowcut`` on a token set (``tokens[:, 0]`` is the CLS token: kept, its
    attention row and value score the others).

    Attributes:
        heads: attention heads the ``values`` ``[B, N, H*Dh]`` are split into for the
            semantic attention (the official code: the tower's heads); 1: one head.
    """

    heads: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1:
            raise ValueError(f"flowcut: heads={self.heads!r}: expected an int >= 1")


def flowcut_scores(cls_attn: Tensor, head_values: Tensor, valid: Tensor | None = None
                   ) -> Tensor:
    """FlowCut's per-layer score of the patch tokens, ``[B, T - 1]`` float32 (0 on padding).

    Args:
        cls_attn: ``[B, T]`` head-mean CLS attention row (0 on padded keys).
        head_values: ``[B, H, T, Dh]`` value projections per head (token 0: CLS).
        valid: ``[B, T]`` bool real tokens (None: all).
    """
    v = head_values.float()
    logits = v[:, :, :1] @ v.transpose(-1, -2)  # [B, H, 1, T]
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None], float("-inf"))
    semantic = logits.softmax(dim=-1).mean(dim=1)[:, 0, 1:]
    relation = cls_attn.float()[:, 1:]
    norm = v.mean(dim=1)[:, 1:].abs().sum(dim=-1)
    score = (relation / relation.sum(dim=-1, keepdim=True)
             + semantic / semantic.sum(dim=-1, keepdim=True)) * norm
    return score if valid is None else score.masked_fill(~valid[:, 1:], 0.0)


def adaptive_prune_count(cls_patch_attn: Tensor, valid: Tensor, rpl: int,
                         target: int) -> Tensor:
    """FlowCut's ``adaptive_prune_ratio`` per image, ``[B]`` long: ``round((N - target) /
    sqrt(rpl) * (1 - (H / log N)^2))`` with ``H`` the entropy of the normalised CLS
    attention over the image's ``N`` real patches (``cls_patch_attn``, ``valid``
    ``[B, P]``)."""
    a = cls_patch_attn.float().masked_fill(~valid, 0.0)
    n = valid.sum(dim=1).float()
    prob = a / a.sum(dim=1, keepdim=True)
    entropy = -torch.special.xlogy(prob, prob).sum(dim=1)
    ratio = entropy / n.log()
    r = (n - target) / math.sqrt(rpl) * (1 - ratio ** 2)
    return r.round().long()


@register(
    "flowcut",
    paper="FlowCut: Rethinking Redundancy via Information Flow for Efficient "
          "Vision-Language Models (Tong et al., NeurIPS 2025)",
    stage="encoder", kind="subset", signals=("cls_attn", "values"), config=FlowCutConfig,
    features="vision", cls_token=True,
)
def flowcut_reduce(tokens: Tensor, k: int, signals: Signals, config: FlowCutConfig,
                   generator: torch.Generator | None) -> Reduction:
    """CLS (``tokens[:, 0]``) + the ``keep - 1`` patches of largest FlowCut score
    (:func:`flowcut_scores` of ``cls_attn`` ``[B, N]`` or ``[B, L, N]`` (the last layer) and
    ``values`` ``[B, N, H*Dh]``), in original order."""
    b, n, _ = tokens.shape
    check_cls_budget(k, n, 1, "flowcut", "the CLS token")
    values = signals.require("values", "flowcut")
    assert isinstance(values, Tensor)
    if values.shape[-1] % config.heads:
        raise ValueError(f"flowcut: values of width {values.shape[-1]} do not split into "
                         f"heads={config.heads}")
    hv = values.float().reshape(b, n, config.heads, -1).transpose(1, 2)
    score = flowcut_scores(signals.layer("cls_attn", "flowcut"), hv)
    top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k - 1] + 1
    head = torch.zeros(b, 1, dtype=torch.long, device=tokens.device)
    return select(tokens, torch.cat([head, top.sort(dim=1).values], dim=1))


# -- inside the encoder ------------------------------------------------------------------------
@register_encoder_schedule("flowcut")
@dataclass(frozen=True)
class FlowCutSchedule(EncoderSchedule):
    """In-encoder options of ``flowcut`` (the official CLIP patch: ``flowcut(model,
    target_num)``, ``select_layer = len(layers) - 2``).

    At every layer ``i < select_layer``, after the MLP, the scores are accumulated from the
    layer's CLS attention row and value projections (from its q / k / v, no eager
    attention); layers with an even ``rpl = select_layer - i - 1`` prune (see the module),
    the last of them to exactly ``target_num`` patches. Each image prunes its own adaptive
    count (padded batch; the official code: the batch's largest).

    Attributes:
        target_num: patch tokens left (CLS not counted; required, e.g. 64).
        select_layer: the layer whose output is used; ``None``: ``depth - 2`` (official,
            LLaVA-1.5's feature layer).
    """

    target_num: int | None = None
    select_layer: int | None = None

    signals: ClassVar[tuple[str, ...]] = ("cls_attn", "head_values")
    needs_cls: ClassVar[bool] = True
    pads: ClassVar[bool] = True
    position: ClassVar[str] = "post"

    def __post_init__(self) -> None:
        t = self.target_num
        if t is None:
            raise ValueError("flowcut inside the encoder needs target_num, the patch tokens "
                             "left (e.g. ts.apply(model, 'flowcut', target_num=64)) or keep")
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"flowcut: target_num={t!r}: expected an int >= 1")
        s = self.select_layer
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"flowcut: select_layer={s!r}: expected a layer index >= 1")

    def select(self, depth: int) -> int:
        """The layer whose output is used in a ``depth``-layer encoder."""
        s = depth - 2 if self.select_layer is None else self.select_layer
        if not 1 <= s < depth:
            raise ValueError(f"flowcut: select_layer={s} is no layer after the first of this "
                             f"{depth}-layer encoder")
        return s

    def plan(self, depth: int) -> dict[int, Any]:
        s = self.select(depth)
        return {i: s - i - 1 for i in range(s)}

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        raise ValueError("flowcut: the step needs the pass's accumulated scores (run_step)")

    def run_step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
                 param: Any, has_cls: bool, state: dict[str, Any]) -> LayerStep | None:
        """One FlowCut layer (after the MLP) on ``tokens`` ``[B, T, D]`` with ``rpl = param``:
        accumulate the scores of the images above the target, prune when ``rpl`` is even."""
        b, t, _ = tokens.shape
        valid = signals.get("valid")
        real = torch.ones(b, t, dtype=torch.bool, device=tokens.device) if valid is None \
            else valid
        counts = real.sum(dim=1)
        target = self.target_num + 1  # type: ignore[operator]
        active = counts > target
        if not bool(active.any()):
            return None
        score = flowcut_scores(signals["cls_attn"], signals["head_values"], valid)
        cum = state.get("flowcut_scores")
        cum = score if cum is None else torch.where(active[:, None], 0.5 * cum + 0.5 * score,
                                                     cum)
        state["flowcut_scores"] = cum
        rpl = int(param)
        if rpl % 2:
            return None
        patches = real[:, 1:]
        prune = counts if rpl == 0 else adaptive_prune_count(
            signals["cls_attn"][:, 1:], patches, rpl, target - 1)
        left = torch.where(active, torch.clamp(counts - prune, min=target), counts) - 1
        order = torch.sort(cum.masked_fill(~patches, float("-inf")), dim=1, descending=True,
                           stable=True).indices
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(t - 1, device=tokens.device).expand(b, -1))
        keep = torch.cat([real[:, :1], (rank < left[:, None]) & patches], dim=1)
        if bool((keep == real).all()):
            return None
        step = padded_subset_step(tokens, sizes, keep)
        kept = step.kept[:, 1:] - 1
        real_out = step.mask[:, 1:] if step.mask is not None else None
        new = cum.gather(1, kept)
        state["flowcut_scores"] = new if real_out is None else new.masked_fill(~real_out, 0.0)
        return step

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        """The count after a layer with ``rpl = param``: ``target_num + 1`` at ``rpl = 0``;
        otherwise the adaptive count depends on the image, and the upper bound (no
        pruning) is returned."""
        target = self.target_num + 1  # type: ignore[operator]
        return min(tokens, target) if int(param) == 0 else tokens

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> FlowCutSchedule:
        """``target_num = keep``; the last pruning layer (``select_layer - 1``) must be one
        whose output is used."""
        if "target_num" in options:
            raise ValueError("flowcut: keep and target_num both set; keep is target_num")
        sched = cls(target_num=keep, **options)
        if sched.select(depth) - 1 > until:
            raise ValueError(f"flowcut: keep={keep}: its last pruning layer "
                             f"{sched.select(depth) - 1} is after the last layer whose output "
                             f"is used ({until})")
        return sched
