"""LLaVA-NeXT adapter (``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``), anyres.

Layout of one image: the CLIP tower encodes the overview image and ``rows x cols`` crops
(``image_grid_pinpoints``); the LLM receives the overview's ``H x W`` tokens, then the
crops stitched into one ``rows*H x cols*W`` map, unpadded to the image's aspect ratio,
with one ``image_newline`` token closing every map row (the model's own
``pack_image_features`` builds it). Images differ in size, so the method runs once per
image, on exactly that packed token set; ``keep`` counts or is a fraction of it.

Signals: ``cls_attn`` / ``attn_received`` / ``keys`` / ``values`` are computed per crop
from the feature layer's q/k (SDPA kept, see ``llava``) and laid out like the packed
tokens (0 on newlines); ``partitions`` gives every packed token its crop (0 = overview,
``1..P`` = crops in raster order of the tiling, -1 = newline, always kept by methods
that honour partitions), ``tiling`` = ``(rows, cols)``, ``grid`` = one crop's grid;
``text`` / ``text_mask`` as in ``llava``. No ``grid`` signal: the packed set is not a
grid. Note: with unpadding, edge crops hold fewer than ``H*W`` tokens; methods that need
full crops (HiRED, GlobalCom2) then raise their own error.

Features: "projected" methods get the packed LLM tokens; "vision" methods get the
packed feature-layer tokens (zeros on newline slots), which are projected afterwards,
kept newline slots receiving the model's ``image_newline``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokensieve.core.signals import Partitions
from tokensieve.models._base import Encoded, register_adapter
from tokensieve.models.llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava-next"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    signals = ("cls_attn", "attn_received", "keys", "values", "text", "text_mask",
               "partitions")

    def tokens_per_image(self, args: dict[str, Any] | None = None) -> int:
        side = self.grid[0]
        return side * side  # the overview alone; crops add more (checked per image)

    def check(self) -> None:
        missing = [s for s in self.spec.signals if s not in self.signals]
        if missing:
            raise ValueError(
                f"method {self.spec.name!r} needs the signal(s) {missing}, which the "
                f"{self.family} adapter cannot give (it gives {list(self.signals)})")
        layer = self._feature_layer({})
        if any(self.wants(s) for s in ("cls_attn", "attn_received", "keys", "values")):
            self.layer_plan(len(self._layers()), self._attention_layer(layer))
        self.resolve_keep(10**9)  # the format of keep; its size is checked per image
        if self._strategy({}) != "default":
            raise ValueError("vision_feature_select_strategy='full': the llava-next adapter "
                             "supports the 'default' strategy")
        if self.spec.cls_token and self.config.options.get("has_cls"):
            raise ValueError(f"has_cls=True: LLaVA-NeXT's packed layout has no CLS token "
                             f"(method {self.spec.name!r} runs without it here)")

    def use_cls(self) -> bool:
        return False

    def _num_crops(self, sizes: Tensor) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import (
            image_size_to_num_patches,
        )

        cfg = self.model.config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size)
                for s in sizes]

    def _tiling(self, size: Tensor) -> tuple[int, int]:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
        )

        cfg = self.model.config
        rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints,
                                                 cfg.vision_config.image_size)
        return int(rows), int(cols)

    def _pack(self, per_crop: list[Tensor], sizes: Tensor, newline: Tensor) -> list[Tensor]:
        packed, _ = self.inner.pack_image_features(per_crop, sizes, "default",
                                                   image_newline=newline)
        return list(packed)

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        sizes = args.get("image_sizes")
        if sizes is None:
            raise ValueError("image_sizes: the llava-next adapter needs the image sizes "
                             "(returned by the processor with pixel_values)")
        crops = self._num_crops(sizes)
        pixel_values = args["pixel_values"]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:c] for p, c in zip(pixel_values, crops, strict=True)])
        hidden, tower = self.run_tower(args, pixel_values)  # [C, 1 + n, Dv]
        n = hidden.shape[1] - 1
        patches = hidden[:, 1:]
        # Where every packed token comes from: the packing of (crop, token) indices.
        src_ids = torch.arange(patches.shape[0] * n, device=hidden.device, dtype=torch.float32)
        src_ids = list(torch.split(src_ids.reshape(-1, n, 1), crops))
        sources = [s[:, 0].round().long() for s in self._pack(
            src_ids, sizes, torch.full((1,), -1.0, device=hidden.device))]
        projector = self.inner.multi_modal_projector
        newline = self.inner.image_newline
        if self.spec.features == "projected":
            view = self._pack(list(torch.split(projector(patches), crops)), sizes, newline)
        else:
            zeros = torch.zeros(patches.shape[-1], dtype=patches.dtype, device=patches.device)
            view = self._pack(list(torch.split(patches, crops)), sizes, zeros)
        counts = [int(s.shape[0]) for s in sources]
        text = self.text_signal(args, placeholder, counts) if self.wants("text") else None
        first_crop = [sum(crops[:i]) for i in range(len(crops))]
        features, reductions = [], []
        for i, src in enumerate(sources):
            is_newline = src < 0
            flat = src.clamp(min=0)
            signals: dict[str, Any] = {}
            for name, value in tower.items():
                per_token = value[..., 1:] if name in ("cls_attn", "attn_received") else (
                    value[:, 1:])
                if name in ("cls_attn", "attn_received"):
                    lead = per_token.shape[1:-1]
                    per_token = per_token.movedim(0, -2).reshape(*lead, -1)[..., flat]
                    per_token = per_token.masked_fill(is_newline, 0).unsqueeze(0)
                else:
                    per_token = per_token.reshape(-1, per_token.shape[-1])[flat]
                    per_token = per_token.masked_fill(is_newline[:, None], 0).unsqueeze(0)
                signals[name] = per_token
            ids = torch.where(is_newline, -1, flat // n - first_crop[i])
            signals["partitions"] = Partitions(ids=ids[None], tiling=self._tiling(sizes[i]),
                                               grid=self.grid)
            if text is not None:
                signals["text"], signals["text_mask"] = text[0][i:i + 1], text[1][i:i + 1]
            k = self.resolve_keep(counts[i])
            r = self.run_method(view[i][None], k, signals, has_cls=False)
            if self.spec.features == "projected":
                feats = r.tokens
            else:
                feats = projector(r.tokens)
                if r.indices is not None:  # kept newline slots get the real newline token
                    slot = torch.zeros(feats.shape[1], dtype=torch.bool, device=feats.device)
                    slot[:r.indices.shape[1]] = is_newline[r.indices[0]]
                    feats = torch.where(slot[None, :, None], newline.to(feats.dtype), feats)
            f, per = self.split(r, feats, None)
            features += f
            reductions += per
        return Encoded(features=features, counts=counts, reductions=reductions)
