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

from tokensieve.models._base import Encoded, register_adapter
from tokensieve.models._grouped import GroupedTowerAdapter


def pool_windows(x: Tensor, side: int, kernel: int, mode: str) -> Tensor:
    """``[I, side*side, C]`` raster patches -> ``[I, (side/kernel)^2, C]`` by summing or
    averaging every non-overlapping ``kernel x kernel`` window (raster order of windows)."""
    i, _, c = x.shape
    out = side // kernel
    x = x.reshape(i, out, kernel, out, kernel, c)
    x = x.sum(dim=(2, 4)) if mode == "sum" else x.mean(dim=(2, 4))
    return x.reshape(i, out * out, c)


@register_adapter
class Gemma3Adapter(GroupedTowerAdapter):
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

    def encoder_tower(self) -> tuple[Any, bool, int]:
        """``(layers, has_cls, until)`` for the in-encoder stage: the SigLIP layers, no CLS,
        the last layer (its output is pooled). Only methods that rebuild the whole grid
        (``expedit``) run here (the pooling needs every patch)."""
        layers = self._layers()
        return layers, False, len(layers) - 1

    def _project(self, pooled: Tensor) -> Tensor:
        """The projector after pooling: RMS norm and projection (as Gemma3 computes it)."""
        proj = self.inner.multi_modal_projector
        normed = proj.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, proj.mm_input_projection_weight).type_as(pooled)

    def _group(self, hidden: Tensor) -> Tensor:
        return pool_windows(hidden, self.side, self.kernel, "mean")

    def _per_group(self, x: Tensor, mode: str) -> Tensor:
        return pool_windows(x, self.side, self.kernel, mode)

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        return self.encode_grouped(args, placeholder, lambda: self.inner.vision_tower(
            pixel_values=args["pixel_values"], return_dict=True).last_hidden_state)

    def encoder_outputs(self, features: list[Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # Gemma3 scatters one [*, K, D] tensor in placeholder order.
        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])}

    def llm_block_ids(self, args: dict[str, Any]) -> Tensor | None:
        """Gemma 3's image tokens attend to each other both ways: their blocks, from
        ``token_type_ids`` as the model builds them (the in-LLM stage keeps them on the kept
        tokens)."""
        types = args.get("token_type_ids")
        if types is None:
            return None
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        return get_block_sequence_ids_for_mask(types, device=types.device)
