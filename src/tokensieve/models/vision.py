"""Plain Hugging Face vision backbones (``CLIPVisionModel``, ``SiglipVisionModel``,
``ViTModel``, ``Dinov2Model``): in-encoder methods only.

``ts.apply(backbone, "tome", r=16)`` wraps the encoder layers (see
:mod:`tokensieve.models._encoder`); the backbone's own ``forward`` then returns fewer
tokens (``last_hidden_state`` ``[B, N', D]``, CLS first where the backbone has one; the
pooled output is computed by the backbone from them: CLS for CLIP / ViT / Dinov2, the
attention-pooling head over the reduced tokens for SigLIP, without size weighting).
"""

from __future__ import annotations

from typing import Any

import torch

from tokensieve.models._base import Adapter, register_adapter
from tokensieve.models._encoder import tower_has_cls


@register_adapter
class VisionAdapter(Adapter):
    family = "vision"
    model_classes = ("CLIPVisionModel", "SiglipVisionModel", "ViTModel", "Dinov2Model")
    signals = ()

    def has_visual_inputs(self, args: dict[str, Any]) -> bool:
        return False

    def encoder_tower(self) -> tuple[torch.nn.ModuleList, bool, int | None]:
        """``(layers, has_cls, until)``: the encoder layers, whether token 0 is CLS, and
        None (every layer may reduce: the last hidden state is the output)."""
        model = self.model
        inner = getattr(model, "vision_model", model)
        enc = getattr(inner, "encoder", inner)
        layers = getattr(enc, "layers", None) or getattr(enc, "layer", None)
        if layers is None:
            raise ValueError(f"{type(model).__name__}: found no encoder layers")
        return layers, tower_has_cls(model), None
