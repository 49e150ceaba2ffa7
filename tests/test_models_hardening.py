"""No silent wrong results from a patched model: cache continuation, copies, pickles,
threads, gradients and masked holes (tiny random LLaVA-1.5; references built by hand)."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from model_checks import pad_rows
from model_refs import kept_indices
from test_models_llava import ROWS, N, hand_pruned, images, tiny_llava

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.models._llm import find_text_model

ATOL = 1e-5
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=3)


def batch(samples=(0, 1)):
    rows = [ROWS[i] for i in samples]
    ids, mask = pad_rows(rows)
    n_img = sum(r.count(60) // N for r in rows)
    return rows, dict(input_ids=ids, attention_mask=mask, pixel_values=images(n_img))


# 1. continuing a returned cache -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_continues_a_shortened_cache(model, name):
    """Prefill with images, then two tokens on the returned cache with the whole sequence's
    mask (and positions): equals the untouched model continuing the hand-pruned prompt."""
    rows, kw = batch()
    nxt = torch.tensor([[21, 22], [23, 24]])
    full = torch.cat([kw["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1)
    with torch.no_grad(), tm.applied(model, "fastervlm", 8):
        first = model(**kw, use_cache=True)
        kept = kept_indices(model)
        out = model(input_ids=nxt, attention_mask=full, use_cache=True,
                    **{name: first.cache}).logits
        with pytest.raises(ValueError, match="whole sequence"):
            model(input_ids=nxt, attention_mask=full[:, 1:], **{name: first.cache})
        with pytest.raises(ValueError, match="new images"):
            model(**kw, **{name: first.cache})
    embeds, hmask, _ = hand_pruned(model, rows, images(3), kept)
    with torch.no_grad():
        pre = model(inputs_embeds=embeds, attention_mask=hmask, use_cache=True)
        ref = model(input_ids=nxt, cache=pre.cache, attention_mask=torch.cat(
            [hmask, torch.ones(2, 2, dtype=torch.long)], 1)).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_forward_continuation_maps_the_callers_positions(model):
    """Positions the caller counts over the whole sequence (mask cumsum) move back by the
    image tokens cut from their row, as in the prefill."""
    rows, kw = batch()
    pos = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    nxt = torch.tensor([[21], [23]])
    full = torch.cat([kw["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad(), tm.applied(model, "fastervlm", 8):
        first = model(**kw, position_ids=pos, use_cache=True)
        kept = kept_indices(model)
        out = model(input_ids=nxt, attention_mask=full, position_ids=pos[:, -1:] + 1,
                    cache=first.cache).logits
    embeds, hmask, _ = hand_pruned(model, rows, images(3), kept)
    hpos = (hmask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        pre = model(inputs_embeds=embeds, attention_mask=hmask, position_ids=hpos,
                    use_cache=True)
        torch.testing.assert_close(first.logits[hmask.bool()], pre.logits[hmask.bool()],
                                   atol=ATOL, rtol=0)
        ref = model(input_ids=nxt, cache=pre.cache, position_ids=hpos[:, -1:] + 1,
                    attention_mask=torch.cat([hmask, torch.ones(2, 1, dtype=torch.long)],
                                             1)).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,llm", [("fastervlm", None), ("fastervlm", "fastv"),
                                        ("fastv", None)])
def test_generate_continues_a_returned_cache(model, method, llm):
    """generate, then generate again from its sequences and returned cache: the same tokens
    as one longer generation (pre-LLM, pipeline and in-LLM alike)."""
    _, kw = batch((0, 1, 2))
    opts = {} if llm is None else {"llm": llm}
    keep = 8 if method == "fastervlm" else 10
    with torch.no_grad(), tm.applied(model, method, keep, **opts):
        once = model.generate(**kw, max_new_tokens=6, **GEN)
        first = model.generate(**kw, max_new_tokens=3, return_dict_in_generate=True, **GEN)
        seq = first.sequences
        mask = torch.cat([kw["attention_mask"], torch.ones(3, 3, dtype=torch.long)], 1)
        again = model.generate(input_ids=seq, attention_mask=mask, max_new_tokens=3,
                               past_key_values=first.cache, **GEN)
    assert torch.equal(again, once)


def test_a_copys_shortened_cache_is_refused(model):
    _, kw = batch()
    full = torch.cat([kw["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad(), tm.applied(model, "fastervlm", 8):
        first = model(**kw, use_cache=True)
        other = copy.deepcopy(model)
        with pytest.raises(ValueError, match="continues only on the patched model"):
            other(input_ids=torch.tensor([[21], [22]]), attention_mask=full, cache=first.cache)


# 2. copies, pickles, threads ----------------------------------------------------------------------
@pytest.mark.parametrize("method,keep", [("fastervlm", 8), ("fastv", 10)])
def test_deepcopy_is_an_independent_patched_model(model, method, keep):
    _, kw = batch()
    m = copy.deepcopy(model)
    with torch.no_grad():
        tm.apply(m, method, keep)
        ref = m(**kw).logits
        twin = copy.deepcopy(m)
        assert tm.get_state(twin) is not tm.get_state(m)
        torch.testing.assert_close(twin(**kw).logits, ref, atol=0, rtol=0)
        # The copy runs its own modules: changing them changes the copy only.
        find_text_model(twin).norm.weight.mul_(2)
        assert not torch.allclose(twin(**kw).logits, ref)
        torch.testing.assert_close(m(**kw).logits, ref, atol=0, rtol=0)
        find_text_model(twin).norm.weight.div_(2)
        tm.remove(m)  # the copy stays patched and reduces
        assert tm.is_applied(twin) and not tm.is_applied(m)
        torch.testing.assert_close(twin(**kw).logits, ref, atol=0, rtol=0)
        plain = m(**kw).logits
        tm.remove(twin)
        torch.testing.assert_close(twin(**kw).logits, plain, atol=0, rtol=0)
    lm = find_text_model(twin)
    assert all(not mod._forward_pre_hooks and not mod._forward_hooks for mod in lm.modules())


@pytest.mark.parametrize("method,keep", [("fastervlm", 8), ("fastv", 10)])
def test_pickled_patched_model_loads_patched(method, keep):
    """(Pickled before its first call: transformers' own output hooks, installed by a call,
    are not picklable, patched or not.)"""
    _, kw = batch()
    m = tiny_llava(text_layers=3)
    with torch.no_grad(), tm.applied(m, method, keep):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        ref = m(**kw).logits
        assert tm.is_applied(loaded)
        torch.testing.assert_close(loaded(**kw).logits, ref, atol=0, rtol=0)
        tm.remove(loaded)
        assert loaded(**kw).logits.shape[1] == kw["input_ids"].shape[1]


@pytest.mark.parametrize("method,keep", [("fastervlm", 8), ("fastv", 10)])
def test_threads_get_their_own_results(model, method, keep):
    """Two threads call one patched model at once with different inputs: each gets what it
    gets alone, and its own last reductions."""
    calls = [batch((0,))[1], batch((1,))[1]]
    calls[1]["pixel_values"] = images(2, seed=7)
    with torch.no_grad(), tm.applied(model, method, keep):
        alone = [model(**kw).logits for kw in calls]
        kept_alone = []
        for kw in calls:
            model(**kw)
            kept_alone.append(tm.last_reductions(model) if method != "fastv" else None)
        barrier = threading.Barrier(2)
        results: dict[int, list] = {0: [], 1: []}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for _ in range(4):
                    barrier.wait()
                    with torch.no_grad():
                        out = model(**calls[i]).logits
                    red = tm.last_reductions(model) if method != "fastv" else None
                    results[i].append((out, red))
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)
                barrier.abort()

        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i in (0, 1):
        for out, red in results[i]:
            torch.testing.assert_close(out, alone[i], atol=ATOL, rtol=0)
            if red is not None:
                assert [torch.equal(a.indices, b.indices) for (a, _), (b, _)
                        in zip(red, kept_alone[i], strict=True)] == [True] * len(red)


# 3. gradients -------------------------------------------------------------------------------------
def test_gradients_flow_through_kept_tokens():
    """fastervlm with autograd: the loss and the projector / tower gradients equal those of
    the untouched model on the hand-pruned sequence built from the features with autograd."""
    m = tiny_llava()
    rows, kw = batch()
    with tm.applied(m, "fastervlm", 8):
        out = m(**kw).logits
        kept = kept_indices(m)
    real = out.new_ones(out.shape[:2], dtype=torch.bool)
    out.pow(2).mean().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert any("vision_tower" in n for n in got) and any("projector" in n for n in got)
    m.zero_grad()
    feats = list(m.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output)
    emb = m.get_input_embeddings()
    seqs = []
    img = 0
    for r in rows:
        parts, i = [], 0
        while i < len(r):
            if r[i] == 60:
                parts.append(feats[img][kept[img]])
                img, i = img + 1, i + N
            else:
                parts.append(emb(torch.tensor([r[i]])))
                i += 1
        seqs.append(torch.cat(parts))
    t = max(len(s) for s in seqs)
    embeds = torch.stack([torch.cat([s.new_zeros(t - len(s), s.shape[1]), s]) for s in seqs])
    mask = torch.stack([torch.arange(t) >= t - len(s) for s in seqs]).long()
    ref = m(inputs_embeds=embeds, attention_mask=mask).logits
    assert real.shape == ref.shape[:2]
    ref.pow(2).mean().backward()
    for n, p in m.named_parameters():
        if n in got:
            torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4)


def test_merging_methods_refuse_a_call_that_needs_gradients():
    m = tiny_llava()
    _, kw = batch((0,))
    with tm.applied(m, "visionzip", 8):
        with pytest.raises(ValueError, match="no_grad"):
            m(**kw)
        with torch.no_grad():
            m(**kw)
        m.model.vision_tower.requires_grad_(False)
        m.model.multi_modal_projector.requires_grad_(False)
        m(**kw).logits.sum().backward()  # LLM gradients only: nothing is lost


def test_in_llm_cut_keeps_gradients():
    """fastv's cut gathers hidden states with autograd: gradients equal a keep-all run's
    where the cut keeps everything, and reach the projector when tokens are cut."""
    m = tiny_llava(text_layers=3)
    _, kw = batch((0,))
    with tm.applied(m, "fastv", N):
        m(**kw).logits.pow(2).mean().backward()
    cut_all = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m(**kw).logits.pow(2).mean().backward()
    plain = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert plain.keys() == cut_all.keys()
    for n, grad in plain.items():
        torch.testing.assert_close(cut_all[n], grad, atol=1e-6, rtol=1e-4)
    m.zero_grad()
    with tm.applied(m, "fastv", 5):
        m(**kw).logits.pow(2).mean().backward()
    grad = m.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and bool(grad.abs().sum() > 0)


# 5. masked holes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", [("fastervlm", {}), ("fastv", {}),
                                         ("fastervlm", {"llm": "fastv"})])
def test_masked_hole_is_refused(model, method, opts):
    _, kw = batch((0,))
    kw["attention_mask"][0, 2] = 0
    with torch.no_grad(), tm.applied(model, method, 10, **opts), \
            pytest.raises(ValueError, match="between real tokens"):
        model(**kw)


# required signals of the options ------------------------------------------------------------------
def test_options_that_switch_signals_are_checked_at_apply():
    from test_models_gemma3 import tiny_gemma3

    g = tiny_gemma3()
    ts.apply(g, "fopru", 4)  # attention received: Gemma 3 gives it
    ts.remove(g)
    with pytest.raises(ValueError, match="cls_attn"):
        ts.apply(g, "fopru", 4, score="cls_attn")
    assert not tm.is_applied(g)
