"""Gemma 3 adapter (``Gemma3ForConditionalGeneration`` / ``Gemma3Model``).

Layout: a SigLIP tower (no CLS token) over a fixed-size image; the projector average-pools
the last layer's ``S x S`` patch grid with a ``k x k`` kernel to ``mm_tokens_per_image``
soft tokens (16 x 16 = 256 for Gemma 3), then RMS-normalises and projects them. Every
image fills one run of ``image_token_id`` placeholders between ``boi`` / ``eoi`` tokens;
``token_type_ids`` (1 on image tokens) make each image block attend bidirectionally and
are cut with the sequence. Positions are 1D (re-indexed contiguously).

Features: "projected" methods get the soft tokens; "vision" methods get the pooled
features before the norm and projection (one per soft token), which are projected after.

Signals from the q/k of the tower's last layer (its output is pooled; others with
``signal_layers``), computed under SDPA: ``attn_received`` (head- and query-mean
attention received, summed over each pooling window), ``keys`` / ``values`` (head-mean,
averaged over each window), ``grid`` (the soft-token grid), ``text`` / ``text_mask``.
No ``cls_attn``: SigLIP has no CLS token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokensieve.models._base import Adapter, Encoded, register_adapter
from tokensieve.models._signals import attention_received, capture_projections, mean_keys

ATTENTION_SIGNALS = ("attn_received", "keys", "values")


def pool_windows(x: Tensor, side: int, kernel: int, mode: str) -> Tensor:
    """``[I, side*side, C]`` raster patches -> ``[I, (side/kernel)^2, C]`` by summing or
    averaging every non-overlapping ``kernel x kernel`` window (raster order of windows)."""
    i, _, c = x.shape
    out = side // kernel
    x = x.reshape(i, out, kernel, out, kernel, c)
    x = x.sum(dim=(2, 4)) if mode == "sum" else x.mean(dim=(2, 4))
    return x.reshape(i, out * out, c)


@register_adapter
class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    signals = ("attn_received", "keys", "values", "text", "text_mask", "grid")

    def __init__(self, model: torch.nn.Module, spec: Any, config: Any,
                 signal_layers: Any = None) -> None:
        super().__init__(model, spec, config, signal_layers)
        self.inner = model if hasattr(model, "multi_modal_projector") else model.model
        proj = self.inner.multi_modal_projector
        self.side = int(proj.patches_per_image)
        self.kernel = int(proj.kernel_size)
        self.grid = (int(proj.tokens_per_side), int(proj.tokens_per_side))

    def _layers(self) -> Any:
        tower = self.inner.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def check(self) -> None:
        super().check()
        if self.spec.cls_token and self.config.options.get("has_cls"):
            raise ValueError(f"has_cls=True: the {self.family} vision tower has no CLS token")
        depth = len(self._layers())
        if self.wants("attn_received"):
            self.layer_plan(depth, depth - 1)
        self.resolve_keep(self.grid[0] * self.grid[1])

    def _project(self, pooled: Tensor) -> Tensor:
        """The projector after pooling: RMS norm and projection (as Gemma3 computes it)."""
        proj = self.inner.multi_modal_projector
        normed = proj.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, proj.mm_input_projection_weight).type_as(pooled)

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        depth = len(self._layers())
        feature = depth - 1
        want_attn = any(self.wants(s) for s in ATTENTION_SIGNALS)
        plan = self.layer_plan(depth, feature) if self.wants("attn_received") else None
        layers = {feature, *(plan or [])} if want_attn else set()
        names = ["q_proj", "k_proj"] + (["v_proj"] if self.wants("values") else [])
        captured, handles = capture_projections(
            {i: self._layers()[i].self_attn for i in layers}, names)
        try:
            hidden = self.inner.vision_tower(pixel_values=args["pixel_values"],
                                             return_dict=True).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        pooled = pool_windows(hidden, self.side, self.kernel, "mean")
        n = pooled.shape[1]
        signals: dict[str, Any] = {"grid": self.grid}
        if want_attn:
            attn = self._layers()[feature].self_attn
            heads, scale = attn.num_heads, attn.scale
            if self.wants("attn_received"):
                per = [pool_windows(attention_received(
                    captured[i]["q_proj"], captured[i]["k_proj"], heads, scale).unsqueeze(-1),
                    self.side, self.kernel, "sum")[..., 0] for i in (plan or [feature])]
                signals["attn_received"] = per[0] if plan is None else torch.stack(per, 1)
            if self.wants("keys"):
                signals["keys"] = pool_windows(mean_keys(captured[feature]["k_proj"], heads),
                                               self.side, self.kernel, "mean")
            if self.wants("values"):
                signals["values"] = pool_windows(mean_keys(captured[feature]["v_proj"], heads),
                                                 self.side, self.kernel, "mean")
        counts = [n] * pooled.shape[0]
        if self.wants("text"):
            signals["text"], signals["text_mask"] = self.text_signal(args, placeholder, counts)
        k = self.resolve_keep(n)
        if self.spec.features == "projected":
            r = self.run_method(self._project(pooled), k, signals, has_cls=False)
            feats = r.tokens
        else:
            r = self.run_method(pooled, k, signals, has_cls=False)
            feats = self._project(r.tokens)
        features, per_image = self.split(r, feats, self.grid)
        return Encoded(features=features, counts=counts, reductions=per_image)

    def encoder_outputs(self, features: list[Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # Gemma3 scatters one [*, K, D] tensor in placeholder order.
        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])}
