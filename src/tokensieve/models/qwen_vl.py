"""Qwen2-VL / Qwen2.5-VL adapter (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` and their ``*Model`` bases).

Layout: a ViT over ``patch x patch`` patches with 2D rotary positions and no CLS token;
the patch merger turns each ``m x m`` group of patches (``m = spatial_merge_size``, 2)
into one LLM token: ``mlp(norm(x).view(-1, m*m*D))``. An image of grid ``(t, h, w)``
gives ``t*h*w / m^2`` tokens in raster order of the merged ``(h/m, w/m)`` grid; images
differ in size, so methods run once per group of equally sized images. Qwen2.5-VL runs
most blocks with window attention on a window-ordered sequence (undone here).

Features: "projected" methods get the merger outputs (the LLM's tokens); "vision"
methods get the merger's normalised, grouped input ``norm(x).view(-1, m*m*D)`` (the
features right before the projector MLP), and the MLP is applied to their output.

Signals, from the q/k of the feature block (the last full-attention block, whose output
is merged; other blocks with ``signal_layers``), with the tower on SDPA:
``attn_received`` (head- and query-mean attention received, from q/k after the vision
rotary embedding, within the block's own attention segments: the image, or its windows
for window-attention blocks; summed over each merged group), ``keys`` / ``values``
(head-mean, before the rotary embedding, averaged over each group), ``grid`` (the merged
grid), ``text`` / ``text_mask`` (LLM input embeddings of the non-image prompt tokens). No
``cls_attn``: there is no CLS token.

Positions (M-RoPE): every kept token keeps the original ``(t, h, w)`` position of the
source position the reduction gives it (``Reduction.positions``); text keeps its original
positions, so decoding continues exactly where the untouched model would, and
``rope_deltas`` is set for the shortened sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokensieve.models._base import Adapter, Encoded, register_adapter
from tokensieve.models._signals import received_sums, this_thread
from tokensieve.models._surgery import SurgeryPlan
from tokensieve.models._video import Clip

ATTENTION_SIGNALS = ("attn_received", "keys", "values")


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Vision rotary embedding on ``x`` ``[S, H, Dh]`` (float32), as the tower applies it."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    x = x.float()
    return x * cos + _rotate_half(x) * sin


@register_adapter
class QwenVLAdapter(Adapter):
    family = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel",
                     "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    signals = ("attn_received", "keys", "values", "text", "text_mask", "grid", "frames")
    visual_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    needs_positions = True
    has_video = True

    def __init__(self, model: torch.nn.Module, spec: Any, config: Any,
                 signal_layers: Any = None) -> None:
        super().__init__(model, spec, config, signal_layers)
        self.inner = model if hasattr(model, "visual") else model.model
        visual = self.inner.visual
        self.merge = int(visual.spatial_merge_size)
        full = getattr(visual, "fullatt_block_indexes", None)
        self.signal_block = max(full) if full else len(visual.blocks) - 1

    def check(self) -> None:
        super().check()
        if self.spec.cls_token and self.config.options.get("has_cls"):
            raise ValueError(f"has_cls=True: the {self.family} vision tower has no CLS token")
        if self.wants("attn_received"):
            self.layer_plan(len(self.inner.visual.blocks), self.signal_block)

    # -- the tower, for in-encoder methods -------------------------------------------------
    def encoder_tower(self) -> tuple[Any, bool, int]:
        """``(layers, has_cls, until)`` for the in-encoder stage: the vision blocks, no CLS,
        the last block (its output is merged). Only methods that rebuild the whole grid
        (``expedit``) run here, on the packed sequence (:meth:`packed_tower`)."""
        blocks = self.inner.visual.blocks
        return blocks, False, len(blocks) - 1

    def packed_tower(self) -> Any:
        """The tower's packed layout for the in-encoder stage: one attention segment per
        image frame, its patches' sequence indices in raster order (block-major merge units,
        and Qwen2.5-VL's window order), and the window-attention blocks."""
        from tokensieve.models._encoder import PackedTower

        visual = self.inner.visual
        full = getattr(visual, "fullatt_block_indexes", None)
        windowed = frozenset() if full is None else frozenset(
            i for i in range(len(visual.blocks)) if i not in full)
        return PackedTower(tower=visual, layout=self._packed_layout, windowed=windowed)

    def _packed_layout(self, thw: Tensor) -> list[tuple[Tensor, int, int]]:
        """Per frame of the images / videos of grids ``thw``, in the tower's sequence order:
        ``(order, h, w)``, the sequence index of each of its patches in raster order."""
        from transformers.vision_utils import get_vision_position_ids

        unit = self.merge * self.merge
        pos = get_vision_position_ids(thw, self.merge)  # [S, 2] (row, col), block-major
        reverse = self._window_reverse(thw)
        if reverse is not None:  # the sequence is in window order (Qwen2.5-VL)
            pos = pos.reshape(-1, unit, 2)[torch.argsort(reverse)].reshape(-1, 2)
        out, start = [], 0
        for t, h, w in thw.tolist():
            for _ in range(int(t)):
                rows = pos[start:start + h * w]
                order = torch.argsort(rows[:, 0] * w + rows[:, 1]) + start
                if not torch.equal((rows[:, 0] * w + rows[:, 1]).sort().values,
                                   torch.arange(h * w, device=rows.device)):
                    raise ValueError("qwen2-vl: the tower's sequence does not keep each frame's "
                                     "patches together; its layout is not supported")
                out.append((order, int(h), int(w)))
                start += h * w
        return out

    # -- encoding -------------------------------------------------------------------------
    def _window_reverse(self, thw: Tensor) -> Tensor | None:
        """Permutation from the tower's window order back to raster order (merged-group
        level), or None when the tower does not reorder (Qwen2-VL)."""
        visual = self.inner.visual
        if not hasattr(visual, "window_size"):
            return None
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            thw, spatial_merge_size=self.merge, window_size=visual.window_size,
            patch_size=visual.patch_size)
        return torch.argsort(window_index)

    def _run_visual(self, pixel_values: Tensor, thw: Tensor, features: str,
                    ) -> tuple[Tensor, dict[str, Tensor], list[int]]:
        """The tower on images or videos of grids ``thw``: the LLM tokens (``features``
        "projected": merger outputs) or the merger's grouped input ("vision"), ``[sum N_i,
        D]`` in raster order, the patch-level signals and each item's token count."""
        visual = self.inner.visual
        unit = self.merge * self.merge
        counts = [int(c) for c in (thw.prod(-1) // unit).tolist()]
        want_attn = any(self.wants(s) for s in ATTENTION_SIGNALS)
        depth = len(visual.blocks)
        plan = self.layer_plan(depth, self.signal_block) if self.wants("attn_received") else None
        blocks = {self.signal_block, *(plan or [])} if want_attn else set()
        captured: dict[Any, Any] = {i: {} for i in blocks}
        handles = [visual.merger.register_forward_pre_hook(
            this_thread(lambda _m, a: captured.__setitem__("merger_in", a[0])))]
        for i in blocks:
            attn = visual.blocks[i].attn

            def pre(_m: Any, _a: Any, kw: dict[str, Any], i: int = i) -> None:
                captured[i]["rope"] = kw.get("position_embeddings")
                captured[i]["cu"] = kw.get("cu_seqlens")

            def qkv_hook(_m: Any, _i: Any, out: Tensor, i: int = i) -> None:
                captured[i]["qkv"] = out.detach()

            handles.append(attn.register_forward_pre_hook(this_thread(pre), with_kwargs=True))
            handles.append(attn.qkv.register_forward_hook(this_thread(qkv_hook)))
        try:
            out = visual(pixel_values.type(visual.dtype), grid_thw=thw)
        finally:
            for h in handles:
                h.remove()
        reverse = self._window_reverse(thw)

        def raster(x: Tensor) -> Tensor:
            """Patch-level rows in window order -> raster order."""
            if reverse is None:
                return x
            return x.reshape(-1, unit, *x.shape[1:])[reverse].reshape(x.shape)

        if features == "vision":
            x = raster(captured["merger_in"])
            tokens_all = visual.merger.ln_q(x).reshape(-1, visual.merger.hidden_size)
        else:
            tokens_all = out.pooler_output  # [sum N_i, D], raster order
        patch_signals = self._patch_signals(captured, plan, raster) if want_attn else {}
        return tokens_all, patch_signals, counts

    def _item_signals(self, patch_signals: dict[str, Tensor], start: int, n: int,
                      queries: int) -> dict[str, Tensor]:
        """Token-level signals of the item whose tokens are ``start .. start + n``:
        ``attn_received`` is the mean over its ``queries`` merged tokens' patches (one
        attention segment), keys / values are averaged over each merged group."""
        unit = self.merge * self.merge
        out = {}
        for name, per_patch in patch_signals.items():
            rows = per_patch[..., start * unit:(start + n) * unit, :]  # [(L,) n*unit, C]
            grouped = rows.reshape(*rows.shape[:-2], n, unit, rows.shape[-1])
            if name == "attn_received":
                out[name] = grouped.sum(-2)[..., 0] / (unit * queries)
            else:
                out[name] = grouped.mean(-2)
        return out

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        pixel_values, thw = args["pixel_values"], args.get("image_grid_thw")
        if thw is None:
            raise ValueError("image_grid_thw: the qwen2-vl adapter needs the image grids "
                             "(returned by the processor with pixel_values)")
        visual = self.inner.visual
        tokens_all, patch_signals, counts = self._run_visual(pixel_values, thw,
                                                             self.spec.features)
        text = self.text_signal(args, placeholder, counts) if self.wants("text") else None
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        features: list[Tensor | None] = [None] * len(counts)
        reductions: list[Any] = [None] * len(counts)
        positions: list[Tensor | None] = [None] * len(counts)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, g in enumerate(thw.tolist()):
            groups.setdefault(tuple(g), []).append(i)
        for (t, h, w), members in groups.items():
            n = counts[members[0]]
            grid = (t * h // self.merge, w // self.merge)
            tokens = torch.stack([tokens_all[starts[i]:starts[i + 1]] for i in members])
            per_item = [self._item_signals(patch_signals, starts[i], n, n) for i in members]
            signals: dict[str, Any] = {name: torch.stack([p[name] for p in per_item])
                                       for name in patch_signals}
            signals["grid"] = grid
            if text is not None:
                signals["text"], signals["text_mask"] = text[0][members], text[1][members]
            k = self.resolve_keep(n)
            r = self.run_method(tokens, k, signals, has_cls=False)
            feats = r.tokens if self.spec.features == "projected" else visual.merger.mlp(r.tokens)
            if r.positions is None:
                raise ValueError(f"method {self.spec.name!r} gives no source positions for its "
                                 "tokens; the qwen2-vl adapter needs them for M-RoPE")
            split_feats, per = self.split(r, feats, grid)
            for j, i in enumerate(members):
                features[i] = split_feats[j]
                reductions[i] = per[j]
                pos = r.positions[j] if r.mask is None else r.positions[j][r.mask[j]]
                positions[i] = pos
        return Encoded(features=features, counts=counts, reductions=reductions,  # type: ignore
                       positions=positions)  # type: ignore[arg-type]

    # -- videos ---------------------------------------------------------------------------
    def encode_clips(self, args: dict[str, Any]) -> list[Clip]:
        """Each video as ``T`` frames (temporal patches) of the merged ``(h/m, w/m)`` grid;
        the tower attends within each frame, so ``attn_received`` is per frame."""
        thw = args.get("video_grid_thw")
        if thw is None:
            raise ValueError("video_grid_thw: the qwen2-vl adapter needs the video grids "
                             "(returned by the processor with pixel_values_videos)")
        tokens_all, patch_signals, counts = self._run_visual(args["pixel_values_videos"], thw,
                                                             "projected")
        clips, start = [], 0
        for (t, h, w), n in zip(thw.tolist(), counts, strict=True):
            signals = self._item_signals(patch_signals, start, n, n // t)
            clips.append(Clip(tokens=tokens_all[start:start + n], frames=int(t),
                              grid=(h // self.merge, w // self.merge), signals=signals))
            start += n
        return clips

    def image_features(self, args: dict[str, Any]) -> list[Tensor]:
        out = self.inner.get_image_features(args["pixel_values"], args.get("image_grid_thw"),
                                            return_dict=True)
        return list(out.pooler_output)

    def video_features(self, args: dict[str, Any]) -> Any:
        return self.inner.get_video_features(args["pixel_values_videos"],
                                             args.get("video_grid_thw"), return_dict=True)

    def video_outputs(self, features: list[Tensor]) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=list(features))

    def _patch_signals(self, captured: dict[Any, Any], plan: list[int] | None,
                       raster: Any) -> dict[str, Tensor]:
        """Patch-level signals in raster order: ``attn_received`` ``[(L,) S, 1]`` (column
        sums over heads and queries, divided by the head count), ``keys`` / ``values``
        ``[S, Dh]`` (head-mean, before the rotary embedding)."""
        visual = self.inner.visual
        out: dict[str, Tensor] = {}
        heads = visual.blocks[self.signal_block].attn.num_heads

        def split(i: int) -> tuple[Tensor, Tensor, Tensor]:
            qkv = captured[i]["qkv"]
            q, k, v = qkv.reshape(qkv.shape[0], 3, heads, -1).unbind(1)
            return q, k, v

        if self.wants("attn_received"):
            per = []
            for i in plan or [self.signal_block]:
                q, k, _ = split(i)
                cos, sin = captured[i]["rope"]
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
                s = q.shape[0]
                bounds = [int(b) for b in captured[i]["cu"].tolist()]
                sums = received_sums(q.reshape(s, -1), k.reshape(s, -1), heads,
                                     q.shape[-1] ** -0.5, bounds)
                per.append(raster(sums / heads).unsqueeze(-1))
            out["attn_received"] = per[0] if plan is None else torch.stack(per)
        _, k, v = split(self.signal_block)
        if self.wants("keys"):
            out["keys"] = raster(k.float().mean(1))
        if self.wants("values"):
            out["values"] = raster(v.float().mean(1))
        return out

    # -- positions ------------------------------------------------------------------------
    def _original_positions(self, args: dict[str, Any]) -> Tensor:
        """The untouched model's M-RoPE positions ``[3, B, T]`` of the full prompt."""
        ids = args.get("input_ids")
        if ids is None:
            raise ValueError("the qwen2-vl adapter needs input_ids (or position_ids) to place "
                             "the kept tokens' M-RoPE positions")
        types = args.get("mm_token_type_ids")
        if types is None:
            types = torch.zeros_like(ids, dtype=torch.int)
            types[ids == self.model.config.image_token_id] = 1
            video = getattr(self.model.config, "video_token_id", None)
            if video is not None:
                types[ids == video] = 2
        extra = {}
        if args.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = args["second_per_grid_ts"]
        pos, _ = self.inner.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=args.get("image_grid_thw"),
            video_grid_thw=args.get("video_grid_thw"), attention_mask=args.get("attention_mask"),
            **extra)
        return pos

    def continue_positions(self, pos: Tensor, plan: SurgeryPlan) -> Tensor:
        """Kept tokens keep their M-RoPE positions, so the caller's positions of later tokens
        stand; only a leading text-position row (4 rows) is re-indexed contiguously."""
        if pos.dim() == 3 and pos.shape[0] == 4:
            return torch.cat([super().continue_positions(pos[0], plan).unsqueeze(0),
                              pos[1:].expand(-1, max(pos.shape[1], plan.shift.shape[0]), -1)])
        return pos

    def fix_positions(self, args: dict[str, Any], new: dict[str, Any], plan: SurgeryPlan,
                      enc: Encoded, generating: bool) -> None:
        given = args.get("position_ids")
        pos = self._original_positions(args) if given is None else given
        if pos.dim() == 2:
            pos = pos.unsqueeze(0).expand(3, -1, -1)
        # Source column of each new column: kept placeholders take the column their
        # reduction position stands for inside the image's run.
        g = plan.gather
        img = torch.gather(plan.image_of, 1, g)
        rank = torch.gather(plan.rank, 1, g)
        is_image = (img >= 0) & plan.valid
        table = torch.nn.utils.rnn.pad_sequence(
            [p.to(g.device) for p in enc.positions or []], batch_first=True, padding_value=0)
        src_rank = table[img.clamp(min=0), rank.clamp(min=0)]
        src = torch.where(is_image, g - rank + src_rank, g)
        idx = src.unsqueeze(0).expand(pos.shape[0], -1, -1).to(pos.device)
        new_pos = torch.gather(pos, 2, idx).masked_fill(~plan.valid.to(pos.device), 0)
        if new_pos.shape[0] == 4:  # a leading text-position row: re-index it contiguously
            text = (pos[0] - plan.dropped_before.to(pos.device)).unsqueeze(0)
            new_pos[0] = plan.take(text, 0, dim=-1)[0]
        mrope = new_pos[-3:]
        real = plan.valid.to(pos.device)
        biggest = mrope.masked_fill(~real.unsqueeze(0), -1).amax(dim=(0, 2))
        self.inner.rope_deltas = (biggest + 1 - real.sum(dim=1)).unsqueeze(1)
        if generating and new_pos.shape[0] == 3:
            text_pos = (real.long().cumsum(-1) - 1).masked_fill(~real, 0)
            new_pos = torch.cat([text_pos.unsqueeze(0), new_pos])
        new["position_ids"] = new_pos
