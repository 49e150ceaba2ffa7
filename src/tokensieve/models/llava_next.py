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
grid. Methods that need whole partitions (``partitions`` among their required signals: HiRED,
GlobalCom2) run on the crop layout instead (see ``_encode_crops``).

Features: subset methods and "projected" methods get the packed LLM tokens (a kept
token is unchanged, so selecting among projected tokens is what a vision-feature subset
method produces); merging "vision" methods get the packed feature-layer tokens (zeros on
newline slots), which are projected afterwards, kept newline slots receiving the model's
``image_newline``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokensieve.core.reduction import Reduction
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
        self.check_signals()
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
        self.check_crop_layout()

    def check_crop_layout(self) -> None:
        """Methods that need whole partitions run on the crop layout, which only a subset
        method can be packed back from."""
        if "partitions" in self.required and self.spec.kind != "subset":
            raise ValueError(f"method {self.spec.name!r} ({self.spec.kind}): the crop layout "
                             f"of {self.family} needs a subset method")

    def use_cls(self) -> bool:
        return False

    def _num_crops(self, args: dict[str, Any]) -> list[int]:
        """Tower inputs (overview + crops) of every image."""
        from transformers.models.llava_next.modeling_llava_next import (
            image_size_to_num_patches,
        )

        cfg = self.model.config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size)
                for s in args["image_sizes"]]

    def _tiling(self, size: Tensor) -> tuple[int, int]:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
        )

        cfg = self.model.config
        rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints,
                                                 cfg.vision_config.image_size)
        return int(rows), int(cols)

    def _pack(self, per_crop: list[Tensor], args: dict[str, Any], newline: Tensor,
              ) -> list[Tensor]:
        """The model's own packing of per-crop tokens ``[c_i, n, D]`` into per-image
        sequences ``[M_i, D]`` (unpadding, newlines)."""
        packed, _ = self.inner.pack_image_features(per_crop, args["image_sizes"], "default",
                                                   image_newline=newline)
        return list(packed)

    def _vision_view(self) -> bool:
        """Whether the method sees packed feature-layer tokens: only merging methods that
        read vision features. Subset methods see the packed LLM tokens (they keep tokens
        unchanged, so this is what they would produce; it also holds where the model
        interpolates projected tokens, as LLaVA-OneVision does)."""
        return self.spec.features == "vision" and self.spec.kind != "subset"

    def _patch_start(self, args: dict[str, Any]) -> int:
        """Index of the first patch token in the tower's sequence (1 after a CLS token)."""
        return 1

    def _packed(self, x: Tensor, crops: list[int], args: dict[str, Any],
                newline: float) -> list[Tensor]:
        """Pack a per-crop token signal ``[C, n, D]`` like the LLM tokens (``newline`` on
        newline slots)."""
        line = torch.full((x.shape[-1],), newline, dtype=x.dtype, device=x.device)
        return self._pack(list(torch.split(x, crops)), args, line)

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        if args.get("image_sizes") is None:
            raise ValueError("image_sizes: the llava-next adapter needs the image sizes "
                             "(returned by the processor with pixel_values)")
        sizes = args["image_sizes"]
        crops = self._num_crops(args)
        pixel_values = args["pixel_values"]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:c] for p, c in zip(pixel_values, crops, strict=True)])
        hidden, tower = self.run_tower(args, pixel_values)  # [C, (1 +) n, Dv]
        start = self._patch_start(args)
        patches = hidden[:, start:]
        c_all, n = patches.shape[:2]
        dev = hidden.device
        # Crop id of every packed token (0 overview, 1..P crops, -1 newline).
        first = torch.tensor([0] + crops[:-1], device=dev).cumsum(0)
        local = torch.arange(c_all, device=dev) - torch.repeat_interleave(
            first, torch.tensor(crops, device=dev))
        ids = [p[:, 0].round().long() for p in self._packed(
            local.float()[:, None, None].expand(-1, n, 1), crops, args, -1.0)]
        projector = self.inner.multi_modal_projector
        newline = self.inner.image_newline
        if "partitions" in self.required:
            counts = [int(i.shape[0]) for i in ids]
            return self._encode_crops(args, placeholder, crops, projector(patches), tower,
                                      start, counts)
        in_vision = self._vision_view()
        if not in_vision:
            view = self._pack(list(torch.split(projector(patches), crops)), args, newline)
        else:
            view = self._packed(patches, crops, args, 0.0)
        packed_signals: dict[str, list[Tensor]] = {}
        for name, value in tower.items():
            if name in ("cls_attn", "attn_received"):  # [C, (L,) 1 + n] -> [C, n, (L or 1)]
                per = value[..., start:]
                per = per.unsqueeze(-1) if per.dim() == 2 else per.transpose(1, 2)
                packed_signals[name] = [p.T if value.dim() == 3 else p[:, 0]
                                        for p in self._packed(per.float(), crops, args, 0.0)]
            else:
                packed_signals[name] = self._packed(value[:, start:], crops, args, 0.0)
        counts = [int(i.shape[0]) for i in ids]
        text = self.text_signal(args, placeholder, counts) if self.wants("text") else None
        features, reductions = [], []
        for i, part in enumerate(ids):
            is_newline = part < 0
            signals: dict[str, Any] = {k: v[i][None] for k, v in packed_signals.items()}
            signals["partitions"] = Partitions(ids=part[None], tiling=self._tiling(sizes[i]),
                                               grid=self.grid)
            if text is not None:
                signals["text"], signals["text_mask"] = text[0][i:i + 1], text[1][i:i + 1]
            k = self.resolve_keep(counts[i])
            r = self.run_method(view[i][None], k, signals, has_cls=False)
            if not in_vision:
                feats = r.tokens
            else:
                feats = projector(r.tokens)
                if r.indices is not None:  # kept newline slots get the real newline token
                    slot = torch.zeros(feats.shape[1], dtype=torch.bool, device=feats.device)
                    slot[:r.indices.shape[1]] = is_newline[r.indices[0]]
                    feats = torch.where(slot[None, :, None], newline.to(feats.dtype), feats)
            f, per_image = self.split(r, feats, None)
            features += f
            reductions += per_image
        return Encoded(features=features, counts=counts, reductions=reductions)

    def _encode_crops(self, args: dict[str, Any], placeholder: Tensor, crops: list[int],
                      projected: Tensor, tower: dict[str, Tensor], start: int,
                      counts: list[int]) -> Encoded:
        """Crop layout, for methods that need whole partitions (HiRED, GlobalCom2): the
        method sees every image as ``[overview | crop 1 | ... | crop P]``, ``n`` tokens
        each (``keep`` counts or is a fraction of those ``(P + 1) n`` tokens), as their
        official LLaVA-NeXT code selects before packing. The kept tokens are then packed
        by the model (stitched, unpadded) without image newlines, as HiRED's code does;
        kept tokens the unpadding removes are dropped, so an image may keep fewer. The
        reductions recorded are what the LLM gets: the kept tokens, indexed in the packed
        layout (with newlines) of the model's own image features."""
        n = projected.shape[1]
        sizes = args["image_sizes"]
        text = self.text_signal(args, placeholder, counts) if self.wants("text") else None
        starts = [sum(crops[:i]) for i in range(len(crops))]
        masks, reductions = [], []
        for i, c in enumerate(crops):
            rows = slice(starts[i], starts[i] + c)
            tokens = projected[rows].reshape(1, c * n, -1)
            signals: dict[str, Any] = {}
            for name, value in tower.items():
                per = value[rows][..., start:]
                if name in ("cls_attn", "attn_received"):
                    per = per.movedim(0, -2).reshape(*per.shape[1:-1], c * n)[None]
                else:
                    per = per.reshape(1, c * n, -1)
                signals[name] = per
            ids = torch.arange(c, device=projected.device).repeat_interleave(n)[None]
            signals["partitions"] = Partitions(ids=ids, tiling=self._tiling(sizes[i]),
                                               grid=self.grid)
            if text is not None:
                signals["text"], signals["text_mask"] = text[0][i:i + 1], text[1][i:i + 1]
            r = self.run_method(tokens, self.resolve_keep(c * n), signals, has_cls=False)
            mask = torch.zeros(c * n, device=projected.device)
            mask[r.indices[0]] = 1.0
            masks.append(mask.reshape(c, n, 1))
        packed_masks = self._pack(masks, args, None)
        packed = self._pack(list(torch.split(projected, crops)), args, None)
        features = [f[m[:, 0] > 0.5] for f, m in zip(packed, packed_masks, strict=True)]
        # Where the kept tokens sit among the image's placeholders (newline slots: 0).
        slots = self._pack(masks, args, torch.zeros(1, device=projected.device))
        for f, slot in zip(features, slots, strict=True):
            idx = torch.nonzero(slot[:, 0] > 0.5).squeeze(1)[None]
            reductions.append((Reduction(tokens=f[None], indices=idx), None))
        return Encoded(features=features, counts=counts, reductions=reductions)

