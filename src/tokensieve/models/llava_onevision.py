"""LLaVA-OneVision adapter (``LlavaOnevisionForConditionalGeneration`` /
``LlavaOnevisionModel``): LLaVA-NeXT's anyres packing with a SigLIP tower.

Differences from ``llava_next``: the tower has no CLS token (so no ``cls_attn``;
``attn_received`` / ``keys`` / ``values`` of the feature layer instead), the "full"
feature strategy is the default, prompts with several images per sample encode each
image without crops (``batch_num_images``), and ``anyres_max_N`` bilinearly shrinks a
large stitched crop map. Signals and crop ids are packed through the model's own
``pack_image_features`` like the tokens, so on a shrunk map they are interpolated too
(crop ids rounded). Videos: see ``encode_clips`` and ``tokensieve.models._video``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokensieve.models._base import register_adapter
from tokensieve.models._video import Clip
from tokensieve.models.llava_next import LlavaNextAdapter


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava-onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    visual_keys = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos",
                   "image_sizes_videos", "vision_aspect_ratio")
    has_video = True

    def __init__(self, model: torch.nn.Module, spec: Any, config: Any,
                 signal_layers: Any = None) -> None:
        super().__init__(model, spec, config, signal_layers)
        has_cls = "siglip" not in str(getattr(model.config.vision_config, "model_type", ""))
        self.signals = tuple(s for s in LlavaNextAdapter.signals
                             if has_cls or s != "cls_attn") + ("frames",)

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

    # -- videos ---------------------------------------------------------------------------
    def encode_clips(self, args: dict[str, Any]) -> list[Clip]:
        """Each video as its frames' pooled LLM tokens (the model's own path: tower, feature
        layer, projector, bilinear pooling to ``ceil(side / 2)`` per side), with the newline
        the model appends as the tail. Attention signals of the feature layer are computed per
        frame and pooled like the tokens (bilinear)."""
        videos = args["pixel_values_videos"]
        if videos.dim() != 5:
            raise ValueError(f"pixel_values_videos: expected [B, T, 3, H, W], got shape "
                             f"{tuple(videos.shape)}")
        b, t = videos.shape[:2]
        hidden, tower = self.run_tower(args, videos.flatten(0, 1))  # [B*T, (1 +) n, Dv]
        start = self._patch_start(args)
        pool = self.inner.apply_pooling  # [B*T, n, C] -> [B*T, n', C], tokens and signals
        feats = pool(self.inner.multi_modal_projector(hidden[:, start:]))
        side = -(-self.grid[0] // 2)
        pooled = (side, side)

        signals: dict[str, Tensor] = {}
        for name, value in tower.items():
            value = value[..., start:] if name in ("cls_attn", "attn_received") else \
                value[:, start:]
            if name in ("keys", "values"):
                per = pool(value.float().contiguous())  # [B*T, n', C]
                signals[name] = per.reshape(b, -1, per.shape[-1])
            elif value.dim() == 2:  # [B*T, n]
                per = pool(value.float().unsqueeze(-1).contiguous())[..., 0]
                signals[name] = per.reshape(b, -1)
            else:  # [B*T, L, n]
                per = pool(value.float().transpose(1, 2).contiguous()).transpose(1, 2)
                layers = per.shape[1]
                signals[name] = per.reshape(b, t, layers, -1).transpose(1, 2).reshape(
                    b, layers, -1)
        tokens = feats.reshape(b, -1, feats.shape[-1])
        newline = self.inner.image_newline[None]
        return [Clip(tokens=tokens[i], frames=t, grid=pooled,
                     signals={k: v[i] for k, v in signals.items()}, tail=newline)
                for i in range(b)]

    def image_features(self, args: dict[str, Any]) -> list[Tensor]:
        extra = {k: args[k] for k in ("vision_feature_layer", "vision_feature_select_strategy",
                                      "batch_num_images") if args.get(k) is not None}
        out = self.inner.get_image_features(args["pixel_values"], args["image_sizes"],
                                            return_dict=True, **extra)
        return list(out.pooler_output)

    def video_features(self, args: dict[str, Any]) -> Any:
        extra = {k: args[k] for k in ("vision_feature_layer", "vision_feature_select_strategy")
                 if args.get(k) is not None}
        return self.inner.get_video_features(args["pixel_values_videos"], return_dict=True,
                                             **extra)

    def video_outputs(self, features: list[Tensor]) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # The model flattens [B, n, D] to [B*n, D]: one row holds every video's tokens.
        return BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])
