"""The in-encoder stage: reduce tokens inside the layers of a ViT encoder.

Family-agnostic: it needs the encoder's layers (transformers 5.x pre-norm blocks: CLIP,
SigLIP, ViT, Dinov2 encoder layers), whether token 0 is a CLS token, and an in-encoder
schedule (:mod:`tokensieve.core.encoder_schedule`: ToMe, EViT). It changes no module,
config or attention implementation of the model:

- Every layer gets an instance attribute ``forward`` (a partial of this stage) in place of
  its class's forward; ``remove`` restores exactly what was there (the instance attribute
  a layer had, or none). The layers have no seam between attention and MLP, so a layer
  that reduces runs its own submodules in the layer's order (norm, attention, residual,
  *reduction*, norm, MLP, residual); the other layers run their own forward. At install,
  one layer of each class is checked to give bit-identical outputs when run that way.
- The reduction of a layer sees the tokens after the attention residual (``[B, T, D]``)
  and the signals its schedule names, recomputed from the layer's own q / k projections
  (forward hooks on ``q_proj`` / ``k_proj``; SDPA / flash kernels stay): head-mean keys
  (ToMe's metric) or the head-mean CLS attention row (EViT). Every image of a batch
  reduces by the same count, so shapes stay rectangular.
- Sizes (how many original tokens each token stands for) are tracked from the first
  reduction on; with proportional attention (ToMe) every later layer gets the additive
  float mask ``log(size)`` ``[B, 1, 1, T]`` as its ``attention_mask`` (SDPA takes it).
- Adaptive counts (ATS): a step may keep a different count per image (``step.mask``
  ``[B, T']``, True = real token, real tokens first); the batch is padded to the largest
  count and every later layer gets ``-inf`` on the padded keys in the same additive mask,
  so a padded token changes no real token's output (padded queries attend to real keys
  only; their outputs are set to zero after each layer). Later steps get the padding as
  ``signals["valid"]`` ``[B, T]`` and must never select or merge a padded token.
- Where a step runs (the schedule's ``position``): ``"mid"`` between the attention
  residual and the MLP (ToMe, EViT, ATS); ``"post"`` after the MLP residual, from the
  layer's own attention (MCTF without one-step-ahead attention); ``"pre"`` before the
  layer, from the attention of the layer's q / k on its unreduced input, the layer then
  running on the reduced tokens (MCTF's "precise" one-step-ahead).
- A pass starts at layer 0; its trace (sizes, where each original token went, which
  original token represents each output token) is kept per thread (:attr:`last`).
- The layers' outputs are the reduced tensors, so ``output_hidden_states`` shows what
  each layer produced (``hidden_states[i + 1]``: the output of layer ``i``).
- Packed towers (:class:`PackedTower`, Qwen2-VL / 2.5-VL: all images in one ``[S, D]``
  sequence, segments in ``cu_seqlens``, rotary positions per token) run only a schedule
  that reduces after a layer's output and rebuilds the grid (``expedit``): each segment
  (image frame) is reduced on its own in raster order, the later layers get the reduced
  segments' ``cu_seqlens`` and the rotary positions of the step's ``anchors``, and no
  reduced set enters a window-attention layer (the grid is rebuilt before it).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tokensieve.core.encoder_schedule import EncoderSchedule, LayerStep
from tokensieve.core.registry import MethodSpec
from tokensieve.models._signals import mean_keys

#: Why a family's later steps cannot take a reduced tower output (refused at apply).
REFUSED: dict[str, str] = {
    "llava-next": "anyres packing lays out every crop's whole patch grid (with newline "
                  "tokens per row) after the tower",
    "llava-onevision": "anyres packing and the bilinear pooling of its features need every "
                       "image's whole patch grid",
    "qwen2-vl": "the 2x2 patch merger needs the whole patch grid (merge units of 4 patches), "
                "and its blocks run on one packed sequence with per-token rotary positions",
    "gemma3": "the 4x4 average pooling of the SigLIP grid into 256 soft tokens needs the "
              "whole patch grid",
    "idefics3": "the pixel shuffle (space-to-depth) of each crop needs the whole patch grid",
}
#: Families of :data:`REFUSED` whose towers run a method that rebuilds the whole grid at the
#: end (``expedit``): the LLM gets the usual grid. CLIP / SigLIP layers without a padding
#: mask (Idefics3: crops with padded patches are refused when called), and Qwen2-VL /
#: 2.5-VL's packed tower (:class:`PackedTower`).
REBUILT = ("llava-next", "llava-onevision", "gemma3", "idefics3", "qwen2-vl")


@dataclass(frozen=True)
class PackedTower:
    """A tower whose layers run on one packed sequence ``[S, D]`` of all its images (Qwen2-VL,
    Qwen2.5-VL): every layer gets the attention segments as ``cu_seqlens`` and rotary
    ``position_embeddings`` ``(cos, sin)`` ``[S, Dh]`` per token as keyword arguments.

    Attributes:
        tower: the module whose call runs the layers; its ``grid_thw`` (keyword or second
            positional argument) gives the images' patch grids.
        layout: ``grid_thw`` -> per attention segment (one per image frame), in sequence
            order: ``(order [h*w] long, h, w)``, the sequence index of every patch of the
            segment in raster order, and its patch grid. The segments cover the sequence.
        windowed: layers that attend within windows (Qwen2.5-VL's blocks outside
            ``fullatt_block_indexes``) rather than within the segments: no reduced token set
            may enter one (the windows are laid out on the whole grid).
    """

    tower: torch.nn.Module
    layout: Callable[[Tensor], list[tuple[Tensor, int, int]]]
    windowed: frozenset[int] = frozenset()


#: The q / k / v projections each in-encoder signal is computed from.
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "keys": ("k_proj",),
    "cls_attn": ("q_proj", "k_proj"),
    "attn_received": ("q_proj", "k_proj"),
    "values": ("v_proj",),
    "head_values": ("v_proj",),
    "attn_self_heads": ("q_proj", "k_proj"),
    "attn_received_heads": ("q_proj", "k_proj"),
}


#: Why a padding mask stops the stage (Idefics3's crops with padded patches).
PADDED = ("the tokensieve in-encoder stage cannot reduce tokens under a padding mask (e.g. "
          "Idefics3 / SmolVLM crops with padded patches, pixel_attention_mask): padded patches "
          "would be merged or clustered with real ones; run the crops unpadded")


def masks_padding(mask: Any) -> bool:
    """Whether an encoder attention mask hides any key: a bool mask with a False, or an
    additive float mask with a non-zero entry (None: no)."""
    if not isinstance(mask, Tensor):
        return False
    if mask.dtype == torch.bool:
        return not bool(mask.all())
    return bool((mask != 0).any())


@dataclass(frozen=True)
class Anatomy:
    """Submodule names of a pre-norm encoder layer:
    ``x = x + post1(attn(norm1(x)))``, then ``x = x + post2(mlp(norm2(x)))``."""

    norm1: str
    attn: str
    post1: tuple[str, ...]
    norm2: str
    mlp: str
    post2: tuple[str, ...]


ANATOMIES: tuple[Anatomy, ...] = (
    Anatomy("layer_norm1", "self_attn", (), "layer_norm2", "mlp", ()),  # CLIP, SigLIP
    Anatomy("layernorm_before", "attention", ("dropout",), "layernorm_after", "mlp",
            ("dropout",)),  # ViT
    Anatomy("norm1", "attention", ("layer_scale1", "drop_path"), "norm2", "mlp",
            ("layer_scale2", "drop_path")),  # Dinov2
)


def find_anatomy(layer: torch.nn.Module) -> Anatomy:
    """The :class:`Anatomy` of ``layer`` (ValueError when none fits)."""
    for a in ANATOMIES:
        names = (a.norm1, a.attn, *a.post1, a.norm2, a.mlp, *a.post2)
        if all(hasattr(layer, n) for n in names) and all(
                hasattr(getattr(layer, a.attn), p) for p in ("q_proj", "k_proj")):
            return a
    raise ValueError(f"the in-encoder stage supports CLIP / SigLIP / ViT / Dinov2 encoder "
                     f"layers (pre-norm attention + MLP with q_proj / k_proj); got a "
                     f"{type(layer).__name__}")


def attention_geometry(attn: torch.nn.Module) -> tuple[int, float]:
    """``(heads, scale)`` of a transformers attention module."""
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None)
    if heads is None or scale is None:
        raise ValueError(f"{type(attn).__name__}: found no head count / scale")
    return int(heads), float(scale)


def cls_attention_row(q: Tensor, k: Tensor, heads: int, scale: float,
                      bias: Tensor | None = None) -> Tensor:
    """Head-mean softmax attention of token 0 over all keys, ``[B, T]`` float32, from the
    projections ``q``, ``k`` ``[B, T, H*Dh]`` and an optional additive mask ``bias``
    broadcastable to ``[B, 1, 1, T]`` (the layer's proportional-attention bias)."""
    b, t, _ = k.shape
    qh = q[:, :1].float().reshape(b, 1, heads, -1).transpose(1, 2)  # [B, H, 1, Dh]
    kh = k.float().reshape(b, t, heads, -1).transpose(1, 2)  # [B, H, T, Dh]
    logits = (qh @ kh.transpose(-1, -2)) * scale  # [B, H, 1, T]
    if bias is not None:
        logits = logits + bias.float()[..., -1:, :]
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def attention_received_row(q: Tensor, k: Tensor, heads: int, scale: float,
                           bias: Tensor | None = None, valid: Tensor | None = None,
                           chunk: int = 256) -> Tensor:
    """Head- and query-mean softmax attention each key receives, ``[B, T]`` float32 (MCTF's
    ``attn.mean(dim=[1, 2])``), from the projections ``q``, ``k`` ``[B, T, H*Dh]``, an
    optional additive mask ``bias`` broadcastable to ``[B, 1, 1, T]`` and an optional
    ``valid`` ``[B, T]`` bool (padded queries are not averaged). Queries in chunks."""
    b, t, _ = k.shape
    qh = q.float().reshape(b, t, heads, -1).transpose(1, 2)  # [B, H, T, Dh]
    kh = k.float().reshape(b, t, heads, -1).transpose(1, 2)
    w = torch.ones(b, t, device=k.device) if valid is None else valid.float()
    total = torch.zeros(b, t, device=k.device)
    for s in range(0, t, chunk):
        logits = (qh[:, :, s:s + chunk] @ kh.transpose(-1, -2)) * scale  # [B, H, c, T]
        if bias is not None:
            logits = logits + bias.float()
        probs = logits.softmax(dim=-1).mean(dim=1)  # [B, c, T]
        total = total + (probs * w[:, s:s + chunk, None]).sum(dim=1)
    return total / w.sum(dim=1, keepdim=True)


def attention_head_stats(q: Tensor, k: Tensor, heads: int, scale: float,
                         bias: Tensor | None = None, valid: Tensor | None = None,
                         chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per head, the attention each token pays itself and the attention each key receives
    summed over the (``valid``) queries: ``(self [B, H, T], received [B, H, T])`` float32
    (GTP's ``diagonal(attn)`` and ``attn.sum(-2)``), from the projections ``q``, ``k``
    ``[B, T, H*Dh]`` and an optional additive mask ``bias`` broadcastable to
    ``[B, 1, 1, T]``. Queries in chunks."""
    b, t, _ = k.shape
    qh = q.float().reshape(b, t, heads, -1).transpose(1, 2)  # [B, H, T, Dh]
    kh = k.float().reshape(b, t, heads, -1).transpose(1, 2)
    w = torch.ones(b, t, device=k.device) if valid is None else valid.float()
    received = torch.zeros(b, heads, t, device=k.device)
    diag = torch.empty(b, heads, t, device=k.device)
    for s in range(0, t, chunk):
        logits = (qh[:, :, s:s + chunk] @ kh.transpose(-1, -2)) * scale  # [B, H, c, T]
        if bias is not None:
            logits = logits + bias.float()
        probs = logits.softmax(dim=-1)
        received += (probs * w[:, None, s:s + chunk, None]).sum(dim=2)
        rows = torch.arange(probs.shape[2], device=k.device)
        diag[:, :, s:s + chunk] = probs[:, :, rows, rows + s]
    return diag, received


@dataclass(frozen=True)
class EncoderTrace:
    """What the stage did to the tokens of one pass, up to some layer.

    Attributes:
        tokens_in: ``N``, the tokens entering layer 0.
        layer: the last layer that reduced (-1: none did).
        sizes: ``[B, T]`` float32 original tokens per current token (None: no reduction).
        source: ``[B, N]`` long, the current token each original token went into (-1:
            dropped, e.g. EViT without fusion).
        positions: ``[B, T]`` long, the original token representing each current token.
        mask: ``[B, T]`` bool, True on real tokens, False on the padding of images that
            kept fewer tokens (adaptive counts, ATS); None: every token is real.
    """

    tokens_in: int
    layer: int = -1
    sizes: Tensor | None = None
    source: Tensor | None = None
    positions: Tensor | None = None
    mask: Tensor | None = None


@dataclass
class EncoderRun:
    """One pass through the encoder (per thread): the traces after each reducing layer."""

    tokens_in: int
    traces: list[EncoderTrace] = field(default_factory=list)
    capture: int | None = None  # layer whose q / k projections the hooks keep
    captured: dict[str, Tensor] = field(default_factory=dict)
    #: Reconstructions still to apply (Expedit's ``step.restore``), in step order.
    restores: list[Any] = field(default_factory=list)
    #: What a schedule carries across layers (``EncoderSchedule.run_step``).
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def current(self) -> EncoderTrace:
        return self.traces[-1] if self.traces else EncoderTrace(self.tokens_in)

    def at(self, layer: int) -> EncoderTrace:
        """The trace after encoder layer ``layer`` (the last reduction at or before it)."""
        done = [t for t in self.traces if t.layer <= layer]
        return done[-1] if done else EncoderTrace(self.tokens_in)

    def record(self, step: LayerStep, layer: int) -> None:
        cur = self.current
        b = step.slot.shape[0]
        dev = step.slot.device
        if cur.source is None:
            source = torch.arange(self.tokens_in, device=dev).expand(b, -1)
            positions = source
        else:
            source, positions = cur.source, cur.positions
        moved = step.slot.gather(1, source.clamp(min=0))
        source = torch.where(source >= 0, moved, -1)
        positions = positions.gather(1, step.kept)
        mask = getattr(step, "mask", None)
        self.traces.append(EncoderTrace(self.tokens_in, layer, step.sizes, source, positions,
                                        mask))
        if getattr(step, "restore", None) is not None:
            self.restores.append(step.restore)


class EncoderStage:
    """Per-instance layer wrappers that reduce tokens inside a ViT encoder.

    Args:
        layers: the encoder's layers (a ``ModuleList``), in order.
        spec: the method's registry entry (stage "encoder").
        schedule: the method's in-encoder options (:class:`EncoderSchedule`).
        has_cls: token 0 is a CLS token (never merged or dropped; stays first).
        until: reduce only at layers ``<= until`` (e.g. a VLM's feature layer: later
            reductions would be wasted); ``None``: every layer of the schedule.
        feeds_llm: the tower's output goes to an LLM (the VLM's call is cut to the reduced
            count by the pre-LLM surgery); False for a plain backbone.
        packed: the tower runs its layers on one packed sequence (:class:`PackedTower`,
            Qwen2-VL); only a schedule that reduces after a layer's output and rebuilds the
            grid (``expedit``) runs there, per attention segment, with the layers' own
            forward.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], spec: MethodSpec,
                 schedule: EncoderSchedule, has_cls: bool, until: int | None = None,
                 feeds_llm: bool = False, packed: PackedTower | None = None) -> None:
        if len(layers) == 0:
            raise ValueError("the in-encoder stage needs an encoder with layers")
        if schedule.needs_cls and not has_cls:
            raise ValueError(f"method {spec.name!r} inside the encoder needs a CLS token (its "
                             "CLS attention ranks the tokens); this tower has none")
        self.layers = layers
        self.spec = spec
        self.schedule = schedule
        self.has_cls = has_cls
        self.feeds_llm = feeds_llm
        self.packed = packed
        depth = len(layers)
        plan = schedule.plan(depth)
        self.plan = {i: p for i, p in plan.items()
                     if until is None or i <= until or schedule.observes(p)}
        self._saved: dict[int, tuple[bool, Any]] = {}
        self._measured: dict[int, list[int]] = {}  # layer -> [real tokens, images]
        self._handles: list[Any] = []
        self._run: contextvars.ContextVar[EncoderRun | None] = contextvars.ContextVar(
            "tokensieve_encoder_run", default=None)
        self.position = getattr(schedule, "position", "mid")
        if self.position not in ("pre", "mid", "post"):
            raise ValueError(f"{spec.name}: schedule position {self.position!r}")
        unknown = sorted(set(schedule.signals) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"{spec.name}: the in-encoder stage computes no signal {unknown}")
        self._projections = sorted({n for s in schedule.signals for n in PROJECTIONS[s]})
        # Where a reconstructing schedule (Expedit) rebuilds the full token set.
        self._restore_at = len(layers) - 1 if until is None else until
        if packed is not None:
            self.anatomy: Anatomy | None = None
            self._restore_at = self._packed_restore_at(packed, self._restore_at)
            return
        self.anatomy = find_anatomy(layers[0])
        self.heads, self.scale = attention_geometry(getattr(layers[0], self.anatomy.attn))
        self._verify()

    def _packed_restore_at(self, packed: PackedTower, last: int) -> int:
        """Where the grid is rebuilt in a packed tower: after the last layer before the first
        windowed layer that follows the reducing one (or ``last``). ValueError for a schedule
        that does not rebuild the grid after its layer's output, or when a windowed layer
        directly follows the reducing one."""
        name = self.spec.name
        if not getattr(self.schedule, "restores", False) or self.position != "post" or \
                self.schedule.signals:
            raise ValueError(f"method {name!r}: this tower runs its layers on one packed "
                             "sequence (cu_seqlens, per-token rotary positions); only a method "
                             "that reduces after a layer's output and rebuilds the whole grid "
                             "(expedit) runs in it")
        if len(self.plan) > 1:
            raise ValueError(f"method {name!r}: one reducing layer in a packed tower")
        for i in self.plan:
            ends = [j - 1 for j in sorted(packed.windowed) if j > i]
            restore_at = min([last, *ends])
            if restore_at <= i:
                full = sorted(j - 1 for j in range(1, last + 1) if j not in packed.windowed)
                raise ValueError(
                    f"method {name!r}: layer={i}: layer {i + 1} of this tower attends within "
                    "windows of the whole patch grid, which a reduced token set does not have; "
                    "reduce after a layer that a full-attention layer follows (layer in "
                    f"{full}): the grid is rebuilt before the next windowed layer")
            return restore_at
        return last

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_run"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._run = contextvars.ContextVar("tokensieve_encoder_run", default=None)

    @property
    def last(self) -> EncoderRun | None:
        """The calling thread's last pass through the encoder (None before any)."""
        return self._run.get()

    def measured_tokens(self) -> dict[int, float]:
        """Adaptive schedules (ATS, FlowCut): per reducing layer, the mean tokens (CLS
        included) an image really kept there over every call so far; empty before the
        first call and for fixed counts."""
        return {layer: real / images for layer, (real, images) in list(self._measured.items())
                if images}

    def layer_tokens(self, tokens: int, measured: bool = False) -> list[tuple[int, int]]:
        """Per layer, the tokens its attention and its MLP run on when ``tokens`` (CLS
        included) enter layer 0 (for the compute accounting): the schedule's counts (an
        adaptive schedule's caps), or with ``measured`` the rounded means an image really
        kept (:meth:`measured_tokens`) where calls recorded them."""
        from tokensieve.core.encoder_schedule import layer_tokens

        counts = ({i: round(v) for i, v in self.measured_tokens().items()} if measured
                  else None)
        return layer_tokens(self.schedule, self.plan, len(self.layers), tokens, self.has_cls,
                            counts=counts)

    # -- install / remove ---------------------------------------------------------------------
    def install(self) -> None:
        forward = self._layer_forward if self.packed is None else self._packed_forward
        for i, layer in enumerate(self.layers):
            self._saved[i] = ("forward" in layer.__dict__, layer.__dict__.get("forward"))
            object.__setattr__(layer, "forward", functools.partial(forward, i))
        if self.packed is not None:
            self._handles.append(self.packed.tower.register_forward_pre_hook(
                self._packed_start, with_kwargs=True))
        for i in self.plan if self._projections else ():
            assert self.anatomy is not None
            attn = getattr(self.layers[i], self.anatomy.attn)
            for name in self._projections:
                hook = functools.partial(self._capture, i, name)
                self._handles.append(getattr(attn, name).register_forward_hook(hook))
        if getattr(self.schedule, "restores", False) and self.plan:
            # before the hooks that record hidden states: they see the rebuilt tokens
            self._handles.append(self.layers[self._restore_at].register_forward_hook(
                self._restore, prepend=True))

    def _restore(self, module: torch.nn.Module, args: tuple, out: Any) -> Any:
        """After the last layer whose output is used: the pending reconstructions rebuild
        the full token set (the later layers run on it untouched)."""
        run = self._run.get()
        if run is None or not run.restores or not isinstance(out, Tensor):
            return None
        for restore in reversed(run.restores):
            out = restore(out)
        run.restores.clear()
        run.state.pop("packed_kwargs", None)  # the later layers get the tower's own kwargs
        run.traces.append(EncoderTrace(run.tokens_in, self._restore_at))
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i, (own, value) in self._saved.items():
            layer = self.layers[i]
            if own:
                object.__setattr__(layer, "forward", value)
            else:
                layer.__dict__.pop("forward", None)
        self._saved.clear()

    # -- per call -----------------------------------------------------------------------------
    def _original(self, i: int) -> Any:
        layer = self.layers[i]
        own, value = self._saved.get(i, (False, None))
        return value if own else type(layer).forward.__get__(layer)

    def _capture(self, i: int, name: str, module: torch.nn.Module, args: tuple,
                 out: Tensor) -> None:
        run = self._run.get()
        if run is not None and run.capture == i:
            run.captured[name] = out.detach()

    def _mask(self, run: EncoderRun, mask: Any, hidden: Tensor) -> Any:
        """The attention mask of a layer: the caller's before any reduction; after one,
        the additive float mask ``[B, 1, 1, T]`` (or None): the proportional-attention bias
        ``log(size)`` plus ``-inf`` on padded keys (adaptive counts)."""
        trace = run.current
        if trace.sizes is None:
            return mask
        if masks_padding(mask):
            raise ValueError(PADDED)
        bias = trace.sizes.float().log() if self.schedule.proportional else None
        if trace.mask is not None:
            pad = torch.zeros(trace.mask.shape, device=trace.mask.device).masked_fill(
                ~trace.mask, float("-inf"))
            bias = pad if bias is None else bias.masked_fill(~trace.mask, float("-inf"))
        return None if bias is None else bias[:, None, None, :].to(hidden.dtype)

    @staticmethod
    def _zero_padding(run: EncoderRun, out: Any) -> Any:
        """A layer's output with the padded tokens (adaptive counts) set to zero."""
        valid = run.current.mask
        if valid is None or not isinstance(out, Tensor):
            return out
        return out.masked_fill(~valid.unsqueeze(-1), 0)

    def _step(self, run: EncoderRun, i: int, x: Tensor, signals: dict[str, Tensor],
              param: Any) -> Tensor:
        """The schedule's step on ``x`` ``[B, T, D]`` at layer ``i``, recorded; the tokens
        that come out (``x`` itself when the step reduces nothing)."""
        valid = run.current.mask
        if valid is not None:
            if not getattr(self.schedule, "pads", False):
                raise ValueError(f"{self.spec.name}: the tokens are padded (adaptive counts) "
                                 "and this method cannot skip padding")
            signals = {**signals, "valid": valid}
        step = self.schedule.run_step(x, run.current.sizes, signals, param, self.has_cls,
                                      run.state)
        out = x if step is None else step.tokens
        if step is not None:
            run.record(step, i)
        if getattr(self.schedule, "pads", False):  # adaptive counts: what images really kept
            mask = run.current.mask
            real = out.shape[0] * out.shape[1] if mask is None else int(mask.sum())
            acc = self._measured.setdefault(i, [0, 0])  # a statistic: a rare lost update
            acc[0] += real                                # under threads is harmless
            acc[1] += out.shape[0]
        return out

    def _layer_forward(self, i: int, hidden_states: Tensor, attention_mask: Any = None,
                       *args: Any, **kwargs: Any) -> Tensor:
        if i == 0:
            self._run.set(EncoderRun(tokens_in=int(hidden_states.shape[1]),
                                     state={"input": hidden_states}))
        run = self._run.get()
        if run is None or run.current.sizes is not None and \
                run.current.sizes.shape[1] != hidden_states.shape[1]:
            # A layer run on its own (outside a pass from layer 0): untouched.
            return self._original(i)(hidden_states, attention_mask, *args, **kwargs)
        # a plan's parameter may be None (ATS: each image's own count), so membership says
        # whether the layer reduces
        reduces = i in self.plan
        param = self.plan.get(i)
        if reduces and masks_padding(attention_mask):
            raise ValueError(PADDED)
        if reduces and self.position == "pre":
            hidden_states = self._pre_step(run, i, hidden_states, attention_mask, param)
        mask = self._mask(run, attention_mask, hidden_states)
        if not reduces or self.position == "pre":
            out = self._original(i)(hidden_states, mask, *args, **kwargs)
            return self._zero_padding(run, out)
        layer = self.layers[i]
        a = self.anatomy
        x, signals = self._attention_half(run, i, layer, hidden_states, mask, args, kwargs)
        if self.position == "mid":
            x = self._step(run, i, x, signals, param)
        h = getattr(layer, a.mlp)(getattr(layer, a.norm2)(x))
        for name in a.post2:
            h = getattr(layer, name)(h)
        x = x + h
        if self.position == "post":
            x = self._step(run, i, x, signals, param)
        return self._zero_padding(run, x)

    def _pre_step(self, run: EncoderRun, i: int, x: Tensor, attention_mask: Any,
                  param: Any) -> Tensor:
        """A step before layer ``i`` (position "pre"): its signals from the layer's own
        norm and q / k / v projections applied to the unreduced input ``x``."""
        layer = self.layers[i]
        mask = self._mask(run, attention_mask, x)
        attn = getattr(layer, self.anatomy.attn)
        h = getattr(layer, self.anatomy.norm1)(x)
        captured = {name: getattr(attn, name)(h).detach() for name in self._projections}
        return self._step(run, i, x, self._signals(captured, mask, run.current.mask), param)

    # -- packed towers (Qwen2-VL) ------------------------------------------------------------
    def _packed_start(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
                      ) -> None:
        """Before the packed tower runs: its segments (from ``grid_thw``) for layer 0."""
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        assert self.packed is not None
        segments = None if grid is None else self.packed.layout(grid)
        self._run.set(EncoderRun(tokens_in=0, state={"segments": segments}))

    def _packed_forward(self, i: int, hidden_states: Tensor, *args: Any, **kwargs: Any,
                        ) -> Tensor:
        """Layer ``i`` of a packed tower: its own forward, on the reduced sequence with the
        reduced segments and rotary positions once a layer has reduced, then the step."""
        run = self._run.get()
        if i == 0 and run is not None and run.tokens_in == 0:
            run = EncoderRun(tokens_in=int(hidden_states.shape[0]),
                             state={"segments": run.state["segments"]})
            self._run.set(run)
        elif i == 0:
            run = None  # the layers run outside the tower's call: untouched
            self._run.set(None)
        if run is None or run.state.get("segments") is None or run.current.sizes is not None \
                and run.current.sizes.shape[1] != hidden_states.shape[0]:
            return self._original(i)(hidden_states, *args, **kwargs)
        kwargs = {**kwargs, **run.state.get("packed_kwargs", {})}
        out = self._original(i)(hidden_states, *args, **kwargs)
        param = self.plan.get(i)
        if i not in self.plan:
            return out
        return self._packed_step(run, i, out, kwargs, param)

    def _packed_step(self, run: EncoderRun, i: int, x: Tensor, kwargs: dict[str, Any],
                     param: Any) -> Tensor:
        """The schedule's step on each attention segment of the packed output ``x``
        ``[S, D]`` of layer ``i`` (its patches in raster order, ``signals["grid"]`` its
        grid; a segment the step leaves whole keeps its tokens). The reduced segments are
        packed again; the later layers get their ``cu_seqlens`` and the rotary positions of
        the tokens the step's ``anchors`` name (``kept`` without): recorded as one
        ``[1, S]`` step, with the reconstruction of the whole packed sequence."""
        s, d = x.shape
        dev = x.device
        slot = torch.empty(s, dtype=torch.long, device=dev)
        pieces, sizes, kept, anchors = [], [], [], []
        parts: list[tuple[Tensor, int, int, Any]] = []
        start = 0
        for order, h, w in run.state["segments"]:
            order = order.to(dev)
            seg = x[order].unsqueeze(0)  # [1, h*w, D], raster order
            step = self.schedule.run_step(seg, None, {"grid": (h, w)},  # type: ignore[dict-item]
                                          param, False, run.state)
            if step is None:
                n = h * w
                pieces.append(seg[0])
                slot[order] = torch.arange(n, device=dev) + start
                sizes.append(torch.ones(n, device=dev))
                kept.append(order)
                anchors.append(order)
                parts.append((order, start, n, None))
            else:
                n = step.tokens.shape[1]
                pieces.append(step.tokens[0])
                slot[order] = step.slot[0] + start
                sizes.append(step.sizes[0].float())
                kept.append(order[step.kept[0]])
                anchor = getattr(step, "anchors", None)
                anchors.append(order[(step.kept if anchor is None else anchor)[0]])
                parts.append((order, start, n, step.restore))
            start += n
        if all(p[3] is None for p in parts):
            return x
        tokens = torch.cat(pieces)
        cu = kwargs["cu_seqlens"]
        lengths = torch.tensor([p[2] for p in parts], device=cu.device)
        new_cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(cu.dtype)
        where = torch.cat(anchors)
        cos, sin = kwargs["position_embeddings"]
        packed: dict[str, Any] = {"cu_seqlens": new_cu, "position_embeddings": (cos[where],
                                                                                sin[where])}
        if kwargs.get("max_seqlen") is not None:
            packed["max_seqlen"] = int(lengths.max())
        run.state["packed_kwargs"] = packed

        def restore(y: Tensor) -> Tensor:
            out = y.new_empty(s, d)
            for order, at, n, rebuild in parts:
                piece = y[at:at + n]
                out[order] = piece if rebuild is None else rebuild(piece.unsqueeze(0))[0]
            return out

        run.record(LayerStep(tokens=tokens.unsqueeze(0), sizes=torch.cat(sizes).unsqueeze(0),
                             slot=slot.unsqueeze(0), kept=torch.cat(kept).unsqueeze(0)), i)
        run.restores.append(restore)
        return tokens

    def _signals(self, captured: dict[str, Tensor], mask: Any, valid: Tensor | None,
                 ) -> dict[str, Tensor]:
        """The schedule's signals from a layer's captured projections ``[B, T, H*Dh]``
        under the layer's attention mask ``mask``."""
        wanted = self.schedule.signals
        bias = mask if isinstance(mask, Tensor) and mask.is_floating_point() else None
        signals: dict[str, Tensor] = {}
        if "keys" in wanted:
            signals["keys"] = mean_keys(captured["k_proj"], self.heads)
        if "cls_attn" in wanted:
            signals["cls_attn"] = cls_attention_row(captured["q_proj"], captured["k_proj"],
                                                    self.heads, self.scale, bias)
        if "attn_received" in wanted:
            signals["attn_received"] = attention_received_row(
                captured["q_proj"], captured["k_proj"], self.heads, self.scale, bias, valid)
        if "values" in wanted:
            signals["values"] = captured["v_proj"].float()
        if "head_values" in wanted:
            v = captured["v_proj"].float()
            signals["head_values"] = v.reshape(*v.shape[:2], self.heads, -1).transpose(1, 2)
        if "attn_self_heads" in wanted or "attn_received_heads" in wanted:
            diag, received = attention_head_stats(captured["q_proj"], captured["k_proj"],
                                                  self.heads, self.scale, bias, valid)
            signals["attn_self_heads"], signals["attn_received_heads"] = diag, received
        return signals

    def _attention_half(self, run: EncoderRun, i: int, layer: torch.nn.Module, x: Tensor,
                        mask: Any, args: tuple, kwargs: dict[str, Any],
                        ) -> tuple[Tensor, dict[str, Tensor]]:
        """``x + post1(attn(norm1(x)))`` and the signals of the layer's q / k."""
        a = self.anatomy
        run.capture, run.captured = i, {}
        try:
            h, *_ = getattr(layer, a.attn)(getattr(layer, a.norm1)(x), mask, *args, **kwargs)
        finally:
            run.capture = None
        for name in a.post1:
            h = getattr(layer, name)(h)
        signals = self._signals(run.captured, mask, run.current.mask)
        run.captured = {}
        return x + h, signals

    # -- checks -------------------------------------------------------------------------------
    def _verify(self) -> None:
        """Each layer class, run as its submodules in :class:`Anatomy` order, must give its
        own forward's output bit for bit (on a small random input, in eval mode)."""
        seen: set[type] = set()
        gen = torch.Generator().manual_seed(0)
        for layer in self.layers:
            if type(layer) in seen or layer.training:
                continue
            seen.add(type(layer))
            param = next(layer.parameters(), None)
            if param is None or param.device.type == "meta":
                continue
            a = self.anatomy
            width = getattr(layer, a.norm1).weight.shape[0]
            x = torch.randn(1, 5, width, generator=gen).to(param.device, param.dtype)
            with torch.no_grad():
                ref = type(layer).forward(layer, x, None)
                h, *_ = getattr(layer, a.attn)(getattr(layer, a.norm1)(x), None)
                for name in a.post1:
                    h = getattr(layer, name)(h)
                mid = x + h
                h = getattr(layer, a.mlp)(getattr(layer, a.norm2)(mid))
                for name in a.post2:
                    h = getattr(layer, name)(h)
                mine = mid + h
            if not torch.equal(ref, mine):
                raise ValueError(f"{type(layer).__name__}: its forward is not the pre-norm "
                                 "attention + MLP form the in-encoder stage re-runs (outputs "
                                 "differ); this transformers release is not supported")


# -- apply ------------------------------------------------------------------------------------
def tower_has_cls(tower: torch.nn.Module) -> bool:
    """Whether a vision tower prepends a CLS token (CLIP ``class_embedding``, ViT / Dinov2
    ``cls_token``); SigLIP has none."""
    inner = getattr(tower, "vision_model", tower)
    emb = getattr(inner, "embeddings", None)
    return any(getattr(emb, n, None) is not None for n in ("class_embedding", "cls_token"))


def tower_patches(model: torch.nn.Module) -> int:
    """Patch tokens one image (or crop) puts into the vision tower, from the config
    (``vision_config`` of a VLM, the config of a backbone): ``(image_size / patch_size)^2``."""
    cfg = getattr(model.config, "vision_config", None) or model.config
    size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
    if not size or not patch:
        raise ValueError(f"{type(model).__name__}: its config gives no image_size / "
                         "patch_size; pass the method's own options instead of keep")
    size = int(size[0]) if isinstance(size, (tuple, list)) else int(size)
    patch = int(patch[0]) if isinstance(patch, (tuple, list)) else int(patch)
    return (size // patch) ** 2


def schedule_for_keep(model: torch.nn.Module, method: str, keep: int | float,
                      layers: Sequence[torch.nn.Module], has_cls: bool, until: int | None,
                      options: dict[str, Any]) -> EncoderSchedule:
    """The in-encoder schedule of ``method`` that leaves ``keep`` patch tokens (a count,
    or a fraction of the tower's patches; the CLS token not counted) at the last layer
    whose output is used (``EncoderSchedule.for_keep``: ToMe's ``r`` per layer, EViT's
    keep rate)."""
    from tokensieve.core.budget import resolve_keep
    from tokensieve.core.encoder_schedule import encoder_schedule_class, make_encoder_schedule

    cls = encoder_schedule_class(method)
    if cls is None:
        make_encoder_schedule(method, dict(options))  # raises: no in-encoder patch
    patches = tower_patches(model)
    k = resolve_keep(keep, patches)
    depth = len(layers)
    last = depth - 1 if until is None else until
    return cls.for_keep(k, patches + int(has_cls), has_cls, depth, last, dict(options))


def protected_tokens(stage: EncoderStage, shift: int) -> list[Tensor] | None:
    """Per image of the calling thread's last pass, the indices (into the image's tokens
    as the LLM gets them: patch index + ``shift``) its schedule protected; None if none."""
    run = stage.last
    keys = None if run is None else run.state.get("protect")
    return None if keys is None else [k + shift for k in keys]


def apply_encoder(model: torch.nn.Module, adapter_cls: type, method: str,
                  keep: int | float | None, *, seed: int, signal_layers: Any, llm: Any,
                  options: dict[str, Any]) -> torch.nn.Module:
    """``tokensieve.apply`` for a method acting inside the vision encoder (ToMe, EViT).

    The adapter says where the tower is (``encoder_tower()``: its layers, CLS, the last
    layer whose output is used); families whose later steps need the whole patch grid are
    refused (:data:`REFUSED`). On a VLM the tower's reduced output reaches the LLM through
    the pre-LLM surgery (the prompt's placeholders are cut to the tokens that come out); a
    plain backbone's ``forward`` is not wrapped at all (its layers are).
    """
    from tokensieve.core.api import ReduceConfig
    from tokensieve.core.encoder_schedule import make_encoder_schedule
    from tokensieve.core.registry import get_method
    from tokensieve.models._base import OFFICIAL, PatchState, _llm_step, install_state

    spec = get_method(method)
    family = adapter_cls.family
    if spec.stage != "encoder":
        raise ValueError(f"a {type(model).__name__} is a vision backbone without an LLM: method "
                         f"{spec.name!r} acts at stage {spec.stage!r}; tokensieve.apply runs "
                         "in-encoder methods (tome, evit) on backbones")
    from tokensieve.core.encoder_schedule import encoder_schedule_class

    rebuilds = bool(getattr(encoder_schedule_class(spec.name), "restores", False))
    if (family in REFUSED and not (rebuilds and family in REBUILT)) or not hasattr(
            adapter_cls, "encoder_tower"):
        why = REFUSED.get(family, "its adapter does not expose the vision tower")
        raise ValueError(f"method {spec.name!r} reduces tokens inside the vision tower, which "
                         f"the {family} family cannot take yet: {why}; tokensieve.apply runs "
                         "in-encoder methods on LLaVA-1.5 and on plain CLIP / SigLIP / ViT / "
                         "Dinov2 backbones, and 'expedit' (which rebuilds the whole grid) "
                         f"also on {', '.join(REBUILT)}")
    if keep is None:
        schedule = make_encoder_schedule(spec.name, dict(options))
    if signal_layers is not None:
        raise ValueError("signal_layers: in-encoder methods read their signals at the layers "
                         "that reduce")
    config = ReduceConfig(method=spec.name, keep=keep, options=dict(options), seed=seed)
    # The adapter holds no token-set options (the schedule has the in-encoder ones).
    adapter = adapter_cls(model, spec, ReduceConfig(method=spec.name, keep=None, seed=seed))
    layers, has_cls, until = adapter.encoder_tower()
    packed = adapter.packed_tower() if hasattr(adapter, "packed_tower") else None
    if keep is not None:
        schedule = schedule_for_keep(model, spec.name, keep, layers, has_cls, until, options)
    # A schedule that rebuilds the grid leaves the tower's output shape: no call is patched.
    feeds_llm = family != "vision" and not rebuilds
    stage = EncoderStage(layers, spec, schedule, has_cls, until=until, feeds_llm=feeds_llm,
                         packed=packed)
    llm_stage = None
    if llm == OFFICIAL:  # the method's own later stages (MustDrop's prefill stage), if any
        llm = spec.llm_stage if feeds_llm else None
    if llm is not None:
        if not feeds_llm:
            raise ValueError(f"llm={llm!r}: a plain vision backbone has no LLM")
        llm_stage = _llm_step(model, llm, seed)
    if llm_stage is not None and getattr(schedule, "protects", False) and "protect" in {
            f.name for f in dataclasses.fields(llm_stage.spec.config)}:
        # the in-LLM method never drops the tokens the encoder stage protects (MustDrop's
        # key set); with the CLS token fed to the LLM, patch i is the image's token i + 1
        full = getattr(model.config, "vision_feature_select_strategy", "default") == "full"
        llm_stage.protect_source = functools.partial(protected_tokens, stage,
                                                     int(full and has_cls))
    state = PatchState(config=config, spec=spec, adapter=adapter, llm=llm_stage,
                       encoder=stage)
    return install_state(model, state, patch_calls=feeds_llm)
