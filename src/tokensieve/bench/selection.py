"""A method's own overhead: its ``reduce`` calls, captured in the patched model and replayed.

On the embedded tiny VLM the whole prefill takes a few tens of milliseconds, most of it fixed
per-call cost (Python, ``generate``), so the end-to-end latency of two budgets barely
differs and the differences drown in the machine's noise. What a method adds to any model
with the same geometry is its selection work: the ``tokensieve.reduce`` calls the adapter
makes during one prefill, on the real tokens and signals (shapes, dtypes, values, options).
:func:`capture_reduce_calls` records those calls once; :func:`replay` runs them again so
they can be timed in isolation (next to the analytic prefill compute, which says what the
LLM saves). Not included: computing the signals (hooks on the tower's q / k, or the LLM
layer's scores for in-LLM methods) and cutting the sequence.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tokensieve.core import api

#: Modules whose ``reduce`` is wrapped while capturing: the model adapters.
ADAPTER_PACKAGE = "tokensieve.models"


@dataclass(frozen=True)
class ReduceCall:
    """One recorded ``reduce(*args, **kwargs)`` call."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self) -> Any:
        return api.reduce(*self.args, **self.kwargs)


@contextmanager
def _recording(calls: list[ReduceCall]) -> Iterator[int]:
    """Wrap ``reduce`` in every loaded adapter module; yields how many were wrapped."""
    original = api.reduce

    def recorder(*args: Any, **kwargs: Any) -> Any:
        calls.append(ReduceCall(args, dict(kwargs)))
        return original(*args, **kwargs)

    modules = [m for name, m in list(sys.modules.items())
               if (name == ADAPTER_PACKAGE or name.startswith(ADAPTER_PACKAGE + "."))
               and getattr(m, "reduce", None) is original]
    for m in modules:
        m.reduce = recorder
    try:
        yield len(modules)
    finally:
        for m in modules:
            m.reduce = original


def capture_reduce_calls(model: Any, inputs: Mapping[str, Any]) -> list[ReduceCall]:
    """The ``reduce`` calls a patched ``model`` makes in the prefill of ``inputs`` (one
    ``generate`` step). Empty for an unpatched model."""
    calls: list[ReduceCall] = []
    with _recording(calls), torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return calls


def replay(calls: list[ReduceCall]) -> Callable[[], None] | None:
    """A function running ``calls`` again in order (``None`` when there are none)."""
    if not calls:
        return None

    def run() -> None:
        for c in calls:
            c()

    return run


__all__ = ["ReduceCall", "capture_reduce_calls", "replay"]
