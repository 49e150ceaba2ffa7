"""Shared base of families whose tower has no CLS token and whose LLM tokens group the
last layer's patches (Gemma 3: average-pooling windows; Idefics3: pixel-shuffle blocks).

The tower's last layer is the feature layer; attention signals come from its q/k (other
layers with ``signal_layers``) and are reduced per group like the tokens: ``attn_received``
summed, ``keys`` / ``values`` averaged. A subclass gives the tower call and three hooks:
``_group`` (hidden states -> method tokens), ``_per_group`` (a per-patch signal -> per
group) and ``_project`` (method tokens -> LLM tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tokensieve.models._base import Adapter, Encoded
from tokensieve.models._signals import attention_received, capture_projections, mean_keys

ATTENTION_SIGNALS = ("attn_received", "keys", "values")


class GroupedTowerAdapter(Adapter):
    """A CLS-free tower whose last layer's patches are grouped into LLM tokens."""

    #: The LLM token grid of one image (or crop).
    grid: tuple[int, int]

    def _layers(self) -> Any:
        raise NotImplementedError

    def _group(self, hidden: Tensor) -> Tensor:
        """Last hidden states ``[I, S, Dv]`` -> the tokens a method gets ``[I, n, C]``."""
        raise NotImplementedError

    def _per_group(self, x: Tensor, mode: str) -> Tensor:
        """``[I, S, C]`` per-patch signal -> ``[I, n, C]``, summed or averaged per group."""
        raise NotImplementedError

    def _project(self, tokens: Tensor) -> Tensor:
        """Grouped features -> the LLM's visual tokens."""
        raise NotImplementedError

    def check(self) -> None:
        super().check()
        if self.spec.cls_token and self.config.options.get("has_cls"):
            raise ValueError(f"has_cls=True: the {self.family} vision tower has no CLS token")
        depth = len(self._layers())
        if self.wants("attn_received"):
            self.layer_plan(depth, depth - 1)
        self.resolve_keep(self.grid[0] * self.grid[1])

    def encode_grouped(self, args: dict[str, Any], placeholder: Tensor,
                       run_tower: Callable[[], Tensor], valid: Tensor | None = None,
                       ) -> Encoded:
        """Run the tower (``run_tower()`` returns its last hidden states) with the q/k hooks
        the method needs, group the patches, reduce and project. ``valid`` ``[I, S]``: False
        on padding patches (left out of ``attn_received``)."""
        depth = len(self._layers())
        feature = depth - 1
        want_attn = any(self.wants(s) for s in ATTENTION_SIGNALS)
        plan = self.layer_plan(depth, feature) if self.wants("attn_received") else None
        layers = {feature, *(plan or [])} if want_attn else set()
        names = ["q_proj", "k_proj"] + (["v_proj"] if self.wants("values") else [])
        captured, handles = capture_projections(
            {i: self._layers()[i].self_attn for i in layers}, names)
        try:
            hidden = run_tower()
        finally:
            for h in handles:
                h.remove()
        tokens = self._group(hidden)
        n = tokens.shape[1]
        signals: dict[str, Any] = {"grid": self.grid}
        if want_attn:
            attn = self._layers()[feature].self_attn
            heads, scale = attn.num_heads, attn.scale
            if self.wants("attn_received"):
                per = [self._per_group(attention_received(
                    captured[i]["q_proj"], captured[i]["k_proj"], heads, scale,
                    valid=valid).unsqueeze(-1), "sum")[..., 0] for i in (plan or [feature])]
                signals["attn_received"] = per[0] if plan is None else torch.stack(per, 1)
            if self.wants("keys"):
                signals["keys"] = self._per_group(mean_keys(captured[feature]["k_proj"], heads),
                                                  "mean")
            if self.wants("values"):
                signals["values"] = self._per_group(
                    mean_keys(captured[feature]["v_proj"], heads), "mean")
        counts = [n] * tokens.shape[0]
        if self.wants("text"):
            signals["text"], signals["text_mask"] = self.text_signal(args, placeholder, counts)
        k = self.resolve_keep(n)
        if self.spec.features == "projected":
            r = self.run_method(self._project(tokens), k, signals, has_cls=False)
            feats = r.tokens
        else:
            r = self.run_method(tokens, k, signals, has_cls=False)
            feats = self._project(r.tokens)
        features, per_image = self.split(r, feats, self.grid)
        return Encoded(features=features, counts=counts, reductions=per_image)
