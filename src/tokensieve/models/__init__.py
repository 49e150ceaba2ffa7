"""Apply a token reduction method to a Hugging Face vision-language model.

>>> import tokensieve as ts
>>> ts.apply(model, method="fastervlm", keep=64)      # doctest: +SKIP
>>> out = model.generate(**inputs, max_new_tokens=20)  # doctest: +SKIP
>>> ts.remove(model)                                   # doctest: +SKIP

Supported families: see :func:`supported_models`. A patched model reduces the visual
tokens of every call that carries images (``forward`` and ``generate``); calls without
images run untouched. See :func:`apply` for the exact contract.
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
def applied(model: torch.nn.Module, method: str, keep: int | float,
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
