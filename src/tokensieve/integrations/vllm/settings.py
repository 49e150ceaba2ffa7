"""The plugin's settings: read from the model's Hugging Face config, checked up front.

vLLM fixes each image's placeholder count before the encoder runs, so a setting is
checked (method, stage, signals, options, budget) when vLLM builds the processor and the
model, not at the first request. Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokensieve.core.budget import resolve_keep
from tokensieve.core.options import check_seed
from tokensieve.core.registry import MethodSpec, get_method

#: Name of the entry of the model's config (set through ``hf_overrides``).
CONFIG_KEY = "tokensieve"
#: Prefix of the architectures the plugin registers (``Tokensieve`` + vLLM's name).
ARCH_PREFIX = "Tokensieve"
#: Keys of the ``tokensieve`` entry.
KEYS = ("method", "keep", "options", "seed", "signal_layers", "llm")
#: ``llm`` as in ``ts.apply``: a multi-stage method's own in-LLM stages (the default there).
OFFICIAL = "official"


@dataclass(frozen=True)
class VllmSieve:
    """One method and its settings, as the plugin runs it inside vLLM.

    Attributes:
        method: a pre-LLM method from ``tokensieve.list_methods()``.
        keep: tokens kept per image: an int count or a float fraction in (0, 1].
        options: the method's options (as in ``ts.apply``).
        seed: seed of the methods that draw random numbers.
        signal_layers: encoder layers of the attention signals (as in ``ts.apply``).
        llm: as in ``ts.apply``: ``"official"`` (its default) runs a multi-stage method's
            in-LLM stages after its pre-LLM one, which the plugin cannot (they cut the
            sequence inside vLLM's LLM), so such methods need ``llm=None``: the pre-LLM
            stage alone, as ``ts.apply(model, method, llm=None)`` runs it.
    """

    method: str
    keep: int | float
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = 0
    signal_layers: Any = None
    llm: str | None = OFFICIAL

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def kept(self, n: int) -> int:
        """Placeholder tokens of an image whose LLM would get ``n`` visual tokens."""
        try:
            return resolve_keep(self.keep, n)
        except ValueError as err:
            raise ValueError(f"tokensieve: {err}; each image gives this model's LLM {n} "
                             "visual tokens") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the value to put under ``tokensieve`` in ``hf_overrides``)."""
        out: dict[str, Any] = {"method": self.method, "keep": self.keep,
                               "options": dict(self.options), "seed": self.seed}
        if self.signal_layers is not None:
            out["signal_layers"] = self.signal_layers
        if self.llm != OFFICIAL:
            out["llm"] = self.llm
        return out


def parse(value: Any) -> VllmSieve | None:
    """Check the ``tokensieve`` entry of a config (a dict, or None for no reduction).

    Raises ``ValueError`` naming the offending setting: unknown keys or method, a method
    that does not act before the LLM (vLLM's encoder output is all the plugin changes), a
    text-conditioned method (vLLM's encoder never sees the prompt), bad options or seed.
    """
    if value is None:
        return None
    if hasattr(value, "to_dict") and not isinstance(value, dict):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise ValueError(f"tokensieve: the {CONFIG_KEY!r} setting must be a dict with keys "
                         f"{list(KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise ValueError(f"tokensieve: unknown setting(s) {unknown}; expected {list(KEYS)}")
    if "method" not in value or "keep" not in value:
        raise ValueError(f"tokensieve: the {CONFIG_KEY!r} setting needs 'method' and 'keep', "
                         f"got {value!r}")
    options = value.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"tokensieve: options must be a dict, got {options!r}")
    sieve = VllmSieve(method=value["method"], keep=value["keep"], options=dict(options),
                      seed=check_seed(value.get("seed", 0)),
                      signal_layers=value.get("signal_layers"),
                      llm=value.get("llm", OFFICIAL))
    spec = sieve.spec  # unknown names raise with close matches
    if spec.stage != "pre-llm":
        raise ValueError(
            f"tokensieve: method {spec.name!r} acts {_WHERE.get(spec.stage, spec.stage)}; the "
            "vLLM plugin runs methods that reduce the visual tokens before the LLM "
            f"(pre-llm: {', '.join(pre_llm_methods())})")
    config = spec.make_config(dict(options))
    if "text" in spec.required_signals(config):
        raise ValueError(
            f"tokensieve: method {spec.name!r} is text-conditioned (it needs the prompt's "
            "text); vLLM encodes images without their prompt, so the plugin cannot run it")
    if sieve.llm not in (None, OFFICIAL):
        raise ValueError(f"tokensieve: llm={sieve.llm!r}: the vLLM plugin runs no in-LLM "
                         "method (they cut the sequence inside vLLM's LLM); expected None")
    if spec.llm_stage is not None and sieve.llm == OFFICIAL:
        raise ValueError(
            f"tokensieve: method {spec.name!r} runs its in-LLM stage {spec.llm_stage!r} after "
            "its pre-LLM one by default (ts.apply(..., llm='official')), which the vLLM "
            "plugin cannot run; set llm=None (\"llm\": null) for the pre-LLM stage alone, "
            f"as ts.apply(model, {spec.name!r}, llm=None) runs it")
    keep = sieve.keep
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or keep <= 0 or \
            (isinstance(keep, float) and keep > 1):
        raise ValueError(f"tokensieve: keep={keep!r}: expected an int count >= 1 or a float "
                         "fraction in (0, 1]")
    return sieve


_WHERE = {"encoder": "inside the vision tower", "llm": "inside the LLM (guided by the prompt)",
          "decode": "on the KV cache while decoding"}


def pre_llm_methods() -> list[str]:
    """The methods the plugin can run: pre-LLM and not text-conditioned."""
    from tokensieve.core.registry import list_methods

    out = []
    for name in list_methods():
        spec = get_method(name)
        if spec.stage == "pre-llm" and "text" not in spec.required_signals(
                spec.make_config({})):
            out.append(name)
    return out


def from_config(hf_config: Any) -> VllmSieve | None:
    """The settings stored in a model config (``None``: the model runs unreduced)."""
    return parse(getattr(hf_config, CONFIG_KEY, None))


def hf_overrides(method: str, keep: int | float, *,
                 architecture: str = "LlavaForConditionalGeneration",
                 seed: int | None = 0, signal_layers: Any = None,
                 llm: str | None = OFFICIAL, **options: Any) -> dict[str, Any]:
    """The ``hf_overrides`` that make vLLM run ``method`` through the plugin.

    Example::

        LLM(model=path, hf_overrides=hf_overrides("divprune", 64))

    Checks the settings now (``ValueError``); ``architecture`` is the model's own vLLM
    architecture name (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
    ``Qwen2_5_VLForConditionalGeneration``); the other arguments mean what they mean in
    ``ts.apply`` (``llm=None`` for a multi-stage method: its pre-LLM stage alone).
    """
    sieve = VllmSieve(method=method, keep=keep, options=options, seed=seed,
                      signal_layers=signal_layers, llm=llm)
    parse(sieve.to_dict())
    return {"architectures": [ARCH_PREFIX + architecture], CONFIG_KEY: sieve.to_dict()}
