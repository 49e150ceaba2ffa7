"""vLLM's LLaVA with a tokensieve method between the vision tower and the LLM.

Imported by vLLM when it resolves ``TokensieveLlavaForConditionalGeneration`` (never by
``import tokensieve``). The encoding follows ``tokensieve.models.llava.LlavaAdapter.encode``
(same feature layer, CLS handling, signals, features before or after the projector, one
``tokensieve.reduce`` call), on vLLM's modules: the tower is vLLM's CLIP / SigLIP, built
only up to the feature layer, and q / k come from forward hooks on its fused ``qkv_proj``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokensieve.integrations.vllm._common import (
    BudgetedInfo,
    check_exact,
    gather_heads,
    reduce_config,
)
from tokensieve.integrations.vllm.settings import VllmSieve, from_config
from tokensieve.models._base import Adapter
from tokensieve.models._signals import (
    attention_received,
    cls_attention,
    mean_keys,
    this_thread,
)

ATTENTION_SIGNALS = ("cls_attn", "attn_received", "keys", "values")
#: Parts of a CLIP / SigLIP tower that transformers 5 saves without ``vision_model.``.
_TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")


def tower_weight_name(name: str) -> str:
    """``vision_tower.encoder...`` (transformers 5) -> ``vision_tower.vision_model.encoder...``
    (what vLLM's CLIP / SigLIP tower loads); other names unchanged."""
    for prefix in ("model.vision_tower.", "vision_tower."):
        if name.startswith(prefix) and name[len(prefix):].startswith(_TOWER_PARTS):
            return prefix + "vision_model." + name[len(prefix):]
    return name


class TokensieveLlavaProcessingInfo(BudgetedInfo, LlavaProcessingInfo):
    """vLLM's LLaVA processing info with each image's placeholder count cut to the budget
    (checked when vLLM builds the processor, before any request)."""


class _Sieve(Adapter):
    """The adapter machinery of ``ts.apply`` (budget, CLS option, signal layers, the
    ``reduce`` call) over vLLM's LLaVA; holds no model logic of its own."""

    family = "llava"
    signals = ("cls_attn", "attn_received", "keys", "values", "grid")


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor,
                                        info=TokensieveLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokensieveLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's ``LlavaForConditionalGeneration`` reducing each image's visual tokens with the
    method in ``config.tokensieve`` (see :mod:`tokensieve.integrations.vllm`)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.sieve: VllmSieve | None = from_config(self.config)
        self._adapter: _Sieve | None = None
        if self.sieve is not None:
            self._adapter = self._make_adapter(self.sieve)

    # -- checks ---------------------------------------------------------------------------
    def _tower_layers(self) -> Any:
        model = getattr(self.vision_tower, "vision_model", None)
        layers = getattr(getattr(model, "encoder", None), "layers", None)
        if layers is None or not hasattr(layers[0].self_attn, "qkv_proj"):
            raise ValueError("tokensieve: the vLLM plugin reads q/k from a CLIP / SigLIP tower; "
                             f"this model's tower is a {type(self.vision_tower).__name__}")
        return layers

    def _feature_index(self) -> int:
        """0-based index of the encoder layer whose output is the LLM's feature."""
        layer = self.config.vision_feature_layer
        depth = self.config.vision_config.num_hidden_layers
        if not isinstance(layer, int):
            raise ValueError(f"tokensieve: vision_feature_layer={layer!r}: the plugin supports "
                             "one int feature layer")
        return (layer if layer >= 0 else depth + 1 + layer) - 1

    def _make_adapter(self, sieve: VllmSieve) -> _Sieve:
        spec = sieve.spec
        adapter = _Sieve(self, spec, reduce_config(sieve), sieve.signal_layers)
        adapter.check_signals()
        strategy = self.config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"tokensieve: vision_feature_select_strategy={strategy!r}: expected "
                             "'default' or 'full'")
        layers = self._tower_layers()
        idx = self._feature_index()
        if any(adapter.wants(s) for s in ATTENTION_SIGNALS):
            plan = adapter.layer_plan(self.config.vision_config.num_hidden_layers, idx) or []
            beyond = sorted(i for i in {idx, *plan} if i >= len(layers))
            if beyond:
                raise ValueError(
                    f"tokensieve: method {spec.name!r} reads attention of tower layer(s) "
                    f"{beyond}, but vLLM builds the tower only up to the feature layer "
                    f"({len(layers) - 1}); pass signal_layers within it")
        sieve.kept(self._tokens_per_image())
        return adapter

    def _tokens_per_image(self) -> int:
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        return side * side + int(self.config.vision_feature_select_strategy == "full")

    # -- weights --------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """vLLM's loading, with the tower names of transformers-5 checkpoints mapped."""
        return super().load_weights((tower_weight_name(n), w) for n, w in weights)

    # -- encoding -------------------------------------------------------------------------
    def _process_image_input(self, image_input: Any) -> Any:
        if self._adapter is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        return self._encode_reduced(pixel_values)

    def _run_tower(self, pixel_values: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The feature layer's hidden states ``[I, T, Dv]`` (CLS first) and the attention
        signals over all ``T`` tokens, from q / k captured on the fused projections."""
        adapter = self._adapter
        assert adapter is not None
        layers = self._tower_layers()
        idx = self._feature_index()
        want_attn = any(adapter.wants(s) for s in ATTENTION_SIGNALS)
        plan = adapter.layer_plan(self.config.vision_config.num_hidden_layers, idx) \
            if want_attn else None
        needed = sorted({idx, *(plan or [])}) if want_attn else []
        captured: dict[int, Tensor] = {}
        handles = []
        for i in needed:
            def hook(_m: object, _i: object, out: Any, i: int = i) -> None:
                captured[i] = (out[0] if isinstance(out, tuple) else out).detach()
            handles.append(layers[i].self_attn.qkv_proj.register_forward_hook(this_thread(hook)))
        try:
            hidden = self.vision_tower(pixel_values, feature_select_strategy="full")
        finally:
            for h in handles:
                h.remove()
        signals: dict[str, Tensor] = {}
        if not want_attn:
            return hidden, signals
        qkv = {i: self._split_qkv(layers[i].self_attn, captured[i]) for i in needed}
        attn = layers[idx].self_attn
        heads, scale = attn.num_heads, attn.scale
        for name, fn in (("cls_attn", cls_attention), ("attn_received", attention_received)):
            if adapter.wants(name):
                per = [fn(qkv[i][0], qkv[i][1], heads, scale) for i in (plan or [idx])]
                signals[name] = per[0] if plan is None else torch.stack(per, 1)
        if adapter.wants("keys"):
            signals["keys"] = mean_keys(qkv[idx][1], heads)
        if adapter.wants("values"):
            signals["values"] = mean_keys(qkv[idx][2], heads)
        return hidden, signals

    @staticmethod
    def _split_qkv(attn: Any, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v ``[I, T, H*Dh]`` over all heads from a fused projection's output (the
        heads of every tensor-parallel rank gathered)."""
        q, k, v = gather_heads(attn, qkv, interleaved=True).chunk(3, dim=-1)
        return q, k, v

    def _encode_reduced(self, pixel_values: Tensor) -> list[Tensor]:
        """Per image, the reduced LLM visual tokens ``[K, D]`` (``K``: the budget, the
        placeholder count the processor wrote). Each image is reduced on its own, so an
        answer does not depend on which requests share a batch."""
        adapter = self._adapter
        assert adapter is not None and self.sieve is not None
        hidden, tower_signals = self._run_tower(pixel_values)  # [I, 1 + N, Dv]
        full = self.config.vision_feature_select_strategy == "full"
        start = 0 if (full or adapter.use_cls()) else 1
        tokens = hidden[:, start:]
        signals: dict[str, Any] = {k: v[..., start:] if k in ("cls_attn", "attn_received")
                                   else v[:, start:] for k, v in tower_signals.items()}
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        grid = (side, side) if tokens.shape[1] == side * side else None
        n_llm = self._tokens_per_image()
        k_keep = self.sieve.kept(n_llm)
        projector = self.multi_modal_projector
        if adapter.spec.features == "projected":
            tokens = projector(tokens)
        out = []
        for i in range(tokens.shape[0]):
            one = {name: v[i:i + 1] for name, v in signals.items()}
            r = adapter.run_method(tokens[i:i + 1], k_keep, {**one, "grid": grid},
                                   has_cls=start == 0)
            check_exact(adapter.spec.name, r.tokens.shape[1], k_keep, r.mask is not None)
            feats = r.tokens[0]
            out.append(feats if adapter.spec.features == "projected" else projector(feats))
        return out
