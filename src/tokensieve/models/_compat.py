"""What differs between the transformers releases tokensieve supports (5.19 to 5.x).

- The KV cache argument is ``cache`` from 5.24 (``past_key_values`` before, deprecated
  since): :func:`cache_kwarg` names it for a function.
- ``output_hidden_states=[i]`` (only the hidden states a caller needs) exists from 5.23;
  before, ``True`` returns all of them: :func:`hidden_states_request`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any


@functools.cache
def cache_kwarg(fn: Callable[..., Any]) -> str:
    """The name under which ``fn`` takes the KV cache (``cache`` or ``past_key_values``)."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


@functools.cache
def _layer_lists() -> bool:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return (major, minor) >= (5, 23)


def hidden_states_request(layer: int) -> list[int] | bool:
    """``output_hidden_states`` asking for hidden state ``layer`` (index into the output's
    ``hidden_states`` either way)."""
    return [layer] if _layer_lists() else True
