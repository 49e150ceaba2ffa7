"""Analytic compute and KV-cache accounting of a vision-language model.

Convention
----------
Every count here is in **multiply-adds counted once** (MACs), the convention of the
token-reduction literature: FastV (Chen et al., ECCV 2024, Eq. 5) writes the cost of one
transformer layer over ``n`` tokens as ``C(n) = 4 n d^2 + 2 n^2 d + 2 n d m`` and calls it
"FLOPs"; PyramidDrop, SparseVLM and VisionZip tables ("3.82 TFLOPs" for LLaVA-1.5-7B at 576
tokens) use the same unit. A hardware FLOP count is twice that (``Cost.hardware_flops``).

What is counted: every matrix multiplication (projections, attention scores ``Q K^T`` and
``A V``, MLP, patch embedding, projector, LM head). Not counted: norms, activations, softmax,
residual adds, RoPE, embedding look-ups (all ``O(n d)``).

Per decoder layer over ``n`` tokens attending to ``c`` keys (``c = n`` in prefill):

* projections: ``n d (h + 2 h_kv) d_h + n h d_h d`` (q, k, v, o). With grouped-query attention
  (``h_kv < h``) the k/v projections shrink to ``h_kv d_h`` outputs; with ``h = h_kv`` and
  ``h d_h = d`` this is FastV's ``4 n d^2``.
* attention: ``2 n c h d_h`` (scores and weighted values; FastV's ``2 n^2 d``). Causal masking
  is not discounted (as in FastV); kernels that skip masked blocks do about half of it.
* MLP: ``2 n d m`` for a plain two-matrix MLP (CLIP, GPT-2), ``3 n d m`` for a gated MLP
  (SwiGLU/GeGLU: gate, up and down projections: Llama, Vicuna, Mistral, Qwen2). FastV's
  Eq. 5 writes ``2 n d m`` even for Llama; PyramidDrop's 3.82 T for LLaVA-1.5-7B counts
  the three matrices (see ``tests/test_bench_flops.py``).

Where a reduction acts (``Plan``):

* ``pre-llm``: the vision tower runs on all tokens; the LLM sees ``k`` visual tokens instead
  of ``N``; the projector runs on ``N`` (methods on projected tokens: FasterVLM, DivPrune)
  or, with ``before_projector``, on ``k`` (methods on the tower's features: VisionZip).
* ``encoder``: encoder layers ``>= layer`` run on ``k`` patch tokens (plus CLS if the tower has
  one); projector and LLM see ``k``. Progressive in-encoder methods (ToMe's ``r`` per layer,
  EViT's stages) give every tower layer's tokens (``Plan.in_encoder_layers``): a layer that
  reduces runs its attention on the tokens it gets and its MLP on the ones it leaves. The
  methods' own matching / ranking (ToMe's similarity matrix, EViT's CLS row) is not counted.
* ``llm``: decoder layers ``< layer`` see all ``N`` visual tokens, layers ``>= layer`` see ``k``
  (FastV ``K``); their KV cache holds ``k`` visual tokens.

KV-cache bytes: ``2 (K and V) * sum over layers of (h_kv d_h tokens_l) * bytes per element``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

# Text model types whose MLP is gated (three matrices). Unknown types: see ``_is_gated``.
_UNGATED_TYPES = frozenset({
    "gpt2", "opt", "phi", "gpt_neox", "gptj", "bloom", "falcon", "codegen", "mpt", "bert",
    "clip_vision_model", "clip_text_model", "siglip_vision_model", "siglip_text_model",
    "gpt_bigcode", "starcoder2",
})
_GATED_ACTS = ("silu", "swish", "swiglu", "geglu", "gelu_pytorch_tanh")


def _is_gated(cfg: Any) -> bool:
    """Whether a decoder's MLP has a gate projection (three matrices instead of two).

    Decided by ``model_type``: known plain-MLP families (GPT-2, OPT, Phi-1/2, GPT-NeoX,
    Falcon, ...) are not gated; every other decoder type (Llama, Mistral, Qwen2, Gemma, Phi-3,
    InternLM2, ...) is. Override with ``StackDims.from_config(cfg, gated=...)``.
    """
    model_type = str(getattr(cfg, "model_type", "") or "")
    if model_type in _UNGATED_TYPES:
        return False
    if model_type:
        return True
    act = str(getattr(cfg, "hidden_act", "") or "")
    return act in _GATED_ACTS


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: expected a non-negative int")
    return value


@dataclass(frozen=True)
class StackDims:
    """Sizes of one transformer stack (a vision tower or a decoder).

    Attributes:
        layers: number of layers.
        hidden: model width ``d``.
        heads: query heads ``h``.
        kv_heads: key/value heads ``h_kv`` (``< heads`` for grouped-query attention).
        head_dim: ``d_h`` (``hidden // heads`` unless the config says otherwise).
        intermediate: MLP width ``m``.
        gated: three MLP matrices (gate, up, down) instead of two.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool = False

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate"):
            if _positive_int(name, getattr(self, name)) == 0 and name != "layers":
                raise ValueError(f"{name}=0: expected a positive int")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")

    @classmethod
    def from_config(cls, cfg: Any, gated: bool | None = None) -> StackDims:
        """Read a Hugging Face text or vision config (Llama/Qwen2/Mistral/CLIP/SigLIP...).

        ``num_key_value_heads`` (GQA) defaults to ``num_attention_heads``; ``head_dim`` to
        ``hidden_size // num_attention_heads``; ``gated`` to the model type's MLP kind
        (vision towers are plain two-matrix MLPs).
        """
        try:
            hidden = int(cfg.hidden_size)
            heads = int(cfg.num_attention_heads)
            layers = int(cfg.num_hidden_layers)
            inter = int(cfg.intermediate_size)
        except AttributeError as e:
            raise ValueError(f"config {type(cfg).__name__} lacks {e.name!r}: expected "
                             "hidden_size, num_attention_heads, num_hidden_layers and "
                             "intermediate_size") from None
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        if gated is None:
            gated = _is_gated(cfg)
        return cls(layers=layers, hidden=hidden, heads=heads, kv_heads=int(kv),
                   head_dim=int(head_dim), intermediate=inter, gated=bool(gated))

    def layer_macs(self, n: int, context: int | None = None, mlp_tokens: int | None = None,
                   ) -> int:
        """MACs of one layer for ``n`` query tokens attending to ``context`` keys (default
        n); ``mlp_tokens``: tokens the MLP runs on when the layer reduces between its
        attention and its MLP (ToMe, EViT; default n)."""
        c = n if context is None else context
        d, dh, h, hkv, m = self.hidden, self.head_dim, self.heads, self.kv_heads, self.intermediate
        proj = n * d * (h + 2 * hkv) * dh + n * h * dh * d
        attn = 2 * n * c * h * dh
        mlp = (3 if self.gated else 2) * (n if mlp_tokens is None else mlp_tokens) * d * m
        return proj + attn + mlp

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """K and V bytes one token costs in one layer."""
        return 2 * self.kv_heads * self.head_dim * bytes_per_element


def llava15_dims(size: str = "7b") -> VLMDims:
    """LLaVA-1.5 sizes, built offline: CLIP ViT-L/14 at 336 px (24 layers, width 1024, MLP
    4096, 576 patches + CLS) and Vicuna ``"7b"`` (32 layers, width 4096, MLP 11008) or
    ``"13b"`` (40 layers, width 5120, MLP 13824); vocabulary 32064; two-layer projector."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    llm = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}
    if size not in llm:
        raise ValueError(f"size={size!r}: expected one of {sorted(llm)}")
    d, m, layers, heads = llm[size]
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=24, num_attention_heads=16,
                                       image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=d, intermediate_size=m, num_hidden_layers=layers,
                                num_attention_heads=heads, vocab_size=32064),
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    return VLMDims.from_config(cfg)


def fastv_layer_flops(n: int, d: int, m: int) -> int:
    """FastV Eq. 5: ``4 n d^2 + 2 n^2 d + 2 n d m`` (multiply-adds counted once)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@dataclass(frozen=True)
class VLMDims:
    """Everything the accounting needs about a LLaVA-style VLM.

    Attributes:
        llm: the decoder.
        vocab: vocabulary size (LM head ``d x vocab``).
        image_tokens: visual tokens one image puts into the LLM (``N``; 576 for LLaVA-1.5).
        vision: the vision tower (``None``: not counted).
        vision_tokens: tokens the tower processes (patches plus CLS; 577 for CLIP-L/336).
        cls_tokens: leading non-patch tokens in the tower (1 for CLIP, 0 for SigLIP and others).
        vision_layers: tower layers that run (HF LLaVA runs them all even with
            ``vision_feature_layer=-2``).
        patch_macs: MACs of the patch embedding (``patches * 3 p^2 * d_v``).
        projector: ``(in, out)`` shapes of the projector's linear layers, applied per LLM
            visual token.
        merge: patches per LLM token along each side (Qwen2-VL's ``spatial_merge_size`` 2:
            an LLM token stands for ``merge^2`` patches; 1 for LLaVA).
        patch_volume: inputs of one patch (``channels * temporal_patch * p^2``), for
            models whose token count depends on the image size (see ``for_grid``).
        vision_window: patches per attention window in windowed tower layers (Qwen2.5-VL:
            ``(window_size / patch)^2``); 0 when every layer attends globally.
        vision_full_layers: tower layers with global attention when ``vision_window``.
        crops: tower passes per image (anyres: the base image plus its crops).
        approximate: empty when every term is exact for this family; otherwise which terms
            are estimates (written into results).
    """

    llm: StackDims
    vocab: int
    image_tokens: int
    vision: StackDims | None = None
    vision_tokens: int = 0
    cls_tokens: int = 0
    vision_layers: int = 0
    patch_macs: int = 0
    projector: tuple[tuple[int, int], ...] = ()
    merge: int = 1
    patch_volume: int = 0
    vision_window: int = 0
    vision_full_layers: tuple[int, ...] = ()
    crops: int = 1
    approximate: str = ""

    def for_grid(self, t: int, h: int, w: int) -> VLMDims:
        """The dims for one image of ``t x h x w`` patches (Qwen2-VL's ``image_grid_thw``)."""
        if not self.patch_volume or self.vision is None:
            raise ValueError("for_grid: this model's visual token count does not depend on "
                             "the image grid")
        patches = int(t) * int(h) * int(w)
        if patches % (self.merge ** 2):
            raise ValueError(f"grid {(t, h, w)}: {patches} patches are not a multiple of "
                             f"merge^2 = {self.merge ** 2}")
        return replace(self, vision_tokens=patches, image_tokens=patches // self.merge ** 2,
                       patch_macs=patches * self.patch_volume * self.vision.hidden)

    @classmethod
    def _from_qwen_vl(cls, config: Any, llm: StackDims, vocab: int) -> VLMDims:
        v = config.vision_config
        two_five = getattr(v, "intermediate_size", None) is not None and not hasattr(
            v, "embed_dim")
        embed = int(v.hidden_size if two_five else v.embed_dim)
        inter = int(v.intermediate_size if two_five else embed * v.mlp_ratio)
        out = int(getattr(v, "out_hidden_size", 0) or (llm.hidden if two_five else v.hidden_size))
        vision = StackDims(layers=int(v.depth), hidden=embed, heads=int(v.num_heads),
                           kv_heads=int(v.num_heads), head_dim=embed // int(v.num_heads),
                           intermediate=inter, gated=two_five)
        m, p = int(v.spatial_merge_size), int(v.patch_size)
        window = getattr(v, "window_size", None)
        full = tuple(getattr(v, "fullatt_block_indexes", None) or ())
        return cls(
            llm=llm, vocab=vocab, image_tokens=0, vision=vision, vision_tokens=0,
            cls_tokens=0, vision_layers=vision.layers, patch_macs=0,
            projector=((embed * m * m, embed * m * m), (embed * m * m, out)), merge=m,
            patch_volume=int(getattr(v, "in_channels", 3)) * int(v.temporal_patch_size) * p * p,
            vision_window=(int(window) // p) ** 2 if window else 0, vision_full_layers=full)

    @classmethod
    def from_config(cls, config: Any) -> VLMDims:
        """Read a Hugging Face VLM config: LLaVA-style (``vision_config`` with
        ``image_size`` / ``patch_size``, ``text_config``, ``vision_feature_layer``,
        ``vision_feature_select_strategy``) or Qwen2-VL / Qwen2.5-VL (patch merger, window
        attention; their token count depends on the image: call ``for_grid`` with the
        processor's ``image_grid_thw``).

        A config without ``vision_config`` is read as a plain decoder (only LLM costs).
        """
        text_cfg = getattr(config, "text_config", None) or config
        llm = StackDims.from_config(text_cfg)
        vocab = int(getattr(text_cfg, "vocab_size", 0) or 0)
        vcfg = getattr(config, "vision_config", None)
        if vcfg is None:
            return cls(llm=llm, vocab=vocab, image_tokens=0)
        if hasattr(vcfg, "spatial_merge_size") and hasattr(vcfg, "depth"):
            return cls._from_qwen_vl(config, llm, vocab)
        vision = StackDims.from_config(vcfg, gated=False)
        image_size = getattr(vcfg, "image_size", None)
        patch = getattr(vcfg, "patch_size", None)
        if not image_size or not patch:
            raise ValueError(f"vision config {type(vcfg).__name__} lacks image_size/patch_size; "
                             "build VLMDims by hand for this model")
        image_size = image_size if isinstance(image_size, int) else int(image_size[0])
        patches = (image_size // patch) ** 2
        model_type = str(getattr(vcfg, "model_type", ""))
        cls_tokens = 1 if "clip" in model_type and "siglip" not in model_type else 0
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        image_tokens = patches + (cls_tokens if strategy == "full" else 0)
        feature_layer = getattr(config, "vision_feature_layer", -1)
        n_feat = len(feature_layer) if isinstance(feature_layer, (list, tuple)) else 1
        d_text = llm.hidden
        projector = ((vision.hidden * n_feat, d_text), (d_text, d_text))
        channels = int(getattr(vcfg, "num_channels", 3) or 3)
        return cls(
            llm=llm, vocab=vocab, image_tokens=image_tokens, vision=vision,
            vision_tokens=patches + cls_tokens, cls_tokens=cls_tokens,
            vision_layers=vision.layers, patch_macs=patches * channels * patch * patch
            * vision.hidden, projector=projector,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for results files)."""
        return asdict(self)


Stage = Literal["none", "pre-llm", "encoder", "llm"]


@dataclass(frozen=True)
class Plan:
    """Where a reduction acts and how many visual tokens remain.

    ``schedule`` is a tuple of ``(layer, tokens)`` steps, ascending in layer: from encoder
    (``stage="encoder"``) or decoder (``stage="llm"``) layer ``layer`` on, ``tokens`` visual
    tokens remain. ``pre-llm`` has one step ``(0, k)``. Build with the class methods.
    """

    stage: Stage = "none"
    schedule: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    before_projector: bool = False
    #: An in-encoder method's tower, layer by layer: ``(attention tokens, MLP tokens)`` of
    #: every tower layer, CLS included (``in_encoder_layers``); empty: from ``schedule``.
    vision_tokens: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    @classmethod
    def full(cls) -> Plan:
        return cls("none", ())

    @classmethod
    def pre_llm(cls, keep: int, before_projector: bool = False) -> Plan:
        """Reduce before the LLM; ``before_projector``: on the tower's features, so the
        projector too runs on ``keep`` tokens only."""
        return cls("pre-llm", ((0, keep),), before_projector)

    @classmethod
    def in_encoder(cls, layer: int, keep: int) -> Plan:
        return cls("encoder", ((layer, keep),))

    @classmethod
    def in_encoder_layers(cls, tokens: Sequence[tuple[int, int]], keep: int) -> Plan:
        """An in-encoder method whose tower runs ``tokens[i] = (attention, MLP)`` tokens in
        layer ``i`` (CLS included; ToMe's ``r`` per layer, EViT's stages), ``keep`` visual
        tokens reaching the projector and the LLM."""
        steps = tuple((int(a), int(b)) for a, b in tokens)
        first = next((i for i, (a, b) in enumerate(steps) if b < steps[0][0]), 0)
        return cls("encoder", ((first, int(keep)),), vision_tokens=steps)

    @classmethod
    def in_llm(cls, layer: int, keep: int) -> Plan:
        return cls("llm", ((layer, keep),))

    @classmethod
    def llm_schedule(cls, steps: Sequence[tuple[int, int]],
                     before_projector: bool = False) -> Plan:
        """Cuts inside the LLM; a step at layer 0 is a pre-LLM cut (a pipeline's first
        stage), which with ``before_projector`` acts on the tower's features, so the
        projector runs on its tokens only."""
        return cls("llm", tuple((int(a), int(b)) for a, b in steps), before_projector)

    @property
    def final_tokens(self) -> int | None:
        """Visual tokens after the last step (``None`` without reduction)."""
        return self.schedule[-1][1] if self.schedule else None

    def to_dict(self) -> dict[str, Any]:
        out = {"stage": self.stage, "schedule": [list(s) for s in self.schedule],
               "before_projector": self.before_projector}
        if self.vision_tokens:
            out["vision_tokens"] = [list(s) for s in self.vision_tokens]
        return out


def _per_layer(layers: int, full: int, schedule: Sequence[tuple[int, int]], what: str) -> list[int]:
    """Visual-token count seen by each of ``layers`` layers under ``schedule``."""
    counts = [full] * layers
    last_layer, last_tokens = -1, full
    for layer, tokens in schedule:
        _positive_int(f"{what} layer", layer)
        _positive_int(f"{what} tokens", tokens)
        if layer > layers:
            raise ValueError(f"{what} layer={layer}: the stack has {layers} layers")
        if layer <= last_layer:
            raise ValueError(f"{what} schedule layers must increase, got {list(schedule)}")
        if tokens > last_tokens:
            raise ValueError(f"{what} tokens={tokens}: a step cannot add tokens "
                             f"(had {last_tokens}); schedule {list(schedule)}")
        for i in range(layer, layers):
            counts[i] = tokens
        last_layer, last_tokens = layer, tokens
    return counts


@dataclass(frozen=True)
class Cost:
    """Compute (MACs: multiply-adds counted once) and KV-cache bytes of one request.

    Attributes:
        vision: vision tower incl. patch embedding.
        projector: the multimodal projector.
        llm_prefill: decoder layers over the prompt (visual + text tokens).
        lm_head: LM head in prefill (the last position only, as ``generate`` computes).
        decode: one decoded token right after prefill (all layers + LM head), attending to
            the prompt's cache.
        kv_cache_bytes: K and V of the prompt, all layers.
        llm_tokens: sequence length each decoder layer processes in prefill.
        vision_layer_tokens: tokens each encoder layer processes.
    """

    vision: int
    projector: int
    llm_prefill: int
    lm_head: int
    decode: int
    kv_cache_bytes: int
    llm_tokens: tuple[int, ...]
    vision_layer_tokens: tuple[int, ...]

    @property
    def prefill(self) -> int:
        """Everything up to the first output token (MACs)."""
        return self.vision + self.projector + self.llm_prefill + self.lm_head

    @property
    def hardware_flops(self) -> int:
        """Prefill in hardware FLOPs (a multiply-add is 2 FLOPs)."""
        return 2 * self.prefill

    def to_dict(self) -> dict[str, Any]:
        return {
            "vision_macs": self.vision, "projector_macs": self.projector,
            "llm_prefill_macs": self.llm_prefill, "lm_head_macs": self.lm_head,
            "prefill_macs": self.prefill, "decode_macs_per_token": self.decode,
            "kv_cache_bytes": self.kv_cache_bytes,
        }


def account(dims: VLMDims, plan: Plan | None = None, *, text_tokens: int = 0,
            images: int = 1, bytes_per_element: int = 2) -> Cost:
    """Cost of one request: ``images`` images and ``text_tokens`` prompt tokens.

    Args:
        dims: model sizes (``VLMDims.from_config(model.config)``).
        plan: where the reduction acts (``None``: no reduction).
        text_tokens: non-visual prompt tokens (system prompt, question, template).
        images: images per request (each costs the tower and ``N`` visual tokens).
        bytes_per_element: KV-cache element size (2 for fp16/bf16, 4 for fp32).

    Returns:
        A :class:`Cost` (MACs and bytes).
    """
    plan = plan or Plan.full()
    _positive_int("text_tokens", text_tokens)
    if _positive_int("images", images) == 0 and plan.stage != "none":
        raise ValueError("images=0: a reduction plan needs at least one image")
    if _positive_int("bytes_per_element", bytes_per_element) == 0:
        raise ValueError("bytes_per_element=0: expected a positive int")
    n_img = dims.image_tokens
    if plan.final_tokens is not None and plan.final_tokens > n_img:
        raise ValueError(f"keep={plan.final_tokens}: the model has {n_img} visual tokens "
                         "per image")

    vision_macs, projector_macs = 0, 0
    vis_counts: list[int] = []
    llm_visual = [n_img] * dims.llm.layers
    if plan.stage == "pre-llm":
        llm_visual = [plan.schedule[0][1]] * dims.llm.layers
    elif plan.stage == "llm":
        llm_visual = _per_layer(dims.llm.layers, n_img, plan.schedule, "llm")
    into_projector = n_img
    if dims.vision is not None:
        if dims.vision_tokens <= 0:
            raise ValueError("the model's visual token count depends on the image; use "
                             "dims.for_grid(t, h, w) with the processor's image_grid_thw")
        patches = dims.vision_tokens - dims.cls_tokens
        per = dims.merge ** 2  # patches per LLM token
        steps = tuple((a, b * per) for a, b in plan.schedule) if plan.stage == "encoder" else ()
        if plan.vision_tokens:
            if len(plan.vision_tokens) != dims.vision_layers:
                raise ValueError(f"plan: {len(plan.vision_tokens)} tower layers given; the "
                                 f"tower runs {dims.vision_layers}")
            halves = list(plan.vision_tokens)
        else:
            vis_patches = _per_layer(dims.vision_layers, patches, steps, "encoder")
            halves = [(p + dims.cls_tokens,) * 2 for p in vis_patches]
        vis_counts = [a for a, _ in halves]
        vision_macs = dims.patch_macs + sum(
            dims.vision.layer_macs(a, _vision_context(dims, i, a), mlp_tokens=b)
            for i, (a, b) in enumerate(halves))
        vision_macs *= images
        if plan.stage == "encoder" or (plan.stage == "pre-llm" and plan.before_projector):
            into_projector = plan.final_tokens or n_img
            llm_visual = [into_projector] * dims.llm.layers
        elif plan.stage == "llm" and plan.before_projector and plan.schedule[0][0] == 0:
            into_projector = plan.schedule[0][1]  # the pipeline's cut on the features
        vision_macs *= dims.crops
        if dims.crops > 1 and into_projector == n_img:
            # anyres: every crop's patches are projected before unpadding / newlines
            into_projector = dims.crops * patches
        projector_macs = images * into_projector * sum(a * b for a, b in dims.projector)
    elif plan.stage == "encoder":
        llm_visual = [plan.final_tokens or n_img] * dims.llm.layers

    llm_tokens = tuple(images * v + text_tokens for v in llm_visual)
    llm_macs = sum(dims.llm.layer_macs(n) for n in llm_tokens)
    lm_head = dims.llm.hidden * dims.vocab
    kv = sum(n * dims.llm.kv_bytes_per_token(bytes_per_element) for n in llm_tokens)
    return Cost(vision=vision_macs, projector=projector_macs, llm_prefill=llm_macs,
                lm_head=lm_head, decode=decode_macs(dims, llm_tokens, 0), kv_cache_bytes=kv,
                llm_tokens=llm_tokens, vision_layer_tokens=tuple(vis_counts))


def _vision_context(dims: VLMDims, layer: int, n: int) -> int:
    """Keys each query of tower layer ``layer`` attends to (a window or all ``n``)."""
    if dims.vision_window and layer not in dims.vision_full_layers:
        return min(n, dims.vision_window)
    return n


def decode_macs(dims: VLMDims, llm_tokens: Sequence[int], step: int = 0) -> int:
    """MACs of decoded token number ``step`` (0 = the first after prefill): every layer runs
    one query against its prompt cache (``llm_tokens[l]``) plus ``step + 1`` generated keys,
    then the LM head."""
    return sum(dims.llm.layer_macs(1, n + step + 1) for n in llm_tokens) + (
        dims.llm.hidden * dims.vocab)


def plan_for(stage: str, keep: int, layer: int | None = None,
             before_projector: bool = False) -> Plan:
    """A single-step plan for a method acting at ``stage`` (a ``MethodSpec.stage``)."""
    if stage == "pre-llm":
        return Plan.pre_llm(keep, before_projector)
    if stage == "encoder":
        return Plan.in_encoder(0 if layer is None else layer, keep)
    if stage == "llm":
        return Plan.in_llm(2 if layer is None else layer, keep)
    raise ValueError(f"stage={stage!r}: expected 'pre-llm', 'encoder' or 'llm'")


def tera(x: float) -> float:
    """``x / 1e12`` rounded to 4 decimals (for tables)."""
    return round(x / 1e12, 4) if math.isfinite(x) else x
