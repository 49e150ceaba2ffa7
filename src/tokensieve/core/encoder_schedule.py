"""Schedules of in-encoder methods: at which vision-encoder layers tokens are reduced, how.

An in-encoder method (ToMe, EViT, ...) reduces the token set *inside* the layers of a
vision transformer, between the attention and the MLP of some layers. Its in-model
options (``r`` per layer, a keep rate, the layers, proportional attention) live in a frozen
dataclass deriving from :class:`EncoderSchedule`, registered under the method's name with
:func:`register_encoder_schedule`. The schedule says where the method acts
(:meth:`EncoderSchedule.plan`) and what one layer does (:meth:`EncoderSchedule.step`, a
pure function over tensors that reuses the method's token-set functions); the model layer
(``tokensieve.models._encoder``) runs it inside the layers of any supported tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor


@dataclass(frozen=True)
class LayerStep:
    """What one layer's reduction did to ``T`` tokens (``T'`` come out).

    Attributes:
        tokens: ``[B, T', D]`` the reduced tokens (the layer's MLP runs on them).
        sizes: ``[B, T']`` float32, how many original tokens each output token stands for.
        slot: ``[B, T]`` long, the output slot of every input token (-1: dropped).
        kept: ``[B, T']`` long, the input index that represents each output token (the
            surviving token of a merged group; a fused token's most attended member).
    """

    tokens: Tensor
    sizes: Tensor
    slot: Tensor
    kept: Tensor


@dataclass(frozen=True)
class EncoderSchedule:
    """Base of in-encoder method schedules (frozen dataclasses of the in-model options).

    Class attributes (not options):
        signals: what :meth:`step` reads besides the tokens, computed by the model layer
            from the layer's own q / k projections (no eager attention): ``"keys"``
            (``[B, T, Dh]`` head-mean keys, float32) and / or ``"cls_attn"`` (``[B, T]``
            head-mean softmax attention row of token 0, float32).
        needs_cls: the method cannot run on a tower without a CLS token (e.g. EViT).
    """

    signals: ClassVar[tuple[str, ...]] = ()
    needs_cls: ClassVar[bool] = False

    @property
    def proportional(self) -> bool:
        """Whether attention logits get ``log(size)`` of each key (ToMe's proportional
        attention), as an additive float mask ``[B, 1, 1, T]``."""
        return False

    def plan(self, depth: int) -> dict[int, Any]:
        """Layer index (0-based) -> the layer's parameter (e.g. ``r``) for the layers
        that reduce, in a tower of ``depth`` layers."""
        raise NotImplementedError

    def step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
             param: Any, has_cls: bool) -> LayerStep | None:
        """Reduce ``tokens`` ``[B, T, D]`` (after the layer's attention residual) with
        ``param`` from :meth:`plan`; ``sizes`` ``[B, T]`` float32 or ``None`` (all ones);
        ``has_cls``: token 0 is a CLS token (never merged or dropped, stays first).
        Returns ``None`` when nothing is reduced at this size."""
        raise NotImplementedError

    def run_step(self, tokens: Tensor, sizes: Tensor | None, signals: dict[str, Tensor],
                 param: Any, has_cls: bool, state: dict[str, Any]) -> LayerStep | None:
        """:meth:`step` with ``state``, a dict that lives for one pass through the encoder
        (empty at layer 0 but for ``state["input"]``, the ``[B, N, D]`` tokens entering
        layer 0): methods that carry something across layers (FlowCut's cumulative scores,
        GTP's graph) override this; the default ignores it."""
        return self.step(tokens, sizes, signals, param, has_cls)

    def count(self, param: Any, tokens: int, has_cls: bool) -> int:
        """Tokens that :meth:`step` with ``param`` leaves of ``tokens`` (the accounting and
        the budget solver use it; it must agree with :meth:`step`). Default: unchanged."""
        return tokens

    def observes(self, param: Any) -> bool:
        """Whether a plan entry only reads signals (reduces nothing), so that it runs even
        after the last layer whose output is used (MustDrop's key set from the last
        layer's CLS attention). Default: no."""
        return False

    @classmethod
    def for_keep(cls, keep: int, tokens: int, has_cls: bool, depth: int, until: int,
                 options: dict[str, Any]) -> EncoderSchedule:
        """The schedule whose reductions leave ``keep`` patch tokens (CLS not counted) of
        ``tokens`` entering layer 0 of a ``depth``-layer encoder, reducing only at layers
        ``<= until`` (those whose output is used: up to a VLM's feature layer), with the
        other ``options`` as given.
        ValueError when the method has no budget mapping or cannot reach ``keep``."""
        raise ValueError(f"keep: this in-encoder method is set by its own options "
                         f"({', '.join(f.name for f in dataclasses.fields(cls))}), not by keep")


def spread_merges(name: str, tokens: int, keep: int, has_cls: bool, layers: Sequence[int],
                  most: Callable[[int], int]) -> dict[int, int]:
    """Per reducing layer the tokens it merges so that ``keep`` patch tokens are left of
    ``tokens`` (CLS included) entering the first of ``layers`` (ascending).

    The ``tokens - has_cls - keep`` merges are spread evenly (each layer the ceiling of the
    mean still to do, the larger shares first; a constant ``r`` where it divides), each
    capped by ``most(t)``, the largest merge the method allows at ``t`` tokens (ToMe: half
    the patches); where the later layers' caps could not absorb their share, earlier layers
    merge more. ValueError naming ``keep`` when the caps cannot reach it.
    """
    c = int(has_cls)
    todo = tokens - c - keep
    layers = list(layers)

    def fewest(t: int, n: int) -> int:  # patch tokens left when n layers merge all they can
        for _ in range(n):
            t -= most(t)
        return t - c

    out: dict[int, int] = {}
    t = tokens
    for j, layer in enumerate(layers):
        left = len(layers) - j
        cap = min(most(t), todo)
        r = min(-(-todo // left), cap)
        while r < cap and fewest(t - r, left - 1) > keep:
            r += 1  # the later layers' caps cannot absorb the rest: merge more now
        out[layer] = r
        t -= r
        todo -= r
    if todo > 0:
        raise ValueError(f"{name}: keep={keep} is out of reach: {len(layers)} reducing "
                         f"layer(s), each merging at most what the method allows, leave "
                         f"{fewest(tokens, len(layers))} of {tokens - c} patch tokens")
    return out


def encoder_layers(name: str, layers: tuple[int, ...] | None, official: tuple[int, ...],
                   official_depth: int, depth: int) -> tuple[int, ...]:
    """The layers a method reduces at in a ``depth``-layer encoder: its ``layers`` option, or
    its official layers of an ``official_depth``-layer encoder scaled (``l * depth //
    official_depth``); ValueError naming the ones the encoder does not have."""
    if layers is None:
        layers = tuple(sorted({lay * depth // official_depth for lay in official}))
    bad = [v for v in layers if v >= depth]
    if bad:
        raise ValueError(f"{name}: layers={tuple(layers)}: {bad} are not layers of this "
                         f"{depth}-layer encoder")
    return tuple(int(v) for v in layers)


def layer_tokens(schedule: EncoderSchedule, plan: dict[int, Any], depth: int, tokens: int,
                 has_cls: bool, counts: dict[int, int] | None = None) -> list[tuple[int, int]]:
    """Per encoder layer, ``(attention tokens, MLP tokens)``: what each half of the layer
    runs on when ``tokens`` enter layer 0 and the layers of ``plan`` reduce to
    :meth:`EncoderSchedule.count` tokens, where the schedule's ``position`` puts the step
    (``"mid"``, the default: between the attention and the MLP; ``"post"``: after the MLP;
    ``"pre"``: before the layer). ``counts``: layer -> tokens left there, replacing
    :meth:`EncoderSchedule.count` (an adaptive method's measured counts)."""
    position = getattr(schedule, "position", "mid")
    out = []
    t = tokens
    for i in range(depth):
        before = t
        if counts is not None and i in counts:
            t = counts[i]
        elif i in plan:
            t = schedule.count(plan[i], t, has_cls)
        out.append({"pre": (t, t), "post": (before, before)}.get(position, (before, t)))
    return out


_SCHEDULES: dict[str, type[EncoderSchedule]] = {}


def register_encoder_schedule(name: str) -> Any:
    """Class decorator: ``cls`` holds the in-encoder options of method ``name``."""

    def wrap(cls: type[EncoderSchedule]) -> type[EncoderSchedule]:
        _SCHEDULES[name] = cls
        return cls

    return wrap


def encoder_schedule_class(name: str) -> type[EncoderSchedule] | None:
    """The registered schedule class of method ``name`` (None: it has no in-model patch)."""
    from tokensieve.core.registry import get_method

    get_method(name)  # loads the methods (and their schedules); unknown names fail here
    return _SCHEDULES.get(name)


def make_encoder_schedule(name: str, options: dict[str, Any]) -> EncoderSchedule:
    """Build method ``name``'s schedule from keyword options (unknown names and bad
    values raise ``ValueError``)."""
    cls = encoder_schedule_class(name)
    if cls is None:
        raise ValueError(f"method {name!r} acts at stage 'encoder'; its in-encoder patch is "
                         "not built yet (tokensieve.reduce runs it on token sets; "
                         "tokensieve.apply runs tome and evit inside the encoder)")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"method {name!r} inside the encoder got unknown option(s) {unknown}; "
                         f"its in-encoder options are {sorted(names)}")
    return cls(**options)
