"""Apply a token reduction method to a Hugging Face vision-language model.

>>> import tokensieve as ts
>>> ts.apply(model, "fastervlm", keep=64)              # doctest: +SKIP
>>> out = model.generate(**inputs, max_new_tokens=20)  # doctest: +SKIP
>>> ts.remove(model)                                   # doctest: +SKIP

Families (:func:`supported_models`): LLaVA-1.5 (``llava``), LLaVA-NeXT (``llava_next``),
LLaVA-OneVision (``llava_onevision``), Qwen2-VL / Qwen2.5-VL (``qwen_vl``), Gemma 3
(``gemma3``), Idefics3 / SmolVLM (``idefics3``). Each adapter module documents its
layout, features and signals.

Contract of a patched model:

- Every ``forward`` / ``generate`` call that carries images encodes them, runs the method
  per image (``keep`` counts per image: per packed anyres image on LLaVA-NeXT /
  OneVision, per crop on Idefics3 / SmolVLM; a float is a fraction of those tokens)
  and cuts the prompt: the placeholders beyond an image's kept count are removed from
  ``input_ids`` / ``inputs_embeds``, ``attention_mask``, ``labels``, ``token_type_ids`` /
  ``mm_token_type_ids`` and
  ``position_ids`` (1D positions re-indexed contiguously; Qwen M-RoPE positions gathered
  so every kept token keeps its original ``(t, h, w)``, ``rope_deltas`` updated). Padding
  columns are dropped and rows re-padded (left for generate and left-padded batches,
  right for right-padded ones). Calls without images run untouched.
- ``forward`` returns the outputs of the shortened sequence (``logits`` ``[B, T', V]``);
  ``get_state(model).last_plan`` maps its columns back to the caller's
  (``gather[b, j]`` is the source column of column ``j``; ``valid`` marks real ones).
- ``generate`` runs the model's own ``generate`` on the shortened prompt (KV cache, SDPA,
  positions as usual) and returns sequences that start with the caller's original
  prompt ids, so ``out[:, input_ids.shape[1]:]`` are the new tokens; ``max_length``
  counts the caller's prompt. A follow-up turn re-sends the whole history (with its
  images); continuing a cache with new images is refused.
- A KV cache a reduced call returned (``out.cache``, ``generate(...,
  return_dict_in_generate=True).cache``) holds the shortened prompt; a later call on it
  (``cache=`` or ``past_key_values=``) gives the mask and position ids of the caller's
  whole sequence, which are mapped onto the shortened one (``generate``: the whole
  ``input_ids``). Other masks longer than the cache plus the call are refused.
- All state lives in ``model._tokensieve``; ``remove`` restores the instance exactly.
  Applying to a patched model raises ``ValueError`` (remove first).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tokensieve.core.reduction import Reduction
from tokensieve.models._base import (
    Adapter,
    PatchState,
    apply,
    get_state,
    remove,
    supported_models,
)


@contextmanager
def applied(model: torch.nn.Module, method: str, keep: int | float | None = None,
            **options: Any) -> Iterator[torch.nn.Module]:
    """``with applied(model, "fastervlm", 64): model.generate(...)``; removed on exit."""
    apply(model, method, keep, **options)
    try:
        yield model
    finally:
        remove(model)


def last_reductions(model: torch.nn.Module) -> list[tuple[Reduction, tuple[int, int] | None]]:
    """Per image of the last reduced call, ``(Reduction, grid)`` (batch size 1 each)."""
    state = get_state(model)
    if state is None:
        raise ValueError("the model is not patched by tokensieve (call tokensieve.apply first)")
    return list(state.last)


def is_applied(model: torch.nn.Module) -> bool:
    """Whether ``model`` is currently patched by tokensieve."""
    return get_state(model) is not None


__all__ = ["Adapter", "PatchState", "applied", "apply", "get_state", "is_applied",
           "last_reductions", "remove", "supported_models"]
