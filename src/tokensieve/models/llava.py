"""LLaVA-1.5 adapter (``LlavaForConditionalGeneration`` / ``LlavaModel``).

Layout: a CLIP (or SigLIP) tower; the LLM's visual tokens are the projector applied to
``hidden_states[vision_feature_layer]`` (the output of encoder layer
``L + vision_feature_layer`` for a negative index), without the CLS token under the
"default" strategy. Every image fills one run of ``N`` placeholder tokens
(``image_token_id``), in the order the images appear over the flattened batch.

Signals, computed from the q/k projections of the feature layer (the layer whose output
is the feature; the tower keeps its SDPA / flash kernel):
``cls_attn`` (head-mean CLS attention row), ``attn_received`` (head- and query-mean
attention columns), ``keys`` / ``values`` (head-mean), ``grid`` (the patch grid), and
``text`` / ``text_mask``: the LLM input embeddings of the prompt's non-image tokens
(standing in for a CLIP text embedding, in the space of the projected visual tokens).
Each is computed only when the method lists it among its signals.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokensieve.core.reduction import Reduction
from tokensieve.models._base import Adapter, Encoded, get_state, register_adapter
from tokensieve.models._compat import hidden_states_request
from tokensieve.models._encoder import tower_has_cls
from tokensieve.models._signals import (
    attention_received,
    capture_projections,
    cls_attention,
    mean_keys,
)

ATTENTION_SIGNALS = ("cls_attn", "attn_received", "keys", "values")


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    signals = ("cls_attn", "attn_received", "keys", "values", "text", "text_mask", "grid")

    def __init__(self, model: torch.nn.Module, spec: Any, config: Any,
                 signal_layers: Any = None) -> None:
        super().__init__(model, spec, config, signal_layers)
        self.inner = model if hasattr(model, "vision_tower") else model.model
        vcfg = model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        self.grid = (side, side)

    # -- checks ---------------------------------------------------------------------------
    def _layers(self) -> Any:
        tower = self.inner.vision_tower
        enc = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        layers = getattr(enc, "layers", None)
        if layers is None or not hasattr(layers[0].self_attn, "q_proj"):
            raise ValueError(f"the llava adapter reads q/k from a CLIP/SigLIP tower; this model's "
                             f"vision tower is a {type(tower).__name__}")
        return layers

    def _feature_layer(self, args: dict[str, Any]) -> int:
        layer = args.get("vision_feature_layer")
        layer = self.model.config.vision_feature_layer if layer is None else layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: the llava adapter supports one "
                             "int feature layer")
        return layer

    def _strategy(self, args: dict[str, Any]) -> str:
        strategy = args.get("vision_feature_select_strategy")
        if strategy is None:
            strategy = self.model.config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={strategy!r}: expected 'default' or "
                             "'full'")
        return strategy

    def _attention_layer(self, layer: int) -> int:
        """Index of the encoder layer whose output is ``hidden_states[layer]``."""
        num = len(self._layers())
        idx = (layer if layer >= 0 else num + 1 + layer) - 1
        if not 0 <= idx < num:
            raise ValueError(f"vision_feature_layer={layer}: hidden state {idx + 1} is not the "
                             f"output of an encoder layer (the tower has {num}); the attention "
                             "signals need one")
        return idx

    def tokens_per_image(self, args: dict[str, Any] | None = None) -> int:
        full = self._strategy(args or {}) == "full"
        return self.grid[0] * self.grid[1] + int(full)

    def check(self) -> None:
        super().check()
        layer = self._feature_layer({})
        self._strategy({})
        if any(self.wants(s) for s in ATTENTION_SIGNALS):
            idx = self._attention_layer(layer)
            self.layer_plan(len(self._layers()), idx)
        self.resolve_keep(self.tokens_per_image())

    # -- the call -------------------------------------------------------------------------
    def run_tower(self, args: dict[str, Any], pixel_values: Tensor,
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the tower on ``pixel_values`` ``[C, 3, H, W]`` with the q/k hooks the method
        needs. Returns the feature layer's hidden states ``[C, 1 + N, Dv]`` and the
        attention signals aligned with all ``1 + N`` tokens (index 0: CLS)."""
        layer = self._feature_layer(args)
        want_attn = any(self.wants(s) for s in ATTENTION_SIGNALS)
        idx = self._attention_layer(layer) if want_attn else -1
        plan = self.layer_plan(len(self._layers()), idx) if want_attn else None
        layers = {idx, *(plan or [])} if want_attn else set()
        names = ["q_proj", "k_proj"] + (["v_proj"] if self.wants("values") else [])
        captured, handles = capture_projections(
            {i: self._layers()[i].self_attn for i in layers}, names)
        try:
            # Keep only the feature layer's hidden state, as the model itself asks for.
            out = self.inner.vision_tower(
                pixel_values, output_hidden_states=hidden_states_request(layer), return_dict=True)
        finally:
            for h in handles:
                h.remove()
        signals: dict[str, Tensor] = {}
        if want_attn:
            attn = self._layers()[idx].self_attn
            heads, scale = attn.num_heads, attn.scale
            for name, fn in (("cls_attn", cls_attention), ("attn_received", attention_received)):
                if self.wants(name):
                    per = [fn(captured[i]["q_proj"], captured[i]["k_proj"], heads, scale)
                           for i in (plan or [idx])]
                    signals[name] = per[0] if plan is None else torch.stack(per, 1)
            if self.wants("keys"):
                signals["keys"] = mean_keys(captured[idx]["k_proj"], heads)
            if self.wants("values"):
                signals["values"] = mean_keys(captured[idx]["v_proj"], heads)
        return out.hidden_states[layer], signals

    # -- in-encoder methods ------------------------------------------------------------------
    def encoder_tower(self) -> tuple[torch.nn.ModuleList, bool, int]:
        """``(layers, has_cls, until)`` for the in-encoder stage: the tower's layers, whether
        token 0 is CLS, and the layer whose output is the feature (``vision_feature_layer``
        -2: layer L-2; later layers' reductions would be wasted, so none happen there)."""
        layers = self._layers()
        until = self._attention_layer(self._feature_layer({}))
        self._strategy({})
        return layers, tower_has_cls(self.inner.vision_tower), until

    def _encode_in_tower(self, args: dict[str, Any]) -> Encoded:
        """Images through the tower reduced by the in-encoder stage: the feature layer's
        output has ``T' < 1 + N`` tokens (CLS first); the "default" strategy drops it, the
        projector maps the rest, and each image's placeholders are cut to that count. The
        LLM gets the surviving tokens in their original order (a merged token at the place
        of its surviving member). Adaptive counts (ATS): each image brings its real tokens
        (the padding of the batch dropped). Per image: a ``Reduction`` over the ``N`` LLM
        tokens (``positions``, ``sizes``, ``assignment``; ``indices=None``)."""
        layer = self._feature_layer(args)
        start = 0 if self._strategy(args) == "full" else 1
        out = self.inner.vision_tower(args["pixel_values"],
                                      output_hidden_states=hidden_states_request(layer),
                                      return_dict=True)
        hidden = out.hidden_states[layer]  # [I, T', Dv]
        stage = get_state(self.model).encoder
        trace = stage.last.at(self._attention_layer(layer))
        feats = self.inner.multi_modal_projector(hidden[:, start:])  # [I, T' - start, D]
        n_llm = self.tokens_per_image(args)
        per, rows = [], []
        for i in range(feats.shape[0]):
            # adaptive counts (ATS): the image's real tokens, its padding dropped
            real = slice(None) if trace.mask is None else trace.mask[i, start:]
            rows.append(feats[i][real])
            if trace.sizes is None:
                r = Reduction(tokens=feats[i:i + 1], indices=torch.arange(
                    feats.shape[1], device=feats.device).unsqueeze(0))
            else:
                src = trace.source[i:i + 1, start:]
                r = Reduction(tokens=rows[-1].unsqueeze(0),
                              positions=trace.positions[i, start:][real].unsqueeze(0) - start,
                              sizes=trace.sizes[i, start:][real].unsqueeze(0),
                              assignment=torch.where(src >= 0, src - start, -1))
            per.append((r, self.grid if trace.sizes is None and start == 1 else None))
        return Encoded(features=rows, counts=[n_llm] * feats.shape[0], reductions=per)

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        if args.get("image_sizes") is not None:
            raise ValueError("image_sizes: the llava adapter supports fixed-size (LLaVA-1.5) "
                             "images")
        if self.spec.stage == "encoder":
            return self._encode_in_tower(args)
        hidden, tower_signals = self.run_tower(args, args["pixel_values"])  # [I, 1 + N, Dv]
        full = self._strategy(args) == "full"
        start = 0 if (full or self.use_cls()) else 1
        tokens = hidden[:, start:]
        n_llm = self.tokens_per_image(args)
        signals: dict[str, Any] = {k: v[..., start:] if k in ("cls_attn", "attn_received")
                                   else v[:, start:] for k, v in tower_signals.items()}
        grid = self.grid if tokens.shape[1] == self.grid[0] * self.grid[1] else None
        signals["grid"] = grid
        counts = [n_llm] * tokens.shape[0]
        if self.wants("text"):
            signals["text"], signals["text_mask"] = self.text_signal(args, placeholder, counts)
        k_keep = self.resolve_keep(n_llm)
        projector = self.inner.multi_modal_projector
        if self.spec.features == "projected":
            tokens = projector(tokens)
            r = self.run_method(tokens, k_keep, signals, has_cls=start == 0)
            feats = r.tokens
        else:
            r = self.run_method(tokens, k_keep, signals, has_cls=start == 0)
            feats = projector(r.tokens)
        features, per_image = self.split(r, feats, grid)
        return Encoded(features=features, counts=counts, reductions=per_image)
