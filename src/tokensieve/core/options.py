"""Validation of method options and seeds, driven by the config dataclass annotations.

Every method's options live in a frozen dataclass (``MethodSpec.config``). Its field
annotations say what each option accepts, and :func:`validate_options` checks user
values against them before the config is built, so ``reduce`` and ``apply`` refuse a bad
option with a ``ValueError`` naming the option, the value and what was expected:

* ``bool``: ``True`` or ``False`` only (not ``"yes"``, not ``1``).
* ``int``: an integer, not a bool and not a float (``4.0`` is refused).
* ``float``: a real number (ints are accepted and converted), not a bool, finite.
* ``str``: a string; ``Literal["a", "b"]``: one of the listed values.
* ``X | None``: ``None`` or an ``X``; ``tuple[X, ...]``: a tuple (or list) of ``X``.
* ``Annotated[int, Range(lo, hi)]`` / ``Annotated[float, Range(...)]``: also within the
  range (inclusive unless ``lo_open`` / ``hi_open``). Counts use ``Count``
  (``int >= 0``); layer indices stay plain ``int`` (negative counts from the end).

A method's own ``__post_init__`` may add checks that involve several options.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric option (``None``: unbounded on that side)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts)


#: A count of tokens, pivots, iterations...: an int >= 0.
Count = Annotated[int, Range(0)]
#: A count that must be at least 1.
PositiveCount = Annotated[int, Range(1)]
#: A share in [0, 1].
Share = Annotated[float, Range(0.0, 1.0)]
#: A finite float > 0 (temperatures, scales).
Positive = Annotated[float, Range(0.0, lo_open=True)]
#: A finite float >= 0 (weights, thresholds).
NonNegative = Annotated[float, Range(0.0)]

_NONE = type(None)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"  # numpy.bool_


def _check(value: Any, tp: Any) -> tuple[bool, Any, str]:
    """``(ok, converted value, what was expected)`` for ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        ok, conv, want = _check(value, base)
        for extra in extras:
            if isinstance(extra, Range):
                want = f"{want} {extra.describe()}"
                if ok and not extra.contains(conv):
                    ok = False
        return ok, conv, want
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        wants = []
        if value is None and _NONE in args:
            return True, None, ""
        for arg in args:
            if arg is _NONE:
                wants.append("None")
                continue
            ok, conv, want = _check(value, arg)
            if ok:
                return True, conv, want
            wants.append(want)
        return False, value, " or ".join(wants)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return False, value, f"a tuple ({tp})"
        item = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) <= 1:
            items = [_check(v, item) for v in value]
        elif len(args) == len(value):
            items = [_check(v, a) for v, a in zip(value, args, strict=True)]
        else:
            return False, value, f"a tuple of {len(args)} items ({tp})"
        ok = all(i[0] for i in items)
        return ok, type(value)(i[1] for i in items) if ok else value, f"a tuple ({tp})"
    if origin is Literal:
        choices = typing.get_args(tp)
        ok = any(type(value) is type(c) and value == c for c in choices)
        return ok, value, f"one of {choices}"
    if tp is bool:
        return _is_bool(value), (bool(value) if _is_bool(value) else value), "True or False"
    if tp is int:
        ok = isinstance(value, numbers.Integral) and not _is_bool(value)
        return ok, (int(value) if ok else value), "an int"
    if tp is float:
        ok = isinstance(value, numbers.Real) and not _is_bool(value)
        if ok:
            conv = float(value)
            return math.isfinite(conv), conv, "a finite number"
        return False, value, "a finite number"
    if tp is str:
        return isinstance(value, str), value, "a string"
    if tp is Any:
        return True, value, "anything"
    if isinstance(tp, type):
        return isinstance(value, tp), value, f"a {tp.__name__}"
    return True, value, str(tp)  # an annotation this checker does not know: accept


def option_types(config: type) -> dict[str, Any]:
    """The resolved annotations ``{field: type}`` of a config dataclass."""
    hints = typing.get_type_hints(config, include_extras=True)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config)}


def validate_options(method: str, config: type, options: dict[str, Any]) -> dict[str, Any]:
    """Check ``options`` against the field annotations of ``config``.

    Returns the options converted to their declared types (an int given for a float
    becomes a float). Raises ``ValueError`` naming the method, option, value and what
    was expected.
    """
    types_ = option_types(config)
    out = {}
    for name, value in options.items():
        ok, conv, want = _check(value, types_[name])
        if not ok:
            raise ValueError(f"method {method!r}: option {name}={value!r} is invalid; "
                             f"expected {want}")
        out[name] = conv
    return out


def check_seed(seed: object) -> int | None:
    """A seed: an int (not a bool) that ``torch.Generator.manual_seed`` accepts, or ``None``."""
    if seed is None:
        return None
    if _is_bool(seed) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed={seed!r}: expected an int or None, got {type(seed).__name__}")
    seed = int(seed)
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed={seed}: expected an int in [-2**63, 2**64)")
    return seed
