"""LLaVA-OneVision adapter (``LlavaOnevisionForConditionalGeneration`` /
``LlavaOnevisionModel``): LLaVA-NeXT's anyres packing with a SigLIP tower.

Differences from ``llava_next``: the tower has no CLS token (so no ``cls_attn``;
``attn_received`` / ``keys`` / ``values`` of the feature layer instead), the "full"
feature strategy is the default, prompts with several images per sample encode each
image without crops (``batch_num_images``), and ``anyres_max_N`` bilinearly shrinks a
large stitched crop map. Signals and crop ids are packed through the model's own
``pack_image_features`` like the tokens, so on a shrunk map they are interpolated too
(crop ids rounded). Videos are encoded untouched (not reduced).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokensieve.models._base import Encoded, register_adapter
from tokensieve.models.llava_next import LlavaNextAdapter


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava-onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    visual_keys = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos",
                   "image_sizes_videos", "vision_aspect_ratio")

    def __init__(self, model: torch.nn.Module, spec: Any, config: Any,
                 signal_layers: Any = None) -> None:
        super().__init__(model, spec, config, signal_layers)
        has_cls = "siglip" not in str(getattr(model.config.vision_config, "model_type", ""))
        self.signals = tuple(s for s in LlavaNextAdapter.signals
                             if has_cls or s != "cls_attn")

    def check(self) -> None:
        self.check_signals()
        layer = self._feature_layer({})
        if any(self.wants(s) for s in ("attn_received", "keys", "values")):
            self.layer_plan(len(self._layers()), self._attention_layer(layer))
        self._strategy({})
        self.resolve_keep(10**9)  # the format of keep; its size is checked per image
        if self.spec.cls_token and self.config.options.get("has_cls"):
            raise ValueError("has_cls=True: LLaVA-OneVision's packed layout has no CLS token")
        self.check_crop_layout()

    def _patch_start(self, args: dict[str, Any]) -> int:
        return 1 if self._strategy(args) == "default" else 0

    def _num_crops(self, args: dict[str, Any]) -> list[int]:
        crops = super()._num_crops(args)
        per_sample = args.get("batch_num_images")
        if per_sample is None:
            return crops
        patching = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [c if p else 1 for c, p in zip(crops, patching, strict=True)]

    def _pack(self, per_crop: list[Tensor], args: dict[str, Any], newline: Tensor,
              ) -> list[Tensor]:
        ratio = args.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        packed, _ = self.inner.pack_image_features(per_crop, args["image_sizes"],
                                                   image_newline=newline,
                                                   vision_aspect_ratio=ratio)
        return list(packed)

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        enc = super().encode(args, placeholder)
        if args.get("pixel_values_videos") is not None:
            enc.extra["video"] = self.inner.get_video_features(
                args["pixel_values_videos"], return_dict=True)
        return enc
