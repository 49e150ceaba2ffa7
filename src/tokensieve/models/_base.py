"""Patching machinery shared by every model family: state, wrappers, apply / remove.

All tokensieve state of a patched model lives in one attribute (``model._tokensieve``, a
:class:`PatchState`). Patching sets two instance attributes, ``forward`` and ``generate``,
that wrap the model's own methods; ``remove`` puts back exactly what was there before
(including instance attributes set by others, e.g. accelerate hooks) and deletes the state.
No module, config or attention implementation of the model is changed.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokensieve.core.api import ReduceConfig, reduce
from tokensieve.core.budget import resolve_keep
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import MethodSpec, get_method
from tokensieve.core.schedule import LlmSchedule
from tokensieve.models._llm import CallInputs, LlmStage, _cache_of, image_runs
from tokensieve.models._surgery import (
    Align,
    SurgeryPlan,
    check_padding,
    detect_align,
    plan_surgery,
)
from tokensieve.models._video import (
    Clip,
    first_columns,
    is_video_method,
    merge_items,
    reduce_clips,
    video_mode,
    whole,
)

STATE_ATTR = "_tokensieve"
PATCHED_ATTRS = ("forward", "generate")
#: Per-token inputs of a forward call that follow the sequence (cut with the same plan).
SEQUENCE_INPUTS = ("token_type_ids", "mm_token_type_ids")
#: Encoder layers whose attention (``cls_attn`` / ``attn_received``) a method reads by
#: default: a tuple of layer indices ("feature": the layer whose output becomes the LLM's
#: visual tokens), "all", or a per-family dict of those. Methods not listed read the
#: feature layer only (as ``[B, N]``); listed ones get ``[B, L, N]`` in the listed order.
DEFAULT_SIGNAL_LAYERS: dict[str, Any] = {
    "vtc-cls": "all",  # sums CLS attention over layers (its options pick the range)
    "hired": (0, "feature"),  # allocation layer 0, selection layer 22 of CLIP-L (feature)
    "hiprune": {"llava": (9, "feature"), "qwen2-vl": (16, "feature")},  # object, deep layer
}
SignalLayers = str | tuple[int | str, ...] | list[int | str] | None
#: ``apply(..., llm=OFFICIAL)``: a multi-stage method runs its own in-LLM stages.
OFFICIAL = "official"


@dataclass
class Encoded:
    """What an adapter's ``encode`` returns for the images of one call.

    Attributes:
        features: the reduced visual tokens the LLM receives, one ``[K_i, D]`` per image.
        counts: ``N_i``, the placeholder tokens of each image in the prompt.
        reductions: one ``(Reduction, grid)`` per image (the reduction sliced to that image).
        positions: per image, the source position (rank in its placeholder run) that each
            kept token stands for; used by families whose position ids depend on where a
            token sits in the image (M-RoPE). ``None`` when positions are re-indexed.
    """

    features: list[Tensor]
    counts: list[int]
    reductions: list[tuple[Reduction, tuple[int, int] | None]]
    positions: list[Tensor] | None = None
    #: Other entries of ``mm_encoder_outputs`` (e.g. unreduced video features).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> list[int]:
        return [int(f.shape[0]) for f in self.features]

    def run_groups(self) -> list[Tensor | None]:
        """Per item, the group of each token the LLM receives (``[K_i]`` long) when the
        method formed groups (``Reduction.groups``), else ``None``; tokens after the
        reduced ones (a video's newline tail, which the pre-LLM step always keeps) are in
        no group (``-1``: kept)."""
        out: list[Tensor | None] = []
        for feats, (r, _grid) in zip(self.features, self.reductions, strict=True):
            if r.groups is None:
                out.append(None)
                continue
            g = r.groups[0] if r.mask is None else r.groups[0][r.mask[0]]
            tail = int(feats.shape[0]) - int(g.numel())
            if tail < 0:
                out.append(None)
                continue
            out.append(torch.cat([g, g.new_full((tail,), -1)]))
        return out


@dataclass
class PatchState:
    """Everything tokensieve keeps on a patched model.

    Attributes:
        config: the method and its settings (plain data; write it into results files).
        spec: the method's registry entry.
        adapter: the model family's adapter.
        saved: per patched attribute, whether the instance had its own value and which.
        llm: the in-LLM stage (hooks on the language model) of an in-LLM method, else None.
        caches: the KV caches that reduced calls returned, with the surgery of their prompt
            (a later call continuing one of them is mapped onto the shortened sequence).

    ``last`` and ``last_plan`` are the calling thread's last reduced call; a copy or an
    unpickled model starts without them and without ``caches``.
    """

    config: ReduceConfig
    spec: MethodSpec
    adapter: Adapter
    saved: dict[str, tuple[bool, Any]] = field(default_factory=dict)
    llm: LlmStage | None = None
    #: The in-encoder stage (layer wrappers in the vision tower) of an encoder method.
    encoder: Any = None
    caches: weakref.WeakKeyDictionary[Any, SurgeryPlan] = field(
        default_factory=weakref.WeakKeyDictionary, repr=False)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @property
    def last(self) -> list[tuple[Reduction, tuple[int, int] | None]]:
        """Per image of this thread's last reduced call, ``(Reduction, grid)``."""
        return getattr(self._local, "last", [])

    @last.setter
    def last(self, value: list[tuple[Reduction, tuple[int, int] | None]]) -> None:
        self._local.last = value

    @property
    def last_groups(self) -> list[Tensor | None]:
        """Per item of this thread's last reduced call, its tokens' groups (see
        :meth:`Encoded.run_groups`)."""
        return getattr(self._local, "last_groups", [])

    @last_groups.setter
    def last_groups(self, value: list[Tensor | None]) -> None:
        self._local.last_groups = value

    @property
    def last_plan(self) -> SurgeryPlan | None:
        """The sequence surgery of this thread's last reduced call (kept columns per row)."""
        return getattr(self._local, "last_plan", None)

    @last_plan.setter
    def last_plan(self, value: SurgeryPlan | None) -> None:
        self._local.last_plan = value

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["caches"], state["_local"]  # per call: not copied, not pickled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.caches = weakref.WeakKeyDictionary()
        self._local = threading.local()

    @property
    def pre_llm(self) -> bool:
        """Whether the method acts on the visual tokens before the LLM."""
        return self.spec.stage == "pre-llm" or bool(getattr(self.encoder, "feeds_llm", False))

    def to_dict(self) -> dict[str, Any]:
        """What runs, as plain data (for results files): the method config, the model
        family and the encoder layers the attention signals come from."""
        out = {**self.config.to_dict(), "stage": self.spec.stage,
               "family": self.adapter.family, "signal_layers": self.adapter.signal_layers}
        if self.adapter.video is not None:
            out["video"] = self.adapter.video
        if self.llm is not None and self.pre_llm:
            out["llm"] = {**self.llm.config.to_dict(), "stage": "llm"}
        return out


class Adapter:
    """One model family: where visual tokens live, how to capture signals, how to cut.

    Subclasses set the class attributes and implement ``encode`` (and, where the family
    differs from the defaults, ``has_visual_inputs``, ``placeholder_mask``,
    ``fix_positions``, ``encoder_outputs``); they hold no method logic (a method is one
    ``reduce`` call over tensors, see :meth:`run_method`).
    """

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: Signals this family can give a method.
    signals: ClassVar[tuple[str, ...]] = ()
    #: Keyword inputs holding raw images; dropped once the images are encoded.
    visual_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: Whether the family's position ids need each kept token's source position (M-RoPE).
    needs_positions: ClassVar[bool] = False
    #: Whether the family takes video inputs (``encode_clips`` and the hooks after it).
    has_video: ClassVar[bool] = False
    #: How videos are reduced (``apply(..., video=...)``; see ``tokensieve.models._video``):
    #: None (left whole), "clip" or "frame".
    video: str | None = None

    def __init__(self, model: torch.nn.Module, spec: MethodSpec, config: ReduceConfig,
                 signal_layers: SignalLayers = None) -> None:
        self.model = model
        self.spec = spec
        self.config = config
        self.signal_layers = signal_layers
        #: The signals the method needs with its options (``MethodSpec.required_signals``).
        self.required = spec.required_signals(spec.make_config(dict(config.options)))

    # -- family hooks ---------------------------------------------------------------------
    def check(self) -> None:
        """Validate the model and the method at ``apply`` time (raise ValueError)."""
        self.check_signals()

    def check_signals(self) -> None:
        """Raise ValueError when the method, with its options, needs a signal this family
        cannot give, or a patch grid on a family whose token sets are no grid."""
        missing = [s for s in self.required if s not in self.signals]
        if missing:
            raise ValueError(
                f"method {self.spec.name!r} needs the signal(s) {missing}, which the "
                f"{self.family} adapter cannot give (it gives {list(self.signals)})")
        if "grid" not in self.signals and "grid" in self.spec.optional_signals and \
                self._needs_grid():
            raise ValueError(
                f"method {self.spec.name!r} (options {self.config.options}) needs a patch "
                f"grid; the {self.family} adapter's token sets are not grids (packed images)")

    def _needs_grid(self) -> bool:
        """Whether the method, with its options, fails on a token set that is not a square
        grid when no ``grid`` is given (tried on 6 dummy tokens with dummy signals)."""
        n, d = 6, 4
        gen = torch.Generator().manual_seed(0)
        dummy: dict[str, Any] = {}
        for name in self.required:
            if name in ("cls_attn", "attn_received", "query_attn"):
                dummy[name] = torch.full((1, n), 1.0 / n)
            elif name in ("keys", "values"):
                dummy[name] = torch.randn(1, n, d, generator=gen)
            elif name == "text":
                dummy[name] = torch.randn(1, 2, d, generator=gen)
            else:
                return False  # no dummy for it: checked at the call
        options = dict(self.config.options)
        if self.spec.cls_token:
            options["has_cls"] = False
        try:
            reduce(torch.randn(1, n, d, generator=gen), self.spec.name, 2, **dummy, **options)
        except ValueError as err:
            return "'grid'" in str(err)
        return False

    def has_visual_inputs(self, args: dict[str, Any]) -> bool:
        """Whether a call carries images or videos to reduce (default: ``pixel_values``
        given, unless the method reduces videos only; ``pixel_values_videos`` given when
        videos are reduced)."""
        images = args.get("pixel_values") is not None and not is_video_method(self.spec)
        return images or (self.video is not None and args.get("pixel_values_videos") is not None)

    # -- video hooks (families with ``has_video``) ----------------------------------------
    def video_placeholder_mask(self, args: dict[str, Any]) -> Tensor:
        """``[B, T]`` True on the video placeholder tokens (``config.video_token_id``)."""
        video_id = self.model.config.video_token_id
        if args.get("input_ids") is None:
            raise ValueError("input_ids: reducing videos needs the prompt's token ids")
        return args["input_ids"] == video_id

    def encode_clips(self, args: dict[str, Any]) -> list[Clip]:
        """Every video of the call as a :class:`Clip` (the LLM's tokens of its frames)."""
        raise NotImplementedError

    def image_features(self, args: dict[str, Any]) -> list[Tensor]:
        """The images' LLM tokens, unreduced (one ``[N_i, D]`` per image)."""
        raise NotImplementedError

    def video_features(self, args: dict[str, Any]) -> Any:
        """The model's own ``mm_encoder_outputs["video"]`` of the call (videos whole)."""
        raise NotImplementedError

    def video_outputs(self, features: list[Tensor]) -> Any:
        """``mm_encoder_outputs["video"]`` holding the reduced videos' tokens."""
        raise NotImplementedError

    def placeholder_mask(self, args: dict[str, Any]) -> Tensor:
        """``[B, T]`` True on the image placeholder tokens (``config.image_token_id``), from
        ``input_ids`` or, without them, by comparing ``inputs_embeds`` with its embedding."""
        image_id = self.model.config.image_token_id
        if args.get("input_ids") is not None:
            return args["input_ids"] == image_id
        embeds = args["inputs_embeds"]
        ref = self.model.get_input_embeddings()(torch.tensor(image_id, device=embeds.device))
        return (embeds == ref).all(-1)

    def encode(self, args: dict[str, Any], placeholder: Tensor) -> Encoded:
        raise NotImplementedError

    def fix_positions(self, args: dict[str, Any], new: dict[str, Any], plan: SurgeryPlan,
                      enc: Encoded, generating: bool) -> None:
        """Set the position inputs of the shortened call (default: 1D positions re-indexed
        contiguously, i.e. a kept token's position minus the tokens cut before it)."""
        pos = args.get("position_ids")
        if pos is not None:
            new["position_ids"] = plan.take(pos - plan.dropped_before.to(pos.device), 0,
                                            dim=1 if pos.dim() == 2 else -1)

    # -- shared helpers -------------------------------------------------------------------
    def layer_plan(self, depth: int, feature: int) -> list[int] | None:
        """Encoder layers (0-based) whose attention signals are stacked ``[B, L, N]``, or
        None for the feature layer alone (``[B, N]``)."""
        wanted = self.signal_layers
        source = "signal_layers"
        if wanted is None:
            wanted = DEFAULT_SIGNAL_LAYERS.get(self.spec.name)
            if isinstance(wanted, dict):
                wanted = wanted.get(self.family)
            source = f"the default signal layers of {self.spec.name!r}"
        if wanted is None:
            return None
        if wanted == "all":
            return list(range(depth))
        if isinstance(wanted, str) or not isinstance(wanted, (tuple, list)) or not wanted:
            raise ValueError(f"signal_layers={wanted!r}: expected 'all' or a non-empty tuple of "
                             "encoder layer indices (or 'feature')")
        out = []
        for w in wanted:
            if w == "feature":
                out.append(feature)
                continue
            if isinstance(w, bool) or not isinstance(w, int) or not -depth <= w < depth:
                raise ValueError(f"{source}: layer {w!r} is not an encoder layer of this "
                                 f"{depth}-layer tower; pass signal_layers=(...) with indices "
                                 f"in [-{depth}, {depth}) or 'feature'")
            out.append(w % depth)
        return out

    def wants(self, name: str) -> bool:
        """Whether the method uses signal ``name`` (only those are computed)."""
        return (name in self.required or name in self.spec.signals
                or name in self.spec.optional_signals)

    def resolve_keep(self, n: int) -> int:
        """The per-image budget for an image of ``n`` LLM visual tokens."""
        try:
            return resolve_keep(self.config.keep, n)
        except ValueError as err:
            raise ValueError(f"{err}; each image gives the {self.family} LLM {n} visual "
                             "tokens") from None

    def run_method(self, tokens: Tensor, k: int, signals: dict[str, Any],
                   has_cls: bool) -> Reduction:
        """Run the configured method on ``tokens`` ``[I, N, D]`` (one row per image)."""
        options = dict(self.config.options)
        if self.spec.cls_token:
            options["has_cls"] = has_cls
        given = {k_: v for k_, v in signals.items() if v is not None}
        r = reduce(tokens, self.spec.name, k, seed=self.config.seed, **given, **options)
        if not (torch.is_grad_enabled() and tokens.requires_grad):
            return r
        # reduce runs without autograd: take the kept tokens from ``tokens`` again, with it.
        if self.spec.kind != "subset" or r.indices is None or \
                r.indices.shape[1] != r.tokens.shape[1]:
            raise ValueError(
                f"method {self.spec.name!r} ({self.spec.kind}) builds new tokens without "
                "autograd, so gradients would not reach the vision tower and projector; call "
                "the model under torch.no_grad() / torch.inference_mode(), freeze them "
                "(requires_grad_(False)) or use a subset method")
        idx = r.indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return dataclasses.replace(r, tokens=torch.gather(tokens, 1, idx))

    def use_cls(self) -> bool:
        """Whether a method that can take a leading CLS token gets it (option ``has_cls``,
        default True)."""
        return self.spec.cls_token and bool(self.config.options.get("has_cls", True))

    def text_signal(self, args: dict[str, Any], placeholder: Tensor, counts: list[int],
                    exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-image prompt text: ``text [I, M, D]`` and ``text_mask [I, M]``, the LLM input
        embeddings of the real non-image tokens of each image's sample (the model's own
        stand-in for a text encoder; in the space of the projected visual tokens).
        ``exclude``: other placeholder columns that are not text either (``[B, T]``)."""
        other = placeholder if exclude is None else placeholder | exclude
        embeds = args.get("inputs_embeds")
        if embeds is None:  # placeholder ids may lie outside the vocabulary: embed them as 0
            ids = args["input_ids"].masked_fill(other, 0)
            embeds = self.model.get_input_embeddings()(ids)
        text = ~other
        for key in ("video_token_id",):
            other = getattr(self.model.config, key, None)
            if other is not None and args.get("input_ids") is not None:
                text = text & (args["input_ids"] != other)
        if args.get("attention_mask") is not None:
            text = text & args["attention_mask"].bool()
        rows_of_images = image_sample(placeholder, counts)
        m = max(int(text.sum(dim=1).max()), 1)
        b, t, d = embeds.shape
        order = torch.sort((~text).long(), dim=1, stable=True).indices[:, :m]
        rows = torch.gather(embeds, 1, order.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.gather(text, 1, order)
        return rows[rows_of_images], mask[rows_of_images]

    @staticmethod
    def split(r: Reduction, tokens: Tensor, grid: tuple[int, int] | None,
              ) -> tuple[list[Tensor], list[tuple[Reduction, tuple[int, int] | None]]]:
        """Per-image features (padding of adaptive methods dropped) and reductions."""
        feats, per = [], []
        for i in range(tokens.shape[0]):
            row = tokens[i] if r.mask is None else tokens[i][r.mask[i]]
            feats.append(row)
            per.append((_slice_reduction(r, i), grid))
        return feats, per

    # -- the call -------------------------------------------------------------------------
    def prepare(self, state: PatchState, args: dict[str, Any], align: Align,
                generating: bool = False) -> dict[str, Any]:
        """Encode and reduce the images of a call and cut its sequence; returns the keyword
        arguments for the model's own ``forward`` (or ``generate`` when ``generating``)."""
        mask = args.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"attention_mask: expected a 2D [B, T] mask, got shape "
                             f"{tuple(mask.shape)}")
        check_padding(mask)
        placeholder = self.placeholder_mask(args)
        kinds = None
        if self.video is not None and args.get("pixel_values_videos") is not None:
            placeholder, enc, kinds = self._encode_with_videos(args, placeholder)
        else:
            enc = self.encode(args, placeholder)
            if self.has_video and args.get("pixel_values_videos") is not None:
                enc.extra["video"] = self.video_features(args)
        plan = plan_surgery(placeholder, enc.counts, enc.kept, align, mask)
        new = {k: v for k, v in args.items() if k not in self.visual_keys}
        filler = self.filler_id()
        if args.get("input_ids") is not None:
            new["input_ids"] = plan.take(args["input_ids"], filler)
        if args.get("inputs_embeds") is not None:
            new["inputs_embeds"] = plan.take(args["inputs_embeds"], 0.0)
        if mask is not None:
            new["attention_mask"] = plan.take(mask, 0)
        elif not bool(plan.valid.all()):
            new["attention_mask"] = plan.valid.long()
        if args.get("labels") is not None:
            new["labels"] = plan.take(args["labels"], -100)
        for key in SEQUENCE_INPUTS:
            if isinstance(args.get(key), Tensor) and args[key].shape[:2] == placeholder.shape:
                new[key] = plan.take(args[key], 0)
        self.fix_positions(args, new, plan, enc, generating)
        if kinds is None:
            outputs = self.encoder_outputs(enc.features)
        else:
            images = [f for f, k in zip(enc.features, kinds, strict=True) if k == "image"]
            outputs = {"video": self.video_outputs(
                [f for f, k in zip(enc.features, kinds, strict=True) if k == "video"])}
            if images:
                outputs.update(self.encoder_outputs(images))
        new["mm_encoder_outputs"] = {**outputs, **enc.extra}
        state.last = enc.reductions
        state.last_groups = enc.run_groups()
        state.last_plan = plan
        return new

    def _encode_with_videos(self, args: dict[str, Any], image_mask: Tensor,
                            ) -> tuple[Tensor, Encoded, list[str]]:
        """Images (reduced, or whole under a video method) and reduced videos of a call as
        items in prompt order: ``(placeholder mask, Encoded, kinds)``."""
        video_mask = self.video_placeholder_mask(args)
        if args.get("pixel_values") is None:
            images = Encoded(features=[], counts=[], reductions=[], positions=[])
        elif is_video_method(self.spec):
            images = whole(self.image_features(args))
        else:
            images = self.encode(args, image_mask)
        clips = self.encode_clips(args)
        counts = [c.count for c in clips]
        text = None
        if self.wants("text"):
            text = self.text_signal(args, video_mask, counts, exclude=image_mask)
        videos = reduce_clips(self, clips, self.video or "clip", text)
        return merge_items(image_mask, images, video_mask, videos)

    def continue_positions(self, pos: Tensor, plan: SurgeryPlan) -> Tensor:
        """The caller's position ids of tokens after a shortened prompt, on the shortened
        sequence (default: moved back by the image tokens cut from their row)."""
        pos = pos if pos.dim() == 2 else pos.unsqueeze(0)
        shift = plan.rows(max(pos.shape[0], plan.shift.shape[0])).shift
        return pos - shift.unsqueeze(1).to(pos.device)

    def llm_inputs(self, args: dict[str, Any]) -> CallInputs:
        """What the in-LLM stage needs of a call: the visual runs of its LLM input (one run
        of placeholder tokens per image, and per video for families with video inputs), the
        2D attention mask and, for families whose images attend bidirectionally, their
        blocks (see :meth:`llm_block_ids`)."""
        image_of = None
        if args.get("input_ids") is not None or args.get("inputs_embeds") is not None:
            visual = self.placeholder_mask(args)
            if self.has_video and args.get("input_ids") is not None:
                visual = visual | self.video_placeholder_mask(args)
            image_of = image_runs(visual)
        mask = args.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError("attention_mask: the in-LLM stage needs a 2D [B, T] mask (or none)")
        if image_of is not None and bool((image_of >= 0).any()) and \
                not _cache_length(_cache_of(args)):
            check_padding(mask)  # a prefill that cuts
        return CallInputs(image_of=image_of, mask=mask, block_ids=self.llm_block_ids(args))

    def llm_block_ids(self, args: dict[str, Any]) -> Tensor | None:
        """``[B, T]`` bidirectional attention blocks of the LLM input (default: none)."""
        return None

    def encoder_outputs(self, features: list[Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=features)}

    def filler_id(self) -> int:
        """Token id written on padding columns the surgery adds (masked out)."""
        cfg = getattr(self.model.config, "text_config", self.model.config)
        pad = getattr(cfg, "pad_token_id", None)
        image = getattr(self.model.config, "image_token_id", None)
        if pad is None or pad == image:
            pad = 0 if image != 0 else 1
        return int(pad)


def image_sample(placeholder: Tensor, counts: list[int]) -> Tensor:
    """``[I]`` the batch row holding each image's placeholder run."""
    return first_columns(placeholder, counts) // placeholder.shape[1]


def _slice_reduction(r: Reduction, i: int) -> Reduction:
    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[i:i + 1]

    return Reduction(tokens=r.tokens[i:i + 1], indices=cut(r.indices), positions=cut(r.positions),
                     sizes=cut(r.sizes), mask=cut(r.mask), assignment=cut(r.assignment),
                     groups=cut(r.groups))


# -- wrappers -------------------------------------------------------------------------------
def _bind(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Named arguments of a call (a ``**kwargs`` catch-all flattened in)."""
    bound = sig.bind(*args, **kwargs)
    named = dict(bound.arguments)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(p.name, {}))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL and named.get(p.name):
            raise ValueError("tokensieve: pass the model's inputs by keyword")
    return named


#: Set while a patched ``generate`` runs the model's own on a shortened sequence: the
#: forward calls it makes are already in the shortened sequence's columns.
_SHORTENED: contextvars.ContextVar[bool] = contextvars.ContextVar("tokensieve_shortened",
                                                                  default=False)


def _cache_length(cache: Any) -> int:
    """Tokens held by a KV cache (0 for none or an empty one)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 1 if cache else 0


def _new_tokens(named: dict[str, Any]) -> int | None:
    """How many tokens a call brings (from ``input_ids`` or ``inputs_embeds``)."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(named.get(key), Tensor):
            return int(named[key].shape[1])
    return None


def _returned_cache(out: Any) -> Any:
    """The KV cache a model output carries (``cache`` or ``past_key_values``), or None."""
    if isinstance(out, Tensor):
        return None
    cache = getattr(out, "cache", None)
    return getattr(out, "past_key_values", None) if cache is None else cache


def _remember(state: PatchState, out: Any, plan: SurgeryPlan) -> None:
    cache = _returned_cache(out)
    if cache is not None:
        state.caches[cache] = plan


def _continue_forward(state: PatchState, named: dict[str, Any], cache: Any,
                      past: int) -> dict[str, Any]:
    """A call without images on a non-empty KV cache. A cache a reduced call returned holds
    the shortened prompt: the caller's 2D mask over the whole sequence (prompt, cached
    tokens after it, this call's) and position ids are mapped onto it (a mask as long as
    the cache plus this call is taken as already shortened, positions too). Other masks
    longer than the cache plus this call are refused."""
    plan = state.caches.get(cache)
    mask = named.get("attention_mask")
    q = _new_tokens(named)
    if not isinstance(mask, Tensor) or mask.dim() != 2 or q is None:
        if plan is not None and isinstance(named.get("position_ids"), Tensor):
            named = dict(named, position_ids=state.adapter.continue_positions(
                named["position_ids"], plan))
        return named
    if plan is None:
        if mask.shape[1] > past + q:
            raise ValueError(
                f"attention_mask: {mask.shape[1]} columns, but the KV cache holds {past} tokens "
                f"and the call brings {q}; a cache that a tokensieve reduction shortened "
                "continues only on the patched model whose call returned it (not a copy, not "
                "after remove or apply again); re-send the whole history instead")
        return named
    cut = plan.keep.shape[1] - plan.new_length
    if mask.shape[1] == past + q:
        return named
    if mask.shape[1] != past + q + cut:
        raise ValueError(
            f"attention_mask: shape {tuple(mask.shape)}; continuing a KV cache shortened by "
            f"tokensieve needs the 2D mask of the whole sequence ({past + q + cut} columns: "
            f"the {plan.keep.shape[1]}-column prompt, the tokens cached after it and the new "
            "ones)")
    named = dict(named, attention_mask=plan.extend(mask, 0))
    if isinstance(named.get("position_ids"), Tensor):
        named["position_ids"] = state.adapter.continue_positions(named["position_ids"], plan)
    return named


def _forward(state: PatchState, original: Callable[..., Any], args: tuple,
             kwargs: dict[str, Any]) -> Any:
    named = _bind(inspect.signature(original), args, kwargs)
    adapter = state.adapter
    cache = _cache_of(named)
    past = _cache_length(cache)
    plan = None
    if state.pre_llm and adapter.has_visual_inputs(named):
        if past:
            raise ValueError(
                "continuing a KV cache with new images is not supported by a tokensieve-patched "
                "model; re-send the whole history (with its images) without the cache")
        named = adapter.prepare(state, named, detect_align(named.get("attention_mask")))
        plan = state.last_plan
    elif state.pre_llm and past and not _SHORTENED.get():
        named = _continue_forward(state, named, cache, past)
    elif state.llm is None:
        return original(*args, **kwargs)
    if state.llm is None:
        out = original(**named)
    else:
        call = adapter.llm_inputs(named)
        if plan is not None and any(g is not None for g in state.last_groups):
            call = dataclasses.replace(call, groups=state.last_groups)
        with state.llm.call(call):
            out = original(**named)
    if plan is not None:
        _remember(state, out, plan)
    return out


def _continue_generate(state: PatchState, named: dict[str, Any],
                       plan: SurgeryPlan) -> dict[str, Any]:
    """``generate`` continuing a cache a reduced call returned: the caller's whole sequence
    (``input_ids``, mask) is mapped onto the shortened one the cache holds."""
    ids = named.get("input_ids")
    if ids is None:
        raise ValueError("generate: continuing a KV cache shortened by tokensieve needs the "
                         "input_ids of the whole sequence")
    mask = named.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(mask.shape)}; continuing a KV cache "
                         f"shortened by tokensieve needs the 2D mask of input_ids "
                         f"{tuple(ids.shape)}")
    if isinstance(named.get("position_ids"), Tensor):
        raise ValueError("generate: position_ids are not supported when continuing a KV cache "
                         "shortened by tokensieve")
    return dict(named, input_ids=plan.extend(ids, state.adapter.filler_id()),
                attention_mask=plan.extend(mask, 0))


def _generate(state: PatchState, original: Callable[..., Any], inputs: Tensor | None,
              kwargs: dict[str, Any]) -> Any:
    named = dict(kwargs)
    if inputs is not None:
        if "input_ids" in named:
            raise ValueError("generate: got both `inputs` and `input_ids`")
        named["input_ids"] = inputs
    cache = _cache_of(named)
    plan = None if cache is None or not state.pre_llm else state.caches.get(cache)
    if state.pre_llm and state.adapter.has_visual_inputs(named):
        if _cache_length(cache):
            raise ValueError("generate: continuing a KV cache with new images is not supported "
                             "by a tokensieve-patched model; re-send the whole history")
        with torch.no_grad():  # as generate itself: no autograd graph for the images
            new = state.adapter.prepare(state, named, "right", generating=True)
        plan = state.last_plan
    elif plan is not None:
        new = _continue_generate(state, named, plan)
    else:
        return original(inputs, **kwargs)
    ids = named.get("input_ids")
    if isinstance(new.get("max_length"), int):
        new["max_length"] -= plan.keep.shape[1] - plan.new_length
    token = _SHORTENED.set(True)
    try:
        out = original(**new)
    finally:
        _SHORTENED.reset(token)
    _remember(state, out, plan)
    if ids is None:
        return out
    seq = out if isinstance(out, Tensor) else out.sequences
    n_short = new["input_ids"].shape[1]
    prompt = ids.to(seq.device).repeat_interleave(seq.shape[0] // ids.shape[0], dim=0)
    full = torch.cat([prompt, seq[:, n_short:]], dim=1)
    if isinstance(out, Tensor):
        return full
    out.sequences = full
    return out


class _Patched:
    """A patched ``forward`` / ``generate`` (an instance attribute of the model).

    It holds the model, not a closure over it: its state and the model's own method are
    looked up at each call, so a deep copy or an unpickled copy of a patched model is an
    independent patched model (its own modules, state and hooks).
    """

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    def original(self) -> Callable[..., Any]:
        """The model's own method (or the instance attribute that ``apply`` found)."""
        state = get_state(self.model)
        own, value = state.saved.get(self.name, (False, None)) if state else (False, None)
        return value if own else getattr(type(self.model), self.name).__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.original())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = get_state(self.model)
        original = self.original()
        if state is None:
            return original(*args, **kwargs)
        if self.name == "forward":
            return _forward(state, original, args, kwargs)
        inputs = args[0] if args else kwargs.pop("inputs", None)
        if len(args) > 1:
            raise ValueError("tokensieve: pass generate's inputs by keyword")
        return _generate(state, original, inputs, kwargs)


# -- apply / remove -------------------------------------------------------------------------
_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator adding a family adapter."""
    _ADAPTERS.append(cls)
    return cls


def supported_models() -> list[str]:
    """Class names of the models ``apply`` supports."""
    _load_adapters()
    return sorted(name for a in _ADAPTERS for name in a.model_classes)


def _load_adapters() -> None:
    import tokensieve.models.gemma3  # noqa: F401
    import tokensieve.models.idefics3  # noqa: F401
    import tokensieve.models.llava  # noqa: F401
    import tokensieve.models.llava_next  # noqa: F401
    import tokensieve.models.llava_onevision  # noqa: F401
    import tokensieve.models.qwen_vl  # noqa: F401
    import tokensieve.models.vision  # noqa: F401


def find_adapter(model: object) -> type[Adapter]:
    _load_adapters()
    for klass in type(model).__mro__:
        for adapter in _ADAPTERS:
            if klass.__name__ in adapter.model_classes:
                return adapter
    raise ValueError(f"tokensieve cannot patch a {type(model).__name__}; supported models: "
                     f"{', '.join(supported_models())}")


def get_state(model: object) -> PatchState | None:
    """The tokensieve state of a patched model (None when not patched)."""
    return model.__dict__.get(STATE_ATTR) if hasattr(model, "__dict__") else None


def apply(model: torch.nn.Module, method: str, keep: int | float | None = None, *, seed: int = 0,
          signal_layers: SignalLayers = None, llm: str | ReduceConfig | None = OFFICIAL,
          video: str | None = None, **options: Any) -> torch.nn.Module:
    """Patch ``model`` in place so that every call with images reduces its visual tokens.

    Args:
        model: a supported Hugging Face VLM (see :func:`supported_models`).
        method: a name from ``tokensieve.list_methods()``.
        keep: per image, an int count of visual tokens or a float fraction of them. For
            in-LLM methods: the count kept from a single-cut method's layer on, the average
            per LLM layer for a multi-stage schedule (``tokensieve.core.schedule``); ``None``
            gives an in-LLM method its official budget (e.g. FastV's R = 50 %).
        seed: seed of methods that draw random numbers.
        signal_layers: encoder layers whose attention signals (``cls_attn``,
            ``attn_received``) the method gets, stacked ``[B, L, N]``: a tuple of layer
            indices (negative from the end; "feature" = the layer feeding the LLM) or "all".
            Default: the method's official layers (``DEFAULT_SIGNAL_LAYERS``), else the
            feature layer alone (``[B, N]``).
        llm: an in-LLM method run after a pre-LLM ``method`` (a two-step pipeline): its name
            (official budget and options) or a ``ReduceConfig(method, keep, options)``; its
            ``keep`` counts the tokens each image brings into the LLM after ``method``.
            Default ``"official"``: a multi-stage method's own in-LLM stages (e.g.
            VisionDrop's), none for single-stage methods; ``None``: no in-LLM step.
        video: how a pre-LLM method reduces video inputs (LLaVA-OneVision, Qwen2-VL,
            Qwen2.5-VL): ``"clip"`` (each video as one token set; ``keep`` counts the clip's
            tokens), ``"frame"`` (an image method on every frame; ``keep`` counts a frame's
            tokens) or ``None`` (videos left whole). Video methods (``evs``, ``dycoke``,
            ...: those needing the ``frames`` signal) always reduce whole clips and leave
            images whole. See ``tokensieve.models._video``.
        **options: the method's options (``tokensieve.describe(method).defaults()``).

    Returns:
        The same model (patched). Applying to a patched model raises ValueError.
    """
    if get_state(model) is not None:
        st = get_state(model)
        raise ValueError(f"model is already patched by tokensieve ({st.config.method}, "
                         f"keep={st.config.keep}); call tokensieve.remove(model) first")
    adapter_cls = find_adapter(model)
    mode = video_mode(get_method(method), video, adapter_cls.family, adapter_cls.has_video)
    if get_method(method).stage == "encoder" or adapter_cls.family == "vision":  # in the tower
        from tokensieve.models._encoder import apply_encoder

        return apply_encoder(model, adapter_cls, method, keep, seed=seed,
                             signal_layers=signal_layers, llm=llm, options=options)
    if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
        import transformers

        raise ValueError(f"{type(model).__name__}.forward takes no `mm_encoder_outputs` in "
                         f"transformers {transformers.__version__}; tokensieve.apply needs a "
                         "transformers release whose VLMs accept pre-encoded image features "
                         "(5.x)")
    spec = get_method(method)
    spec.make_config({k: v for k, v in options.items()})  # unknown options fail here
    in_llm = spec.stage == "llm" and isinstance(spec.config, type) and issubclass(
        spec.config, LlmSchedule)
    if spec.stage != "pre-llm" and not in_llm:
        raise ValueError(f"method {spec.name!r} acts at stage {spec.stage!r}; its in-model patch "
                         "is not built yet (tokensieve.reduce runs it on token sets); "
                         "tokensieve.apply runs pre-LLM and in-LLM methods")
    if keep is None and not in_llm:
        raise ValueError(f"keep=None: method {spec.name!r} needs a budget (a count or a fraction "
                         "of each image's tokens)")
    config = ReduceConfig(method=spec.name, keep=keep, options=dict(options), seed=seed)
    adapter = adapter_cls(model, spec, config, signal_layers)
    adapter.video = mode
    if in_llm:
        if signal_layers is not None:
            raise ValueError("signal_layers: in-LLM methods read their scores at their own "
                             "decoder layers (options `layer` / `layers`)")
        if llm is not None and llm != OFFICIAL:
            raise ValueError(f"llm={llm!r}: {spec.name!r} already acts inside the LLM; a "
                             "pipeline is a pre-LLM method followed by an in-LLM one")
        stage = llm_stage(model, spec, config)
    else:
        adapter.check()
        if llm == OFFICIAL:  # the method's own later stages, if it has any
            llm = spec.llm_stage
        stage = None if llm is None else _llm_step(model, llm, seed)
    state = PatchState(config=config, spec=spec, adapter=adapter, llm=stage)
    return install_state(model, state)


def install_state(model: torch.nn.Module, state: PatchState,
                  patch_calls: bool = True) -> torch.nn.Module:
    """Patch ``forward`` / ``generate`` (unless ``patch_calls`` is False), install the
    state's stages and attach the state; returns the model."""
    for name in PATCHED_ATTRS if patch_calls else ():
        if not hasattr(model, name):
            continue
        own = name in model.__dict__
        state.saved[name] = (own, model.__dict__.get(name))
        object.__setattr__(model, name, _Patched(model, name))
    if state.encoder is not None:
        state.encoder.install()
    if state.llm is not None:
        state.llm.install()
    object.__setattr__(model, STATE_ATTR, state)
    return model


def _llm_step(model: torch.nn.Module, llm: str | ReduceConfig, seed: int) -> LlmStage:
    """The in-LLM step of a pipeline, from a method name or a ``ReduceConfig``."""
    if isinstance(llm, str):
        llm = ReduceConfig(method=llm, keep=None, seed=seed)
    if not isinstance(llm, ReduceConfig):
        raise ValueError(f"llm={llm!r}: expected an in-LLM method name or a "
                         "tokensieve.ReduceConfig(method, keep, options)")
    spec = get_method(llm.method)
    if spec.stage != "llm" or not issubclass(spec.config, LlmSchedule):
        raise ValueError(f"llm={llm.method!r}: expected an in-LLM method (one of "
                         f"{list_llm_methods()})")
    config = ReduceConfig(method=spec.name, keep=llm.keep, options=dict(llm.options),
                          seed=llm.seed)
    return llm_stage(model, spec, config)


def llm_stage(model: torch.nn.Module, spec: MethodSpec, config: ReduceConfig) -> Any:
    """The stage that runs an in-LLM method: its prefill cuts (:class:`LlmStage`) or, for a
    decoding-time method (config ``decode = True``), :class:`DecodeStage`."""
    if getattr(spec.config, "decode", False):
        from tokensieve.models._decode import DecodeStage

        return DecodeStage(model, spec, config)
    return LlmStage(model, spec, config)


def list_llm_methods() -> list[str]:
    """Names of the methods that run inside the LLM (``apply`` patches them)."""
    from tokensieve.core.registry import list_methods

    return [m for m in list_methods() if isinstance(get_method(m).config, type)
            and issubclass(get_method(m).config, LlmSchedule)]


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply` exactly (a no-op on an unpatched model). Returns the model."""
    state = get_state(model)
    if state is None:
        return model
    for name, (own, value) in state.saved.items():
        if own:
            object.__setattr__(model, name, value)
        else:
            del model.__dict__[name]
    if state.llm is not None:
        state.llm.remove()
    if state.encoder is not None:
        state.encoder.remove()
    del model.__dict__[STATE_ATTR]
    return model
