"""The in-LLM stage: cut image tokens at decoder layers of the language model.

Family-agnostic: it needs the text model (``layers``, ``norm``, ``rotary_emb``, a config)
and, per call, which columns of the LLM input are image tokens (the adapter's placeholder
mask). It hooks the model's own modules, changes none of them, and keeps SDPA / flash:

- A pre-hook on the text model decides what a call is: a *prefill* (no cache or an empty
  one, image tokens present: cuts happen), a *continuation* of a cache this stage cut
  (decoding: the shortened layers get masks sized for their shorter cache) or neither
  (untouched).
- At a cut layer K (a pre-hook with kwargs) the method picks, per image (a maximal run of
  placeholder tokens), the tokens to keep from signals of that point (attention rows
  recomputed from q/k, see :mod:`._llm_scores`); the hidden states, position embeddings
  and mask are gathered onto the kept columns. Rows keep their padding side (left-padded
  rows stay right-aligned) and may keep different counts.
- Every layer from the first cut on gets the shortened sequence's mask, built by the
  model's own mask functions (``create_causal_mask`` / ``create_sliding_window_causal_mask``
  with ``layer_idx``, so the sliding window counts the tokens the layer keeps, as its
  cache does) and position embeddings: gathered (original positions) or recomputed by the
  model's rotary embedding on contiguous positions ("renumber"; M-RoPE models always keep
  their ``(t, h, w)`` positions).
- A pre-hook on the final norm puts the sequence back onto the LLM input's columns: every
  token cut at layer K keeps its hidden state from there. So logits, ``labels`` and the
  caller's column indexing are those of the uncut input; generation reads the last column.
- The KV cache holds the full prompt in layers before the first cut and the kept one after
  (``DynamicCache`` layers have their own lengths). Decoding positions are the caller's.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tokensieve.core.api import ReduceConfig, reduce
from tokensieve.core.registry import MethodSpec
from tokensieve.core.schedule import LlmSchedule
from tokensieve.models._compat import cache_kwarg
from tokensieve.models._llm_scores import attention_rows, rotated_keys, visible_keys
from tokensieve.models._surgery import pack

#: The current call's inputs, set by the patched ``forward`` around the model's own.
_CALL: contextvars.ContextVar[CallInputs | None] = contextvars.ContextVar(
    "tokensieve_llm_call", default=None)


@dataclass
class CallInputs:
    """What the patched forward knows of a call: image runs and the 2D attention mask.

    Attributes:
        image_of: ``[B, T]`` image (run) index of every image-token column, -1 elsewhere.
        mask: ``[B, T]`` the caller's 2D attention mask (``None``: all ones).
        block_ids: ``[B, T]`` bidirectional attention blocks (Gemma 3 images) or ``None``.
        groups: per run (in ``image_of`` numbering) the group of each of its tokens when
            the pre-LLM method formed groups (``Reduction.groups``), else ``None``.
    """

    image_of: Tensor | None
    mask: Tensor | None
    block_ids: Tensor | None = None
    groups: list[Tensor | None] | None = None


@dataclass
class Cut:
    """One cut of a prefill: per image, the kept indices into its original tokens."""

    layer: int
    kept: list[Tensor]


@dataclass
class _Segment:
    """The sequence as the layers from ``first_layer`` on see it during a prefill."""

    first_layer: int
    src: Tensor  # [B, Tc] LLM-input column of every current column (0 on padding)
    valid: Tensor  # [B, Tc] real columns
    image_of: Tensor  # [B, Tc]
    rank: Tensor  # [B, Tc] index of an image column in its image's original tokens
    pos: Tensor | None  # [B, Tc] 1D positions (renumber mode)
    masks: dict[str, Any] = field(default_factory=dict)
    pos_emb: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Record:
    """What decoding needs of a prefill: its length and each segment's 2D mask."""

    length: int
    segments: list[tuple[int, Tensor]]  # (first layer, [B, Tc] mask)


@dataclass
class _Prefill:
    call: CallInputs
    align: str
    seg: _Segment
    counts: list[int]  # original tokens per image
    cuts: list[Cut] = field(default_factory=list)
    full: Tensor | None = None  # [B, T, D] restore buffer
    captured: dict[str, Any] = field(default_factory=dict)
    record: _Record | None = None
    inputs: Tensor | None = None  # [B, T, D] the LLM input embeddings (for raters)
    raters: dict[int, Tensor] = field(default_factory=dict)  # image -> rater columns
    targets: dict[int, list[int]] = field(default_factory=dict)  # image size -> counts


@dataclass
class _Continue:
    call: CallInputs
    record: _Record
    past: int  # tokens in the uncut layers' cache before this call
    masks: dict[tuple[int, str], Any] = field(default_factory=dict)


class HookedStage:
    """What the in-LLM stages share: their hook handles and the call's inputs, which the
    patched forward hands them for the length of the model's own forward."""

    def __init__(self, model: torch.nn.Module, spec: MethodSpec, config: ReduceConfig) -> None:
        self.text = find_text_model(model)
        self.spec = spec
        self.config = config
        self.schedule = spec.make_config(dict(config.options))
        self.depth = len(self.text.layers)
        cfg = self.text.config
        self.layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] *
                                self.depth)
        self.window = getattr(cfg, "sliding_window", None)
        self._handles: list[Any] = []

    def _new_context(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep the hooks (bound to the copy) but no per-call state: the
        copy continues no cache of the original (it refuses a cut one)."""
        state = dict(self.__dict__)
        del state["_run"], state["_last"], state["records"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._new_context()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def call(self, inputs: CallInputs) -> Iterator[None]:
        """Run the model's own forward with ``inputs`` visible to the hooks."""
        token = _CALL.set(inputs)
        try:
            yield
        finally:
            _CALL.reset(token)


def layer_mask(text: torch.nn.Module, kind: str, window: int | None, layer_idx: int,
               hidden: Tensor, mask2d: Tensor, cache: Any, block_ids: Tensor | None) -> Any:
    """The attention mask decoder layer ``layer_idx`` (of type ``kind``) gets for ``hidden``
    under the 2D mask ``mask2d`` (the columns of the cache and of ``hidden``), built by the
    model's own mask functions (the form its attention implementation takes)."""
    from transformers.masking_utils import (
        blockwise_overlay,
        create_causal_mask,
        create_sliding_window_causal_mask,
        sliding_window_overlay,
    )

    sliding = kind == "sliding_attention"
    kw = dict(config=text.config, inputs_embeds=hidden, attention_mask=mask2d,
              position_ids=None, layer_idx=layer_idx)
    kw[cache_kwarg(create_causal_mask)] = cache
    if block_ids is None:
        fn = create_sliding_window_causal_mask if sliding else create_causal_mask
        return fn(**kw)
    if sliding:
        return create_causal_mask(**kw, or_mask_function=blockwise_overlay(block_ids),
                                  and_mask_function=sliding_window_overlay(window))
    return create_causal_mask(**kw, block_sequence_ids=block_ids)


def find_text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a VLM's language model (``layers``, ``norm``)."""
    inner = getattr(model, "model", model)
    for owner in (inner, model):
        for name in ("language_model", "text_model"):
            m = getattr(owner, name, None)
            if m is not None and hasattr(m, "layers") and hasattr(m, "norm"):
                return m
    raise ValueError(f"{type(model).__name__}: found no language model with decoder `layers` "
                     "and a final `norm`; the in-LLM stage cannot patch it")


def image_runs(placeholder: Tensor) -> Tensor:
    """``[B, T]`` index of the maximal run of image tokens each column belongs to, numbered
    over the flattened batch (-1 on other columns)."""
    prev = torch.nn.functional.pad(placeholder, (1, 0), value=False)[:, :-1]
    start = placeholder & ~prev
    run = torch.cumsum(start.reshape(-1).long(), 0).reshape(placeholder.shape) - 1
    return torch.where(placeholder, run, -1)


def _take(x: Tensor, gather: Tensor) -> Tensor:
    """``x[b, gather[b, j]]`` for ``x`` ``[B or 1, T, ...]``."""
    x = x.expand(gather.shape[0], *x.shape[1:])
    idx = gather.reshape(*gather.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


class LlmStage(HookedStage):
    """Hooks that cut image tokens inside the LLM with one in-LLM method.

    Args:
        model: the VLM (its text model is found with :func:`find_text_model`).
        spec: the method's registry entry (stage "llm").
        config: the method and its settings (``keep`` per image: a count, a fraction or
            ``None`` for the method's official budget).
    """

    schedule: LlmSchedule

    def __init__(self, model: torch.nn.Module, spec: MethodSpec, config: ReduceConfig) -> None:
        super().__init__(model, spec, config)
        self.layers = self.schedule.cut_layers(self.depth)
        if self.schedule.hides_dropped_before_cut and (
                len(self.layers) != 1 or spec.kind != "subset"):
            raise ValueError(f"{spec.name}: hiding dropped tokens from the layers before the "
                             "cut needs one cut of a subset method")
        cfg = self.text.config
        rope = getattr(self.text, "rotary_emb", None)
        self.mrope = "mrope_section" in str(getattr(cfg, "rope_parameters", None) or {}) or \
            hasattr(rope, "mrope_section")
        # Gemma 3 keeps one rotary table per layer type (local / global bases).
        self.rope_takes_type = rope is not None and (
            isinstance(getattr(rope, "rope_type", None), dict)
            or any(hasattr(rope, f"{t}_inv_freq") for t in self.layer_types))
        self.positions = "keep" if self.mrope else self.schedule.position_mode
        #: ``() -> [per image: token indices] | None``: tokens a cut never drops (set by an
        #: encoder stage that protects some, MustDrop's key set; the method takes
        #: ``protect``).
        self.protect_source: Callable[[], list[Tensor] | None] | None = None
        self._new_context()
        self._check_counts()

    def _new_context(self) -> None:
        """Per-call state: the cache records of this stage, and per thread the running call
        and the cuts of the last prefill."""
        self.records: weakref.WeakKeyDictionary[Any, _Record] = weakref.WeakKeyDictionary()
        self._run: contextvars.ContextVar[_Prefill | _Continue | None] = contextvars.ContextVar(
            "tokensieve_llm_run", default=None)
        self._last: contextvars.ContextVar[list[Cut] | None] = contextvars.ContextVar(
            "tokensieve_llm_last", default=None)

    @property
    def last(self) -> list[Cut]:
        """The cuts of this thread's last prefill: per cut layer, each image's kept indices
        into its original tokens (what each output token stands for, for merging methods)."""
        return list(self._last.get() or [])

    def _check_counts(self) -> None:
        """Validate the budget at apply time (types; on an image as large as an int keep)."""
        keep = self.config.keep
        n = keep if isinstance(keep, int) and not isinstance(keep, bool) and keep > 0 else 576
        counts = self.schedule.counts(n, keep, self.depth)
        if len(counts) != len(self.layers):
            raise ValueError(f"{self.spec.name}: {len(counts)} counts for {len(self.layers)} "
                             "cut layers")

    # -- install / remove ---------------------------------------------------------------------
    def install(self) -> None:
        text = self.text
        self._handles.append(text.register_forward_pre_hook(self._text_pre, with_kwargs=True))
        self._handles.append(text.register_forward_hook(self._text_post, always_call=True))
        # Hiding dropped tokens from the earlier layers while decoding needs those layers'
        # masks too.
        first = 0 if self.schedule.hides_dropped_before_cut else self.layers[0]
        for layer_idx in range(first, self.depth):
            hook = self._layer_hook(layer_idx)
            self._handles.append(text.layers[layer_idx].register_forward_pre_hook(
                hook, with_kwargs=True))
        if self.schedule.scores in ("previous", "keys"):
            for cut in self.layers:
                self._capture(cut - 1)
        self._handles.append(text.norm.register_forward_pre_hook(self._norm_pre))

    # -- per call -----------------------------------------------------------------------------
    def _text_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        call = _CALL.get()
        cache = _cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        run: _Prefill | _Continue | None = None
        if past == 0:
            if call is not None and call.image_of is not None and bool((call.image_of >= 0).any()):
                run = self._start_prefill(call, kwargs)
        else:
            record = self.records.get(cache)
            if record is not None:
                run = _Continue(call or CallInputs(None, None), record, past)
            elif self._was_cut(cache):
                raise ValueError(
                    "this KV cache was shortened by a tokensieve in-LLM reduction in a call "
                    "this model cannot continue from (another model, a copy, or a removed "
                    "patch); re-send the whole history instead")
        self._run.set(run)

    def _text_post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        # The run lives in this thread's context only, from the text model's start to its end.
        self._run.set(None)

    def _was_cut(self, cache: Any) -> bool:
        try:
            lengths = {cache.get_seq_length(i) for i in (0, self.layers[0])}
        except (IndexError, AttributeError, TypeError):
            return False
        return len(lengths) > 1

    def _start_prefill(self, call: CallInputs, kwargs: dict) -> _Prefill:
        image_of = call.image_of
        b, t = image_of.shape
        dev = image_of.device
        valid = (torch.ones(b, t, dtype=torch.bool, device=dev) if call.mask is None
                 else call.mask.to(dev).bool())
        if call.mask is not None and call.mask.shape != image_of.shape:
            raise ValueError(f"attention_mask: shape {tuple(call.mask.shape)} does not match the "
                             f"input ids {tuple(image_of.shape)}")
        align = "right" if bool(valid[:, -1].all()) else "left"
        runs = int(image_of.max()) + 1
        counts = torch.bincount(image_of[image_of >= 0], minlength=runs).tolist()
        starts = torch.zeros(runs, dtype=torch.long, device=dev)
        flat_img = image_of.reshape(-1)
        order = torch.arange(flat_img.numel(), device=dev)
        is_img = flat_img >= 0
        starts.scatter_reduce_(0, flat_img[is_img], order[is_img], reduce="amin",
                               include_self=False)
        rank = torch.where(image_of >= 0,
                           order.reshape(b, t) - starts[image_of.clamp(min=0)], -1)
        pos = None
        if self.positions == "renumber":
            pos = _initial_positions(kwargs.get("position_ids"), valid)
        src = torch.arange(t, device=dev).expand(b, t)
        seg = _Segment(first_layer=0, src=src, valid=valid, image_of=image_of, rank=rank, pos=pos)
        inputs = None
        if self.schedule.query == "text":
            inputs = kwargs.get("inputs_embeds")
            if inputs is None:
                inputs = self.text.embed_tokens(kwargs["input_ids"])
        return _Prefill(call=call, align=align, seg=seg, counts=counts, inputs=inputs)

    # -- layers ---------------------------------------------------------------------------------
    def _layer_hook(self, layer_idx: int) -> Callable[..., Any]:
        # A partial of a method, not a closure: a deep copy or a pickle of the model keeps
        # hooks bound to its own stage.
        return functools.partial(self._layer_pre, layer_idx)

    def _layer_pre(self, layer_idx: int, module: torch.nn.Module, args: tuple,
                   kwargs: dict) -> Any:
        run = self._run.get()
        if run is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(run, _Continue):
            return self._continue_layer(run, layer_idx, hidden, args, kwargs)
        if layer_idx < self.layers[0]:       # a prefill before the first cut: untouched
            return None
        if layer_idx in self.layers:
            hidden = self._cut(run, layer_idx, hidden, kwargs)
        seg = run.seg
        kwargs = dict(kwargs)
        cache = _cache_of(kwargs)
        kind = self.layer_types[layer_idx]
        if kind not in seg.masks:
            seg.masks[kind] = self._mask(layer_idx, hidden, seg.valid.long(), cache,
                                         _block_ids(run.call, seg))
        kwargs["attention_mask"] = seg.masks[kind]
        kwargs["position_embeddings"] = self._position_embeddings(
            run, layer_idx, hidden, kwargs.get("position_embeddings"))
        if "position_ids" in kwargs:
            # Positions live in the embeddings; None keeps flash attention from reading
            # gapped ids as packed sequences.
            kwargs["position_ids"] = None
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _continue_layer(self, run: _Continue, layer_idx: int, hidden: Tensor, args: tuple,
                        kwargs: dict) -> Any:
        seg_idx = max(i for i, (first, _) in enumerate(run.record.segments)
                      if first <= layer_idx)
        kind = self.layer_types[layer_idx]
        key = (seg_idx, kind)
        kwargs = dict(kwargs)
        if key not in run.masks:
            prefix = run.record.segments[seg_idx][1]
            cache = _cache_of(kwargs)
            q = hidden.shape[1]
            new = _new_columns(run.call.mask, run.record.length, run.past + q, prefix)
            mask2d = torch.cat([prefix.to(new), new], dim=1)
            run.masks[key] = self._mask(layer_idx, hidden, mask2d, cache, None)
        kwargs["attention_mask"] = run.masks[key]
        return args, kwargs

    def _mask(self, layer_idx: int, hidden: Tensor, mask2d: Tensor, cache: Any,
              block_ids: Tensor | None) -> Any:
        return layer_mask(self.text, self.layer_types[layer_idx], self.window, layer_idx,
                          hidden, mask2d, cache, block_ids)

    def _position_embeddings(self, run: _Prefill, layer_idx: int, hidden: Tensor,
                             given: Any) -> Any:
        seg = run.seg
        kind = self.layer_types[layer_idx]
        if kind in seg.pos_emb:
            return seg.pos_emb[kind]
        if seg.first_layer == 0:
            out = given
        elif self.positions == "renumber":
            rope = self.text.rotary_emb
            args = (hidden, seg.pos) + ((kind,) if self.rope_takes_type else ())
            out = rope(*args)
        else:
            cos, sin = given
            out = (_take(cos, seg.src), _take(sin, seg.src))
        seg.pos_emb[kind] = out
        return out

    # -- the cut --------------------------------------------------------------------------------
    def _capture(self, layer_idx: int) -> None:
        """Hooks on layer ``layer_idx``'s attention keeping what the next cut scores with:
        the q rows of the query tokens, all k, the position embeddings."""
        attn = self.text.layers[layer_idx].self_attn

        hook = functools.partial
        self._handles += [
            attn.register_forward_pre_hook(hook(self._attn_pre, layer_idx), with_kwargs=True),
            attn.q_proj.register_forward_hook(hook(self._q_out, layer_idx)),
            attn.k_proj.register_forward_hook(hook(self._k_out, layer_idx))]

    def _attn_pre(self, layer_idx: int, module: torch.nn.Module, args: tuple,
                  kwargs: dict) -> None:
        run = self._run.get()
        if isinstance(run, _Prefill):
            run.captured = {"pos_emb": kwargs.get("position_embeddings"), "layer": layer_idx}

    def _q_out(self, layer_idx: int, module: torch.nn.Module, args: tuple, out: Tensor) -> None:
        run = self._run.get()
        if isinstance(run, _Prefill) and run.captured.get("layer") == layer_idx:
            cols = self._query_cols(run.seg)
            run.captured["q"] = _take(out, cols)
            run.captured["cols"] = cols

    def _k_out(self, layer_idx: int, module: torch.nn.Module, args: tuple, out: Tensor) -> None:
        run = self._run.get()
        if isinstance(run, _Prefill) and run.captured.get("layer") == layer_idx:
            run.captured["k"] = out

    def _query_cols(self, seg: _Segment) -> Tensor:
        """``[B, Q]`` the query columns: each row's last real column (the last prompt token)
        or every real text column (``query="text"``; :meth:`_rater_rows` picks an image's
        raters among them) or image column (``query="image"``) of the row; rows with fewer
        repeat their last column."""
        t = seg.valid.shape[1]
        last = (t - 1 - torch.flip(seg.valid.long(), dims=[1]).argmax(dim=1)).unsqueeze(1)
        if self.schedule.query == "last":
            return last
        text = seg.valid & ((seg.image_of < 0) if self.schedule.query == "text"
                            else (seg.image_of >= 0))
        q = max(int(text.sum(dim=1).max()), 1)
        cols = torch.arange(t, device=text.device).expand_as(text)
        order = torch.sort(torch.where(text, cols, t + cols), dim=1).values[:, :q]
        return torch.where(order < t, order, last)

    def _rater_rows(self, run: _Prefill, row: int, img: int, query_cols: Tensor) -> Tensor:
        """Indices into ``query_cols[row]`` of the tokens that rate image ``img``: the text
        after it that the method's :meth:`LlmSchedule.raters` picks from the LLM inputs
        (chosen once per prefill, on the uncut sequence)."""
        if img not in run.raters:
            seg0 = run.call.image_of[row]
            valid = run.call.mask[row].bool() if run.call.mask is not None else \
                torch.ones_like(seg0, dtype=torch.bool)
            image_cols = torch.nonzero(seg0 == img).squeeze(1)
            after = valid & (seg0 < 0)
            after[: int(image_cols.max()) + 1] = False
            text_cols = torch.nonzero(after).squeeze(1)
            if text_cols.numel() == 0:
                raise ValueError(f"{self.spec.name}: an image has no text after it to rate it")
            inputs = run.inputs[row]
            pick = self.schedule.raters(inputs[image_cols], inputs[text_cols])
            run.raters[img] = text_cols[pick.to(text_cols.device)]
        source = run.seg.src[row, query_cols[row]]
        real = int((run.seg.valid[row] & (run.seg.image_of[row] < 0)).sum())
        rows = torch.nonzero(torch.isin(source, run.raters[img])).squeeze(1)
        return rows[rows < real]  # the padding repeats a column: count it once

    def _scores(self, run: _Prefill, layer_idx: int, hidden: Tensor, kwargs: dict,
                ) -> tuple[Tensor, Tensor]:
        """The attention rows the method ranks with, ``[B, Q, Tc]``, and their query
        columns ``[B, Q]``."""
        seg = run.seg
        if self.schedule.scores == "previous":
            cap = run.captured
            if cap.get("layer") != layer_idx - 1 or "k" not in cap:
                raise RuntimeError("tokensieve: the scoring layer did not run before the cut")
            source = layer_idx - 1
            q, k, cols = cap["q"], cap["k"], cap["cols"]
            cos, sin = cap["pos_emb"]
        else:
            source = layer_idx
            layer = self.text.layers[layer_idx]
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            cols = self._query_cols(seg)
            q = attn.q_proj(_take(normed, cols))
            k = attn.k_proj(normed)
            cos, sin = self._position_embeddings(run, layer_idx, hidden,
                                                 kwargs.get("position_embeddings"))
        attn = self.text.layers[source].self_attn
        window = self.window if self.layer_types[source] == "sliding_attention" else None
        form = self.schedule.score_form
        visible = visible_keys(cols, seg.valid, window, causal=form.causal)
        run.captured["score_keys"] = (attn, k, cos, sin)
        rows = attention_rows(attn, q, k, cos, sin, cols, visible, rotary=form.rotary,
                              heads=form.heads)
        return rows, cols

    def _signal_source(self, run: _Prefill, layer_idx: int, hidden: Tensor, kwargs: dict,
                       ) -> Callable[[int, Tensor, int], tuple[Tensor, dict[str, Tensor]]]:
        """``f(row, cols, image) -> (tokens [1, n, D], signals)`` for one image of the
        current sequence, as the method's score source asks."""
        seg = run.seg
        if self.schedule.scores in ("previous", "own"):
            probs, query_cols = self._scores(run, layer_idx, hidden, kwargs)
            keys = None
            if "keys" in self.spec.signals or "keys" in self.spec.optional_signals:
                # the scoring layer's keys as attention sees them, head-mean (VisionDrop)
                keys = rotated_keys(*run.captured["score_keys"]).mean(dim=1)

            def by_attention(row: int, cols: Tensor, img: int) -> tuple[Tensor, dict[str, Tensor]]:
                if self.schedule.query == "last":
                    attn = probs[row, 0, cols][None]
                elif self.schedule.query == "image":  # the image's own tokens as queries
                    real = int((seg.valid[row] & (seg.image_of[row] >= 0)).sum())
                    own = torch.isin(query_cols[row], cols)
                    own &= torch.arange(own.shape[0], device=own.device) < real
                    attn = probs[row][own][:, cols][None]
                else:
                    attn = probs[row][self._rater_rows(run, row, img, query_cols)][:, cols][None]
                signals = {"query_attn": attn}
                if keys is not None:
                    signals["keys"] = keys[row, cols][None]
                return hidden[row, cols].unsqueeze(0), signals

            return by_attention
        if self.schedule.scores != "keys":
            return lambda row, cols, img: (hidden[row, cols].unsqueeze(0), {})
        # DART: keys of the layer before the cut (as attention sees them, key heads side by
        # side), the cut layer's input normed by the LLM's final norm; the text is what
        # follows the image in its row.
        cap = run.captured
        cos, sin = cap["pos_emb"]
        attn = self.text.layers[layer_idx - 1].self_attn
        # The official code concatenates the keys expanded to the query heads; each key head
        # then appears g times, which scales every L1 norm by g: the same ranking.
        keys = rotated_keys(attn, cap["k"], cos, sin).transpose(1, 2).flatten(2)
        normed = self.text.norm(hidden)

        def by_keys(row: int, cols: Tensor, img: int) -> tuple[Tensor, dict[str, Tensor]]:
            after = seg.valid[row] & (seg.image_of[row] < 0)
            after[: int(cols.max()) + 1] = False
            signals = {"keys": keys[row, cols][None]}
            if bool(after.any()):
                signals["text"] = normed[row, after][None]
                signals["text_keys"] = keys[row, after][None]
            return normed[row, cols].unsqueeze(0), signals

        return by_keys

    def _cut(self, run: _Prefill, layer_idx: int, hidden: Tensor, kwargs: dict) -> Tensor:
        seg = run.seg
        stage = self.layers.index(layer_idx)
        signals_of = self._signal_source(run, layer_idx, hidden, kwargs)
        keep = seg.valid & (seg.image_of < 0)
        kept: list[Tensor] = []
        merged: list[tuple[int, Tensor, Tensor, Tensor]] = []  # row, slots, states, sources
        for img, n in enumerate(run.counts):
            if n not in run.targets:
                run.targets[n] = self.schedule.counts(n, self.config.keep, self.depth)
            target = run.targets[n][stage]
            b, cols = torch.nonzero(seg.image_of == img, as_tuple=True)
            if cols.numel() == 0:
                kept.append(torch.zeros(0, dtype=torch.long, device=hidden.device))
                continue
            row = int(b[0])
            if target == 0:  # a stage may drop an image whole (ToDRE's later stage)
                kept.append(torch.zeros(0, dtype=torch.long, device=hidden.device))
                continue
            if self.schedule.adaptive:  # a cap: earlier cuts may have kept fewer
                target = min(target, cols.numel())
            if target > cols.numel():
                raise ValueError(f"{self.spec.name}: stage {stage} keeps {target} tokens of an "
                                 f"image that has {cols.numel()} left")
            tokens, signals = signals_of(row, cols, img)
            groups = self._groups(run, img, row, cols)
            if groups is not None:
                signals["groups"] = groups
            extra: dict[str, Any] = {}
            keys = None if self.protect_source is None else self.protect_source()
            if keys is not None and img < len(keys):
                hit = torch.isin(seg.rank[row, cols], keys[img].to(cols.device))
                extra["protect"] = tuple(torch.nonzero(hit).squeeze(1).tolist())
            r = reduce(tokens, self.spec.name, target, seed=self.config.seed, **signals,
                       **self.config.options, **extra)
            real = slice(None) if r.mask is None else r.mask[0]
            if self.spec.kind == "subset":
                chosen = cols[r.indices[0][real]]
                keep[row, chosen] = True
                kept.append(seg.rank[row, chosen])
                continue
            # Merging methods: the output tokens, in the method's order, take the image's
            # first slots; each stands for the source position the method gives it.
            states, stand = r.tokens[0][real], cols[r.positions[0][real]]
            slots = cols[: states.shape[0]]
            keep[row, slots] = True
            merged.append((row, slots, states, stand))
            kept.append(seg.rank[row, stand])
        run.cuts.append(Cut(layer=layer_idx, kept=kept))
        if run.full is None:  # the first cut: the whole sequence, on the input's columns
            run.full = hidden.clone()
        else:
            _scatter(run.full, hidden, seg)
        gather, valid = pack(keep, run.align)
        new_pos = None
        if seg.pos is not None:
            new_pos = torch.gather(seg.pos, 1, gather)
            first = new_pos[:, :1] if run.align == "left" else torch.gather(
                new_pos, 1, valid.long().argmax(dim=1, keepdim=True))
            new_pos = torch.where(valid, first + torch.cumsum(valid.long(), 1) - 1, 0)
        out = _take(hidden, gather)
        src, rank = seg.src.clone(), seg.rank.clone()
        if merged:
            new_col = torch.full_like(seg.src, -1)
            rows = torch.arange(gather.shape[0], device=gather.device).unsqueeze(1)
            new_col[rows.expand_as(gather)[valid], gather[valid]] = torch.nonzero(valid)[:, 1]
            for row, slots, states, stand in merged:
                out[row, new_col[row, slots]] = states.to(out.dtype)
                src[row, slots], rank[row, slots] = seg.src[row, stand], seg.rank[row, stand]
        run.seg = _Segment(
            first_layer=layer_idx, src=torch.gather(src, 1, gather), valid=valid,
            image_of=torch.gather(seg.image_of, 1, gather).masked_fill(~valid, -1),
            rank=torch.gather(rank, 1, gather).masked_fill(~valid, -1), pos=new_pos)
        cache = _cache_of(kwargs)
        if run.record is None:
            run.record = _Record(length=int(run.call.image_of.shape[1]), segments=[])
            if self.schedule.hides_dropped_before_cut:
                # decoding: the layers before the cut see the kept columns only (this first
                # cut's columns are the input's)
                run.record.segments.append((0, keep.long()))
            if cache is not None:
                self.records[cache] = run.record
        run.record.segments.append((layer_idx, valid.long()))
        self._last.set(run.cuts)
        return out

    def _groups(self, run: _Prefill, img: int, row: int, cols: Tensor) -> Tensor | None:
        """``[1, n]`` the groups of image ``img``'s tokens still at ``cols``, when its
        pre-LLM reduction formed groups and the method takes them."""
        given = run.call.groups
        if "groups" not in self.spec.optional_signals or not given or img >= len(given):
            return None
        groups = given[img]
        if groups is None or groups.numel() != run.counts[img]:
            return None
        return groups.to(cols.device)[run.seg.rank[row, cols]][None]

    def _norm_pre(self, module: torch.nn.Module, args: tuple) -> Any:
        run = self._run.get()
        if not isinstance(run, _Prefill) or run.full is None:
            return None
        _scatter(run.full, args[0], run.seg)
        return (run.full, *args[1:])


def _scatter(full: Tensor, hidden: Tensor, seg: _Segment) -> None:
    """Write the current columns' states back onto the LLM input's columns."""
    b, j = torch.nonzero(seg.valid, as_tuple=True)
    full[b, seg.src[b, j]] = hidden[b, j].to(full.dtype)


def _cache_of(kwargs: dict) -> Any:
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _block_ids(call: CallInputs, seg: _Segment) -> Tensor | None:
    if call.block_ids is None:
        return None
    ids = torch.gather(call.block_ids.to(seg.src.device), 1, seg.src)
    return ids.masked_fill(~seg.valid, -1)


def _initial_positions(position_ids: Any, valid: Tensor) -> Tensor:
    """1D positions of the prefill's columns (the model's default: 0, 1, ...)."""
    if isinstance(position_ids, Tensor) and position_ids.dim() == 2:
        return position_ids.expand(valid.shape[0], -1).to(valid.device)
    return torch.arange(valid.shape[1], device=valid.device).expand(valid.shape[0], -1)


def _new_columns(mask: Tensor | None, length: int, total: int, prefix: Tensor) -> Tensor:
    """The 2D mask of the columns after a prefill of ``length`` columns, for a continuation
    call that brings the sequence to ``total`` columns (no mask: all real)."""
    if mask is None:
        return torch.ones(prefix.shape[0], total - length, dtype=torch.long,
                          device=prefix.device)
    if mask.dim() != 2 or mask.shape[1] != total:
        raise ValueError(
            f"attention_mask: shape {tuple(mask.shape)}; continuing a cache cut by tokensieve "
            f"needs the 2D mask of the whole sequence ({total} columns: the cached ones and "
            "the new ones)")
    return mask[:, length:].long()
