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

from tokensieve.models._base import Encoded, register_adapter
from tokensieve.models._grouped import GroupedTowerAdapter


@register_adapter
class Idefics3Adapter(GroupedTowerAdapter):
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

    def encoder_tower(self) -> tuple[Any, bool, int]:
        """``(layers, has_cls, until)`` for the in-encoder stage: the SigLIP-style layers of
        the per-crop tower, no CLS, the last layer (its output is pixel-shuffled). Only
        methods that rebuild the whole grid (``expedit``) run here; crops with padded patches
        are refused when called (their padding mask)."""
        layers = self._layers()
        return layers, False, len(layers) - 1

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

    def _group(self, hidden: Tensor) -> Tensor:
        """The connector's pixel shuffle: ``[I, S, C]`` -> ``[I, S / s^2, s^2 * C]``."""
        return self.inner.connector.pixel_shuffle(hidden, self.scale)

    def _per_group(self, x: Tensor, mode: str) -> Tensor:
        """``[I, S, C]`` patch signal -> ``[I, n, C]``, summed or averaged per shuffle block."""
        y = self._group(x)
        y = y.reshape(*y.shape[:2], self.scale * self.scale, x.shape[-1])
        return y.sum(2) if mode == "sum" else y.mean(2)

    def _project(self, tokens: Tensor) -> Tensor:
        return self.inner.connector.modality_projection(tokens)

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        pixel_values, patch_mask, _ = self._real_images(args)
        valid = patch_mask.reshape(patch_mask.shape[0], -1)
        return self.encode_grouped(args, placeholder, lambda: self.inner.vision_model(
            pixel_values=pixel_values, patch_attention_mask=patch_mask,
            return_dict=True).last_hidden_state, valid=valid)

    def encoder_outputs(self, features: list[Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # One [sum K_i, D] tensor in placeholder order: what every supported release scatters
        # (5.24 also takes a list; 5.19 only a tensor).
        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features, 0))}
