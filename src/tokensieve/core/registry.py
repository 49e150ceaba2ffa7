"""The method registry: a new method is one file plus one ``@register`` decorator."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from tokensieve.core.options import validate_options
from tokensieve.core.reduction import Reduction
from tokensieve.core.signals import SIGNAL_NAMES, Signals

Stage = Literal["pre-llm", "encoder", "llm"]
Kind = Literal["subset", "merge", "subset+merge"]

MethodFn = Callable[[Tensor, int, Signals, Any, "torch.Generator | None"], Reduction]


@dataclass(frozen=True)
class MethodSpec:
    """What a method is and what it needs.

    Attributes:
        name: registry name (lowercase).
        fn: ``fn(tokens [B, N, D], k, signals, config, generator) -> Reduction``.
        paper: the paper (and venue) the method comes from.
        stage: where the official method acts: before the LLM, inside the vision
            encoder, or inside the LLM. Every registered method here reduces a token set.
        kind: "subset" (keeps tokens unchanged), "merge" (only merged tokens) or
            "subset+merge".
        signals: signals the method cannot run with its default options without.
        optional_signals: every other signal it reads when given (or needs under some
            non-default option). Together the two list every signal the method reads.
        config: a dataclass of the method's options and their official defaults.
        features: which features the official method reads: "vision" (encoder layer
            output, before the projector) or "projected" (the LLM's visual tokens).
        cls_token: whether the method can take a leading CLS token (option ``has_cls``).
        llm_stage: for a multi-stage method whose first stage acts before the LLM, the
            registered in-LLM method holding its later stages (``tokensieve.apply`` runs
            both unless told otherwise).
        reads_tokens: "all" (the method reads every token: ``reduce`` checks all of them
            for NaN/inf first) or "kept" (it reads only the tokens it keeps, choosing them
            from signals alone: ``reduce`` checks its output instead, which costs ``K / N``
            of a full check and raises the same ``ValueError`` when a kept token is not
            finite; a NaN/inf in a dropped token cannot change the result).
    """

    name: str
    fn: MethodFn
    paper: str
    stage: Stage
    kind: Kind
    signals: tuple[str, ...] = ()
    optional_signals: tuple[str, ...] = ()
    config: type = field(default=type(None))
    features: Literal["vision", "projected"] = "projected"
    cls_token: bool = False
    llm_stage: str | None = None
    reads_tokens: Literal["all", "kept"] = "all"

    def required_signals(self, config: Any) -> tuple[str, ...]:
        """The signals the method needs with ``config``: ``config.required_signals()`` when
        the config class defines it (options that switch signals), else ``signals``."""
        needs = getattr(config, "required_signals", None)
        return tuple(needs()) if callable(needs) else self.signals

    def defaults(self) -> dict[str, Any]:
        """The method's options and their defaults."""
        if not dataclasses.is_dataclass(self.config):
            return {}
        return dataclasses.asdict(self.config())

    def make_config(self, options: dict[str, Any]) -> Any:
        """Build the method's config from keyword options.

        Unknown names, and values of the wrong type or out of range (see
        :func:`tokensieve.core.options.validate_options`), raise ``ValueError``.
        """
        if not dataclasses.is_dataclass(self.config):
            if options:
                raise ValueError(f"method {self.name!r} takes no options, got {sorted(options)}")
            return None
        if not options:
            return self.config()
        names = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(
                f"method {self.name!r} got unknown option(s) {unknown}; its options are "
                f"{sorted(names) or 'none'} and the signals are {list(SIGNAL_NAMES)}"
            )
        return self.config(**validate_options(self.name, self.config, options))


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register(
    name: str,
    *,
    paper: str,
    stage: Stage,
    kind: Kind,
    signals: tuple[str, ...] = (),
    optional_signals: tuple[str, ...] = (),
    config: type | None = None,
    features: Literal["vision", "projected"] = "projected",
    cls_token: bool = False,
    llm_stage: str | None = None,
    reads_tokens: Literal["all", "kept"] = "all",
) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering a method function under ``name`` (arguments: the fields of
    :class:`MethodSpec`)."""
    if reads_tokens not in ("all", "kept"):
        raise ValueError(f"method {name!r}: reads_tokens={reads_tokens!r}: expected 'all' "
                         "or 'kept'")
    for s in (*signals, *optional_signals):
        if s not in SIGNAL_NAMES:
            raise ValueError(f"method {name!r}: unknown signal {s!r}; known: {SIGNAL_NAMES}")

    needs = getattr(config, "required_signals", None)
    if dataclasses.is_dataclass(config) and callable(needs):
        default_needs = tuple(config().required_signals())
        if set(default_needs) != set(signals):
            raise ValueError(f"method {name!r}: signals={signals} but its default options "
                             f"need {default_needs}")

    def wrap(fn: MethodFn) -> MethodFn:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key].fn is not fn:
            raise ValueError(f"method {key!r} is registered twice")
        _REGISTRY[key] = MethodSpec(
            name=key, fn=fn, paper=paper, stage=stage, kind=kind, signals=signals,
            optional_signals=optional_signals, config=config or type(None),
            features=features, cls_token=cls_token, llm_stage=llm_stage,
            reads_tokens=reads_tokens,
        )
        return fn

    return wrap


def _load_builtin_methods() -> None:
    """Import every module of ``tokensieve.methods`` so their decorators run."""
    global _LOADED
    if _LOADED:
        return
    import tokensieve.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def list_methods() -> list[str]:
    """All registered method names, sorted."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; unknown names raise a ValueError with close matches."""
    _load_builtin_methods()
    if not isinstance(name, str):
        raise ValueError(f"method={name!r}: expected a method name (str)")
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[key]


describe = get_method
