"""Checks shared by the model-adapter tests of every family, and the input helpers they use.

A family module builds its tiny model and inputs and describes them in a :class:`Family`;
its tests are thin parametrised calls of the checks below:

(a) keep-all equals the untouched model, (b) pruning equals the untouched model on the
hand-pruned sequence, (c) ``generate`` (KV cache) equals the untouched model's generation
from the hand-pruned sequence, (d) ``remove`` restores the untouched model exactly,
(e) a padded batch equals its samples one by one, (f) clear errors; and the signal a method
receives, to compare with a family's eager-attention reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest
import torch
from model_refs import greedy, kept_indices

import tokensieve.models as tm

ATOL = 1e-5  # patched vs untouched model, same batch
BATCH_ATOL = 1e-4  # padded batch vs one sample alone


@dataclass(frozen=True)
class Family:
    """What the shared checks need of a model family.

    Attributes:
        inputs: ``inputs(model, samples, side="left") -> kwargs`` of a forward/generate call
            on the family's samples ``samples`` (indices), padded on ``side``; a sample's
            images do not depend on the other samples of the call.
        reference: ``reference(model, kwargs, kept) -> kwargs`` of the untouched model on the
            hand-pruned batch (``inputs_embeds``, ``attention_mask`` and what else the family
            needs), ``kept`` being the kept indices of each image.
        samples: how many samples ``inputs`` knows; the checks use them all.
        options: per-method options of ``tm.apply`` (e.g. layers a tiny tower has).
        greedy_reference: the untouched model cannot ``generate`` from ``inputs_embeds``:
            the reference generation is greedy decoding with a KV cache instead.
    """

    inputs: Callable[..., dict]
    reference: Callable[..., dict]
    samples: int = 3
    options: Mapping[str, dict] = field(default_factory=dict)
    greedy_reference: bool = False

    def batch(self, model, side: str = "left") -> dict:
        return self.inputs(model, list(range(self.samples)), side)

    def applied(self, model, method: str, keep):
        return tm.applied(model, method, keep, **self.options.get(method, {}))


def gen_kwargs(steps: int) -> dict:
    return dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None)


def reference_generate(case: Family, model, ref: dict, steps: int) -> torch.Tensor:
    """The untouched model's new tokens from the hand-pruned batch ``ref``."""
    with torch.no_grad():
        if case.greedy_reference:
            return greedy(model, steps, **ref)
        return model.generate(**ref, **gen_kwargs(steps))


# (a) keep everything -------------------------------------------------------------------------
def keep_all_equals_untouched(case: Family, model, method: str, keep) -> None:
    kw = case.batch(model)
    with torch.no_grad():
        ref = model(**kw).logits
        with case.applied(model, method, keep):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# (b) pruning == the untouched model on the hand-pruned sequence ---------------------------------
def pruned_equals_hand_pruned(case: Family, model, method: str, keep) -> list[torch.Tensor]:
    """Returns the kept indices of each image, for a family's own assertions on them."""
    kw = case.batch(model)
    with case.applied(model, method, keep), torch.no_grad():
        out = model(**kw).logits
        kept = kept_indices(model)
    ref_kw = case.reference(model, kw, kept)
    with torch.no_grad():
        ref = model(**ref_kw).logits
    assert out.shape == ref.shape
    real = ref_kw["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)
    return kept


# (c) generate --------------------------------------------------------------------------------
def generate_matches_hand_pruned(case: Family, model, method: str, keep, steps: int = 5) -> None:
    kw = case.batch(model)
    with case.applied(model, method, keep), torch.no_grad():
        out = model.generate(**kw, **gen_kwargs(steps))
        kept = kept_indices(model)
    ids = kw["input_ids"]
    assert torch.equal(out[:, :ids.shape[1]], ids), "sequences start with the caller's prompt"
    ref = reference_generate(case, model, case.reference(model, kw, kept), steps)
    assert torch.equal(out[:, ids.shape[1]:], ref)


def generate_keep_all_equals_untouched(case: Family, model, method: str, keep,
                                       steps: int = 5) -> None:
    """Keep-all ``generate`` equals the untouched one, and so does the reference generation
    from the (complete) hand-built sequence: the reference of (c) is sound."""
    kw = case.batch(model)
    gen = gen_kwargs(steps)
    with torch.no_grad():
        ref = model.generate(**kw, **gen)
        with case.applied(model, method, keep):
            out = model.generate(**kw, **gen)
            kept = kept_indices(model)
    assert torch.equal(out, ref)
    assert all(torch.equal(k, torch.arange(len(k))) for k in kept)
    whole = case.reference(model, kw, kept)
    assert whole["attention_mask"].sum() == kw["attention_mask"].sum()  # nothing pruned
    new = reference_generate(case, model, whole, steps)
    assert torch.equal(new, ref[:, kw["input_ids"].shape[1]:])


# (d) remove ----------------------------------------------------------------------------------
def remove_restores_exactly(case: Family, model, method: str, keep) -> None:
    kw = case.batch(model)
    keys = set(model.__dict__)
    with torch.no_grad():
        ref = model(**kw).logits
        tm.apply(model, method, keep, **case.options.get(method, {}))
        assert model(**kw).logits.shape != ref.shape
        tm.remove(model)
        out = model(**kw).logits
    assert torch.equal(out, ref)
    assert set(model.__dict__) == keys


# (e) padded batch == one by one ----------------------------------------------------------------
def batch_equals_single_samples(case: Family, model, method: str, keep, side: str) -> None:
    kw = case.batch(model, side)
    with case.applied(model, method, keep), torch.no_grad():
        out = model(**kw).logits
        for i in range(case.samples):
            one = model(**case.inputs(model, [i])).logits[0]
            row = out[i, -one.shape[0]:] if side == "left" else out[i, :one.shape[0]]
            torch.testing.assert_close(row, one, atol=BATCH_ATOL, rtol=0)


def batch_generate_equals_single(case: Family, model, method: str, keep,
                                 steps: int = 4) -> None:
    kw = case.batch(model)
    gen = gen_kwargs(steps)
    with case.applied(model, method, keep), torch.no_grad():
        out = model.generate(**kw, **gen)
        for i in range(case.samples):
            one_kw = case.inputs(model, [i])
            one = model.generate(**one_kw, **gen)
            n = one_kw["input_ids"].shape[1]
            assert torch.equal(out[i, kw["input_ids"].shape[1]:], one[0, n:])


# (f) clear errors ----------------------------------------------------------------------------
def apply_refused(model, method: str, keep, match: str, **options) -> None:
    """``tm.apply`` raises a ValueError matching ``match`` and leaves the model untouched."""
    with pytest.raises(ValueError, match=match):
        tm.apply(model, method, keep, **options)
    assert not tm.is_applied(model)


def call_refused(model, kw: dict, method: str, keep, match: str, **options) -> None:
    """The patched model raises a ValueError matching ``match`` on ``kw``; leaving the
    ``applied`` block removes the patch."""
    with pytest.raises(ValueError, match=match), torch.no_grad():
        with tm.applied(model, method, keep, **options):
            model(**kw)
    assert not tm.is_applied(model)


# signals -------------------------------------------------------------------------------------
def signal_seen(model, kw: dict, method: str, keep, signal: str, **options) -> torch.Tensor:
    """The signal ``signal`` (a field of the method's signals) that ``method`` receives when
    the patched model runs on ``kw``."""
    from tokensieve.core import registry

    spec = registry.get_method(method)
    seen = {}

    def spy(tokens, k, signals, config, generator):
        seen[signal] = getattr(signals, signal)
        return spec.fn(tokens, k, signals, config, generator)

    registry._REGISTRY[method] = spec.__class__(**{**spec.__dict__, "fn": spy})
    try:
        with tm.applied(model, method, keep, **options), torch.no_grad():
            model(**kw)
    finally:
        registry._REGISTRY[method] = spec
    return seen[signal]


# inputs --------------------------------------------------------------------------------------
def interleave(chunks: list[list[int]], runs: list[list[int]]) -> list[int]:
    """``chunks[0] + runs[0] + chunks[1] + ... + chunks[-1]`` (one run between two chunks)."""
    assert len(runs) == len(chunks) - 1
    out = list(chunks[0])
    for run, chunk in zip(runs, chunks[1:], strict=True):
        out += run + chunk
    return out


def pad_rows(rows: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token rows padded with 0 on ``side``."""
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask
