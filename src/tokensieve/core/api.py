"""``reduce``: run one method on a token tensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tokensieve.core.budget import resolve_keep
from tokensieve.core.options import check_seed
from tokensieve.core.reduction import Reduction
from tokensieve.core.registry import get_method
from tokensieve.core.signals import (
    SIGNAL_NAMES,
    build_signals,
    check_kept_finite,
    check_tokens,
)


@dataclass(frozen=True)
class ReduceConfig:
    """A method and its settings as plain data (printable, comparable, serialisable)."""

    method: str
    keep: int | float
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = 0

    def __post_init__(self) -> None:
        check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "keep": self.keep, "options": dict(self.options),
                "seed": self.seed}


def split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword arguments into (signals, method options) by the fixed signal names."""
    signals = {k: v for k, v in kwargs.items() if k in SIGNAL_NAMES}
    options = {k: v for k, v in kwargs.items() if k not in SIGNAL_NAMES}
    return signals, options


def check_devices(tokens: Tensor, raw: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the signal and both devices when a tensor signal (or
    ``partitions.ids``) is not on the tokens' device."""
    for name, value in raw.items():
        if name == "partitions" and value is not None:
            value, name = getattr(value, "ids", None), "partitions.ids"
        if isinstance(value, Tensor) and value.device != tokens.device:
            raise ValueError(f"{name} is on device {value.device} but tokens are on "
                             f"{tokens.device}; expected every signal on the tokens' device")


def drop_empty_text(raw: dict[str, Any], required: tuple[str, ...], method: str) -> None:
    """An empty ``text`` ``[B, 0, D]``: a method that needs text refuses it; for the others
    it counts as no text (``text`` and ``text_mask`` are dropped from ``raw``)."""
    text = raw.get("text")
    if not isinstance(text, Tensor) or text.dim() != 3 or text.shape[1] != 0:
        return
    if "text" in required:
        raise ValueError(f"method {method!r} needs at least one text token; got text of shape "
                         f"{tuple(text.shape)} (empty)")
    raw.pop("text")
    raw.pop("text_mask", None)


@torch.no_grad()
def reduce(
    tokens: Tensor,
    method: str,
    keep: int | float,
    *,
    seed: int | None = 0,
    **kwargs: Any,
) -> Reduction:
    """Reduce a token set ``[B, N, D]`` to ``keep`` tokens with ``method``.

    Args:
        tokens: ``[B, N, D]`` floating-point tokens.
        method: a name from ``list_methods()``.
        keep: an int count in ``[1, N]`` or a float fraction in ``(0, 1]``.
        seed: an int seeding the methods that draw random numbers (``None``: torch's
            global RNG); anything else (a bool, a float, a string) raises ``ValueError``.
        **kwargs: signals by their fixed names (``cls_attn``, ``attn_received``, ``keys``,
            ``values``, ``text``, ``text_mask``, ``grid``, ``partitions``) and the
            method's options (see ``describe(method).defaults()``). Tensor signals must be
            on the tokens' device. An empty ``text`` ``[B, 0, D]`` is refused by methods
            that need text (cdpruner, mmtok) and counts as no text for the others (dart).

    Returns:
        A :class:`Reduction` with ``.tokens`` ``[B, K', D]`` and ``.indices`` ``[B, K]``
        (ascending; ``None`` for pure merging). Reductions are training-free and run
        without autograd: gather from ``.indices`` yourself to keep gradients.

    Raises:
        ValueError: bad arguments, and NaN/inf in the tokens or a tensor signal (naming
            it). For a method that reads the tokens only where it keeps them
            (``reads_tokens="kept"``: fastervlm), the kept tokens are checked, after the
            selection; a NaN/inf in a dropped token cannot change its result.
    """
    spec = get_method(method)
    seed = check_seed(seed)
    kept_only = spec.reads_tokens == "kept"
    tokens = check_tokens(tokens, finite=not kept_only)
    k = resolve_keep(keep, tokens.shape[1])
    raw_signals, options = split_kwargs(kwargs)
    config = spec.make_config(options)
    check_devices(tokens, raw_signals)
    drop_empty_text(raw_signals, spec.required_signals(config), spec.name)
    signals = build_signals(tokens, raw_signals)
    for name in spec.required_signals(config):
        signals.require(name, spec.name)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device)
        generator.manual_seed(seed)
    out = spec.fn(tokens, k, signals, config, generator)
    if kept_only:
        check_kept_finite(tokens, out.tokens)
    return out
