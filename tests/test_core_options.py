"""Options and seeds are validated from the config annotations; specs declare their signals."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Literal

import pytest
import torch
from conftest import generic_keep, inputs_for, make_inputs

import tokensieve as ts
from tokensieve.core import api
from tokensieve.core.options import Range, option_types
from tokensieve.core.signals import SIGNAL_NAMES, Signals

METHODS_WITH_OPTIONS = [m for m in ts.list_methods()
                        if dataclasses.is_dataclass(ts.describe(m).config)
                        and dataclasses.fields(ts.describe(m).config)]


def _bad_values(tp) -> list:
    """Values an option of annotation ``tp`` must refuse."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        out = _bad_values(base)
        for r in extras:
            if isinstance(r, Range):
                step = 1 if base is int else 0.5
                if r.lo is not None:
                    out.append(r.lo if r.lo_open else r.lo - step)
                if r.hi is not None:
                    out.append(r.hi if r.hi_open else r.hi + step)
        return out
    if origin in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return [v for v in _bad_values(args[0]) if v is not None]
    if origin is Literal:
        return ["no-such-choice", 1, None, True]
    if origin is tuple:
        return ["1", 1, (1.5,), ("a",)]
    if tp is bool:
        return ["yes", "False", 1, 0, None, 1.0]
    if tp is int:
        return [4.0, 0.5, "4", True, None, float("nan")]
    if tp is float:
        return ["0.5", True, False, None, float("nan"), float("inf"), -float("inf")]
    if tp is str:
        return [1, None, True]
    raise AssertionError(f"annotation {tp!r} has no bad values here")


@pytest.mark.parametrize("method", METHODS_WITH_OPTIONS)
def test_every_option_rejects_wrong_types_and_ranges(method):
    spec = ts.describe(method)
    for name, tp in option_types(spec.config).items():
        for bad in _bad_values(tp):
            with pytest.raises(ValueError) as err:
                spec.make_config({name: bad})
            msg = str(err.value)
            assert name in msg and "expected" in msg, msg
            if not (isinstance(bad, float) and math.isnan(bad)):
                assert repr(bad) in msg, msg


@pytest.mark.parametrize("method", ts.list_methods())
def test_defaults_pass_validation_and_every_annotation_is_checked(method):
    spec = ts.describe(method)
    if not dataclasses.is_dataclass(spec.config):
        return
    defaults = spec.defaults()
    config = spec.make_config(defaults)
    assert dataclasses.asdict(config) == defaults
    for name, tp in option_types(spec.config).items():
        assert _bad_values(tp), (method, name)


def test_int_given_for_a_float_option_is_accepted_as_float():
    config = ts.describe("mmtok").make_config({"alpha": 1})
    assert config.alpha == 1.0 and isinstance(config.alpha, float)


def test_reduce_names_the_bad_option():
    inputs = make_inputs(b=1, n=16, d=8)
    tokens = inputs.pop("tokens")
    with pytest.raises(ValueError, match=r"'dart'.*pivots=2\.0.*expected an int"):
        ts.reduce(tokens, "dart", 8, pivots=2.0)
    with pytest.raises(ValueError, match=r"text_pivots=-1.*expected an int >= 0"):
        ts.reduce(tokens, "dart", 8, text_pivots=-1)
    with pytest.raises(ValueError, match=r"has_cls='yes'.*True or False"):
        ts.reduce(tokens, "tome", 8, has_cls="yes")
    with pytest.raises(ValueError, match=r"tau_tv=nan.*finite"):
        ts.reduce(tokens, "mmtok", 8, text=inputs["text"], tau_tv=float("nan"))
    with pytest.raises(ValueError, match=r"dominant=True"):
        ts.reduce(tokens, "visionzip", 8, cls_attn=inputs["cls_attn"], keys=inputs["keys"],
                  dominant=True)


@pytest.mark.parametrize("seed", [True, 1.0, "0", 2.5, [1], 2 ** 64, -(2 ** 63) - 1])
def test_seed_must_be_an_int_or_none(seed):
    tokens = torch.randn(1, 16, 8)
    with pytest.raises(ValueError, match="seed="):
        ts.reduce(tokens, "random", 4, seed=seed)
    with pytest.raises(ValueError, match="seed="):
        ts.ReduceConfig("random", 4, seed=seed)


def test_valid_seeds_are_accepted():
    tokens = torch.randn(1, 16, 8)
    for seed in (None, 0, -3, 2 ** 63):
        ts.reduce(tokens, "random", 4, seed=seed)
    a = ts.reduce(tokens, "random", 4, seed=7).indices
    assert torch.equal(a, ts.reduce(tokens, "random", 4, seed=7).indices)


# ------------------------------------------------------------------ declared signals

class _Recording(Signals):
    """Signals that remember which signal fields a method read."""

    read: set[str]

    def __getattribute__(self, name: str):
        if name in SIGNAL_NAMES:
            object.__getattribute__(self, "read").add(name)
        return object.__getattribute__(self, name)


def _record(monkeypatch) -> set[str]:
    read: set[str] = set()
    original = api.build_signals

    def build(tokens, raw):
        s = original(tokens, raw)
        out = _Recording(**{f.name: getattr(s, f.name) for f in dataclasses.fields(Signals)})
        object.__setattr__(out, "read", read)
        return out

    monkeypatch.setattr(api, "build_signals", build)
    return read


def _declared_inputs(method: str, names) -> tuple[torch.Tensor, dict]:
    full = inputs_for(method, b=2)
    tokens = full.pop("tokens")
    for name in names:  # a score signal the shared fixture does not build (yet)
        if full.get(name) is None and name not in ("grid", "partitions", "text_mask"):
            full[name] = torch.rand(tokens.shape[:2], generator=torch.Generator().manual_seed(1))
    return tokens, {k: full[k] for k in names if full.get(k) is not None}


@pytest.mark.parametrize("method", ts.list_methods())
def test_method_runs_with_exactly_its_declared_signals(method, monkeypatch):
    spec = ts.describe(method)
    read = _record(monkeypatch)
    tokens, required = _declared_inputs(method, spec.signals)
    ts.reduce(tokens, method, generic_keep(method), **required)  # the defaults need no more
    assert read <= set(spec.signals) | set(spec.optional_signals), read
    read.clear()
    tokens, declared = _declared_inputs(method, spec.signals + spec.optional_signals)
    ts.reduce(tokens, method, generic_keep(method), **declared)
    undeclared = read - set(spec.signals) - set(spec.optional_signals)
    assert not undeclared, f"{method} reads undeclared signals {undeclared}"


@pytest.mark.parametrize("method", [m for m in ts.list_methods() if ts.describe(m).signals])
def test_removing_a_required_signal_names_it(method):
    spec = ts.describe(method)
    for missing in spec.signals:
        tokens, inputs = _declared_inputs(method, [s for s in spec.signals if s != missing])
        with pytest.raises(ValueError, match=rf"needs the signal '{missing}'"):
            ts.reduce(tokens, method, 64, **inputs)


@pytest.mark.parametrize("method,options,needs", [
    ("ats", {"use_values": False}, ("cls_attn",)),
    ("fopru", {"score": "cls_attn"}, ("cls_attn",)),
    ("visiondrop", {"score": "cls_attn"}, ("keys", "cls_attn")),
])
def test_options_change_the_required_signals(method, options, needs):
    spec = ts.describe(method)
    assert spec.required_signals(spec.make_config(options)) == needs
    tokens, inputs = _declared_inputs(method, needs)
    ts.reduce(tokens, method, 64, **inputs, **options)
