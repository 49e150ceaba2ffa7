"""Idefics3 / SmolVLM adapter (``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration`` and their ``*Model`` bases).

Layout: the processor splits an image into crops plus a downscaled global image; every
one is encoded alone by a SigLIP-style tower (no CLS token; padded pixels masked by
``pixel_attention_mask``), pixel-shuffled (``scale_factor`` x ``scale_factor`` patch
blocks concatenated) and projected to ``image_seq_len`` tokens, which fill one run of
``image_token_id`` placeholders (between ``<fake_token_around_image>`` / row-column
tokens, which stay). Each crop is reduced on its own (``keep`` counts per crop or is a
fraction of a crop's tokens); positions are 1D (re-indexed).

Features: "projected" methods get the connector's output; "vision" methods get the
pixel-shuffled features before ``modality_projection`` (which is applied after).

Signals from the tower's last layer q/k (others with ``signal_layers``), SDPA kept:
``attn_received`` (head- and query-mean over the crop's real patches, summed over each
pixel-shuffle block), ``keys`` / ``values`` (head-mean, averaged per block), ``grid``
(the shuffled grid), ``text`` / ``text_mask``. No ``cls_attn``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokensieve.models._base import Adapter, Encoded, register_adapter
from tokensieve.models._signals import attention_received, capture_projections, mean_keys

ATTENTION_SIGNALS = ("attn_received", "keys", "values")


@register_adapter
class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "Idefics3Model",
                     "SmolVLMForConditionalGeneration", "SmolVLMModel")
    signals = ("attn_received", "keys", "values", "text", "text_mask", "grid")
    visual_keys = ("pixel_values", "pixel_attention_mask")

    def __init__(self, model: torch.nn.Module, spec: Any, config: Any,
                 signal_layers: Any = None) -> None:
        super().__init__(model, spec, config, signal_layers)
        self.inner = model if hasattr(model, "connector") else model.model
        vcfg = model.config.vision_config
        self.scale = int(self.inner.connector.scale_factor)
        side = vcfg.image_size // vcfg.patch_size
        self.grid = (side // self.scale, side // self.scale)

    def _layers(self) -> Any:
        return self.inner.vision_model.encoder.layers

    def check(self) -> None:
        super().check()
        if self.spec.cls_token and self.config.options.get("has_cls"):
            raise ValueError(f"has_cls=True: the {self.family} vision tower has no CLS token")
        depth = len(self._layers())
        if self.wants("attn_received"):
            self.layer_plan(depth, depth - 1)
        self.resolve_keep(self.grid[0] * self.grid[1])

    def _real_images(self, args: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(pixel values ``[I, 3, H, W]`` of the real images, patch mask ``[I, h, w]``,
        indices of the real images among the ``B * max_images`` slots)."""
        pv = args["pixel_values"]
        b, m = pv.shape[:2]
        flat = pv.reshape(b * m, *pv.shape[2:]).to(dtype=self.inner.dtype)
        real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()
        pam = args.get("pixel_attention_mask")
        if pam is None:
            pam = torch.ones(flat.shape[0], *flat.shape[2:], dtype=torch.bool, device=pv.device)
        else:
            pam = pam.reshape(b * m, *pam.shape[2:])
        patch = self.model.config.vision_config.patch_size
        grid = pam[real].unfold(1, patch, patch).unfold(2, patch, patch)
        return flat[real].contiguous(), grid.sum(dim=(-1, -2)) > 0, real

    def has_visual_inputs(self, args: dict[str, Any]) -> bool:
        pv = args.get("pixel_values")
        return pv is not None and bool(self._real_images(args)[2].any())

    def _shuffle(self, x: Tensor) -> Tensor:
        """The connector's pixel shuffle: ``[I, S, C]`` -> ``[I, S / s^2, s^2 * C]``."""
        return self.inner.connector.pixel_shuffle(x, self.scale)

    def _per_block(self, x: Tensor, mode: str) -> Tensor:
        """``[I, S, C]`` patch signal -> ``[I, n, C]``, summed or averaged per shuffle block."""
        y = self._shuffle(x)
        y = y.reshape(*y.shape[:2], self.scale * self.scale, x.shape[-1])
        return y.sum(2) if mode == "sum" else y.mean(2)

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        pixel_values, patch_mask, _ = self._real_images(args)
        depth = len(self._layers())
        feature = depth - 1
        want_attn = any(self.wants(s) for s in ATTENTION_SIGNALS)
        plan = self.layer_plan(depth, feature) if self.wants("attn_received") else None
        layers = {feature, *(plan or [])} if want_attn else set()
        names = ["q_proj", "k_proj"] + (["v_proj"] if self.wants("values") else [])
        captured, handles = capture_projections(
            {i: self._layers()[i].self_attn for i in layers}, names)
        try:
            hidden = self.inner.vision_model(pixel_values=pixel_values,
                                             patch_attention_mask=patch_mask,
                                             return_dict=True).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        shuffled = self._shuffle(hidden)  # [I, n, s^2 * Dv]
        n = shuffled.shape[1]
        valid = patch_mask.reshape(patch_mask.shape[0], -1)
        signals: dict[str, Any] = {"grid": self.grid}
        if want_attn:
            attn = self._layers()[feature].self_attn
            heads, scale = attn.num_heads, attn.scale
            if self.wants("attn_received"):
                per = [self._per_block(attention_received(
                    captured[i]["q_proj"], captured[i]["k_proj"], heads, scale,
                    valid=valid).unsqueeze(-1), "sum")[..., 0] for i in (plan or [feature])]
                signals["attn_received"] = per[0] if plan is None else torch.stack(per, 1)
            if self.wants("keys"):
                signals["keys"] = self._per_block(mean_keys(captured[feature]["k_proj"], heads),
                                                  "mean")
            if self.wants("values"):
                signals["values"] = self._per_block(
                    mean_keys(captured[feature]["v_proj"], heads), "mean")
        counts = [n] * shuffled.shape[0]
        if self.wants("text"):
            signals["text"], signals["text_mask"] = self.text_signal(args, placeholder, counts)
        k = self.resolve_keep(n)
        project = self.inner.connector.modality_projection
        if self.spec.features == "projected":
            r = self.run_method(project(shuffled), k, signals, has_cls=False)
            feats = r.tokens
        else:
            r = self.run_method(shuffled, k, signals, has_cls=False)
            feats = project(r.tokens)
        features, per_image = self.split(r, feats, self.grid)
        return Encoded(features=features, counts=counts, reductions=per_image)
