"""Reduction while decoding: which visual tokens each new token's later layers attend to.

A decoding-time method (DyCoke's second stage, :mod:`tokensieve.methods.dycoke_llm`)
leaves the prefill alone. At each decoding step with one new token, the attention of
that token at layer ``L - 1`` (recomputed from the layer's own q and the cached keys: the
layer keeps its SDPA / flash kernel) decides, per visual run of the prompt, which of the
run's cached columns the layers from ``L`` on see in this step; the others are hidden by
the attention mask those layers get (built by the model's own mask functions from a 2D
mask with the hidden columns zeroed). The cache keeps every column, so the next step can
choose again.

Hooks only (no module, config or attention implementation changed): a pre-hook on the
language model (prefill or decoding step, per thread), one on layer 0 (the prefill's
visual runs, per cache object), a forward hook on layer ``L - 1``'s attention (the
selection) and pre-hooks on layers ``L..`` (the masks).
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tokensieve.core.api import ReduceConfig
from tokensieve.core.registry import MethodSpec
from tokensieve.methods.dycoke_llm import top_attended
from tokensieve.models._llm import (
    _CALL,
    CallInputs,
    HookedStage,
    _cache_of,
    layer_mask,
)
from tokensieve.models._llm_scores import cached_attention_row


@dataclass
class _Runs:
    """What decoding needs of a prefill: its visual runs and each run's last attention."""

    runs: list[tuple[int, Tensor]]  # (batch row, cache columns) of every visual run
    previous: dict[int, Tensor] = field(default_factory=dict)  # run -> last step's row
    steps: list[list[Tensor | None]] = field(default_factory=list)  # per step, per run


@dataclass
class _Step:
    call: CallInputs
    record: _Runs
    hidden: list[tuple[int, Tensor]] = field(default_factory=list)  # (row, hidden columns)
    masks: dict[str, Any] = field(default_factory=dict)


class DecodeStage(HookedStage):
    """Per-instance hooks that run a decoding-time method inside the language model.

    Args:
        model: the VLM (its language model is found as for :class:`LlmStage`).
        spec: the method's registry entry (its config has ``decode = True``).
        config: the method and its settings (``keep``: visual tokens a pruning step leaves
            visible per run, a count or a fraction; ``None``: the method's own share).
    """

    def __init__(self, model: torch.nn.Module, spec: MethodSpec, config: ReduceConfig) -> None:
        super().__init__(model, spec, config)
        self.layer = self.schedule.decode_layer(self.depth)
        if self.layer_types[self.layer - 1] == "sliding_attention":
            raise ValueError(f"{spec.name}: layer {self.layer - 1}, whose attention selects the "
                             "visual tokens, attends within a sliding window (its cache holds "
                             "only the window); choose `layer` after a full-attention layer")
        self.visible(576)  # the budget's type and range, at apply time
        self._new_context()

    def visible(self, n: int) -> int:
        """Tokens of a run of ``n`` that a pruning step leaves visible."""
        return min(n, self.schedule.visible(n, self.config.keep))

    def _new_context(self) -> None:
        self.records: weakref.WeakKeyDictionary[Any, _Runs] = weakref.WeakKeyDictionary()
        self._run: contextvars.ContextVar[CallInputs | _Step | None] = contextvars.ContextVar(
            "tokensieve_decode_run", default=None)
        self._last: contextvars.ContextVar[_Runs | None] = contextvars.ContextVar(
            "tokensieve_decode_last", default=None)

    @property
    def last(self) -> list[list[Tensor | None]]:
        """This thread's last generation: per decoding step, per visual run, the indices
        (into the run) its later layers saw, or None when the step did not prune."""
        rec = self._last.get()
        return [] if rec is None else list(rec.steps)

    # -- install / remove ---------------------------------------------------------------------
    def install(self) -> None:
        text = self.text
        part = functools.partial
        self._handles += [
            text.register_forward_pre_hook(self._text_pre, with_kwargs=True),
            text.register_forward_hook(self._text_post, always_call=True),
            text.layers[0].register_forward_pre_hook(self._first_layer, with_kwargs=True),
            text.layers[self.layer - 1].self_attn.register_forward_hook(self._select,
                                                                        with_kwargs=True)]
        for i in range(self.layer, self.depth):
            self._handles.append(text.layers[i].register_forward_pre_hook(
                part(self._later_layer, i), with_kwargs=True))

    # -- hooks ----------------------------------------------------------------------------------
    def _text_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        call = _CALL.get()
        cache = _cache_of(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        run: CallInputs | _Step | None = None
        if call is not None and past == 0:
            if call.image_of is not None and bool((call.image_of >= 0).any()):
                run = call
        elif call is not None and x is not None and x.shape[1] == 1:
            record = self.records.get(cache)
            if record is not None:
                run = _Step(call, record)
                self._last.set(record)
        self._run.set(run)

    def _text_post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._run.set(None)

    def _first_layer(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """At a prefill: remember the visual runs under the cache object the layers fill."""
        call = self._run.get()
        if not isinstance(call, CallInputs):
            return
        cache = _cache_of(kwargs)
        if cache is None:
            return
        image_of = call.image_of
        assert image_of is not None
        runs = []
        for r in range(int(image_of.max()) + 1):
            rows, cols = torch.nonzero(image_of == r, as_tuple=True)
            if cols.numel():
                runs.append((int(rows[0]), cols))
        record = _Runs(runs)
        self.records[cache] = record
        self._last.set(record)

    def _select(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Layer ``L - 1``'s attention has run: the new token's row decides each run."""
        step = self._run.get()
        if not isinstance(step, _Step):
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache = _cache_of(kwargs)
        keys = cache.layers[self.layer - 1].keys
        cos, sin = kwargs["position_embeddings"]
        b, s = keys.shape[0], keys.shape[2]
        visible = _mask2d(step.call, b, s, keys.device).bool()
        row = cached_attention_row(module, module.q_proj(hidden), cos, sin, keys, visible)
        decisions: list[Tensor | None] = []
        threshold = float(self.schedule.similarity)
        for k, (r, cols) in enumerate(step.record.runs):
            attn = row[r, cols]
            prev = step.record.previous.get(k)
            sim = 0.0 if prev is None else float(torch.nn.functional.cosine_similarity(
                attn, prev, dim=0))
            step.record.previous[k] = attn
            if sim >= threshold:
                decisions.append(None)
                continue
            kept = top_attended(attn.unsqueeze(0), self.visible(cols.numel()))[0]
            hide = torch.ones(cols.numel(), dtype=torch.bool, device=cols.device)
            hide[kept] = False
            if bool(hide.any()):  # all visible: the layers keep the model's own mask
                step.hidden.append((r, cols[hide]))
            decisions.append(kept)
        step.record.steps.append(decisions)

    def _later_layer(self, layer_idx: int, module: torch.nn.Module, args: tuple,
                     kwargs: dict) -> Any:
        step = self._run.get()
        if not isinstance(step, _Step) or not step.hidden:
            return None
        kind = self.layer_types[layer_idx]
        if kind not in step.masks:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cache = _cache_of(kwargs)
            s = cache.get_seq_length(layer_idx) + hidden.shape[1]
            mask2d = _mask2d(step.call, hidden.shape[0], s, hidden.device).clone()
            for r, cols in step.hidden:
                mask2d[r, cols] = 0
            step.masks[kind] = layer_mask(self.text, kind, self.window, layer_idx, hidden,
                                          mask2d, cache, None)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = step.masks[kind]
        return args, kwargs


def _mask2d(call: CallInputs, b: int, s: int, device: torch.device) -> Tensor:
    """The call's 2D mask over ``s`` columns (all ones when it has none)."""
    if call.mask is not None and tuple(call.mask.shape) == (b, s):
        return call.mask.to(device).long()
    if call.mask is not None:
        raise ValueError(f"attention_mask: shape {tuple(call.mask.shape)}; decoding with "
                         f"{s} cached columns needs the 2D mask of all of them ({b}, {s})")
    return torch.ones(b, s, dtype=torch.long, device=device)
