"""DyCoke's decoding stage (``dycoke-llm``): against a by-hand decoding of the untouched
model's layers on the whole sequence, where each generated token's row hides, from layer L
on, the visual tokens its step did not select (the official code gathers the selected
columns of the cache; the outputs are the same); batches, keep-all, the token-set function
and the stage under ``ts.apply(model, "dycoke")`` on a video model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from llm_refs import allowed, attention, eager_copy, record
from test_llm_stage import image_cols, inputs
from test_models_llava import tiny_llava

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.models._llm import find_text_model

GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=4)


@pytest.fixture(scope="module")
def eager(model):
    return eager_copy(model)


def official_select(attn: torch.Tensor, visible: int) -> list[int]:
    """The ``visible`` most attended positions (ascending; ties: the lower index)."""
    order = sorted(range(len(attn)), key=lambda j: (-float(attn[j]), j))
    return sorted(order[:visible])


@torch.no_grad()
def decode_by_hand(model, eager, kw, steps: int, layer: int, visible, threshold: float):
    """Greedy tokens and per-step decisions of DyCoke's stage 2 for one sample (batch 1).

    Every step re-runs the decoder layers by hand on the whole sequence: layers before
    ``layer`` causal; the new token's head-mean eager attention at ``layer - 1`` selects
    per image (if its cosine similarity to the previous step's row is below
    ``threshold``); from ``layer`` on each generated token's row hides what its own step
    did not select."""
    lm, elm = find_text_model(model), find_text_model(eager)
    rec = record(model, kw)
    cols = image_cols(kw["input_ids"])
    prev: list[torch.Tensor | None] = [None] * len(cols)
    hide: dict[int, torch.Tensor] = {}
    tokens, decisions = [int(rec.logits[0, -1].argmax())], []
    while len(tokens) < steps:
        h = torch.cat([rec.hidden, lm.embed_tokens(torch.tensor([tokens]))], dim=1)
        n = h.shape[1]
        pe = lm.rotary_emb(h, torch.arange(n)[None])
        causal = allowed(n, None, None)
        x = h
        for i in range(layer):
            if i == layer - 1:
                probs = attention(elm, i, x, pe, causal)[0, :, n - 1].mean(0)
            x = lm.layers[i](x, attention_mask=causal[None, None], position_embeddings=pe)
        step, hidden = [], []
        for k, c in enumerate(cols):
            a = probs[c]
            sim = 0.0 if prev[k] is None else float(F.cosine_similarity(a, prev[k], dim=0))
            prev[k] = a
            if sim >= threshold:
                step.append(None)
                continue
            kept = official_select(a, visible(len(c)))
            step.append(kept)
            hidden.append(c[[j for j in range(len(c)) if j not in kept]])
        decisions.append(step)
        if hidden:
            hide[n - 1] = torch.cat(hidden)
        ok = causal.clone()
        for r, hc in hide.items():
            ok[r, hc] = False
        for i in range(layer, len(lm.layers)):
            x = lm.layers[i](x, attention_mask=ok[None, None], position_embeddings=pe)
        tokens.append(int(model.lm_head(lm.norm(x))[0, -1].argmax()))
    return tokens, decisions


CASES = [({"layer": 2}, lambda n: int(n * 0.3), 0.9),                   # official rule
         ({"layer": 1, "similarity": 1.01}, lambda n: 10, 1.01)]         # every step, keep 10


@pytest.mark.parametrize("opts,visible,threshold", CASES)
@pytest.mark.parametrize("sample", [0, 1])
def test_decoding_matches_hand_reference(model, eager, opts, visible, threshold, sample):
    keep = 10 if "similarity" in opts else None
    kw = {k: v for k, v in inputs([sample]).items() if k != "attention_mask"}
    steps = 6
    want, decisions = decode_by_hand(model, eager, kw, steps, opts["layer"], visible,
                                     threshold)
    with torch.no_grad(), tm.applied(model, "dycoke-llm", keep, **opts):
        out = model.generate(**kw, max_new_tokens=steps, **GEN)
        got = tm.get_state(model).llm.last
    assert out[0, kw["input_ids"].shape[1]:].tolist() == want
    assert [[None if d is None else d.tolist() for d in step] for step in got] == decisions
    assert any(d is not None for step in decisions for d in step)
    if threshold < 1:
        assert decisions[0] == [d for d in decisions[0] if d is not None]  # step 1 prunes


def test_batch_equals_single_and_keep_all_equals_untouched(model):
    kw = inputs([0, 1, 2])
    gen = dict(max_new_tokens=5, **GEN)
    with torch.no_grad():
        ref = model.generate(**kw, output_scores=True, return_dict_in_generate=True, **gen)
        with tm.applied(model, "dycoke-llm", 1.0, layer=1):
            same = model.generate(**kw, output_scores=True, return_dict_in_generate=True, **gen)
        assert torch.equal(same.sequences, ref.sequences)
        assert all(torch.equal(a, b) for a, b in zip(same.scores, ref.scores, strict=True))
        with tm.applied(model, "dycoke-llm", 5, layer=1, similarity=1.01):
            batch = model.generate(**kw, output_scores=True, return_dict_in_generate=True,
                                   **gen)
            n = kw["input_ids"].shape[1]
            for s in range(3):
                alone = {k: v for k, v in inputs([s]).items() if k != "attention_mask"}
                one = model.generate(**alone, output_scores=True, return_dict_in_generate=True,
                                     **gen)
                assert batch.sequences[s, n:].tolist() == one.sequences[0, -5:].tolist()
                for a, b in zip(one.scores, batch.scores, strict=True):
                    torch.testing.assert_close(a[0], b[s], atol=2e-5, rtol=0)
    # pruning changed the later steps' logits (not the first: the prefill is whole)
    assert torch.equal(batch.scores[0], ref.scores[0])
    assert not torch.allclose(batch.scores[-1], ref.scores[-1], atol=1e-4)


def test_token_set_function_options_and_copies(model):
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 30, generator=g)
    attn[1, 5] = attn[1, 6]  # a tie: the lower index first
    x = torch.randn(2, 30, 8, generator=g)
    r = ts.reduce(x, "dycoke-llm", 7, query_attn=attn)
    for b in range(2):
        assert r.indices[b].tolist() == official_select(attn[b], 7)
        torch.testing.assert_close(r.tokens[b], x[b, r.indices[b]])
    for bad in ({"ratio": 1.5}, {"layer": 0}, {"similarity": "high"}):
        with pytest.raises(ValueError):
            ts.apply(model, "dycoke-llm", **bad)
    with pytest.raises(ValueError, match="layers"):
        ts.apply(model, "dycoke-llm", layer=9)
    fresh = tiny_llava(text_layers=4)  # pickled before any call adds transformers' hooks
    ts.apply(fresh, "dycoke-llm", 5, layer=1, similarity=1.01)
    pickled = pickle.loads(pickle.dumps(fresh))
    ts.apply(model, "dycoke-llm", 5, layer=1, similarity=1.01)
    try:
        twin = copy.deepcopy(model)
        kw = inputs([1])
        with torch.no_grad():
            a = model.generate(**kw, max_new_tokens=3, **GEN)
            b = twin.generate(**kw, max_new_tokens=3, **GEN)
            c = pickled.generate(**kw, max_new_tokens=3, **GEN)
        assert torch.equal(a, b) and torch.equal(a, c)
        assert len(tm.get_state(twin).llm.last) == 2  # the copy's own hooks ran
    finally:
        ts.remove(model)
    text = find_text_model(model)
    assert not text._forward_pre_hooks and not text._forward_hooks
    assert all(not lay._forward_pre_hooks and not lay.self_attn._forward_hooks
               for lay in text.layers)


def test_dycoke_runs_both_stages_on_a_video_model():
    from tokensieve.zoo.clips import clip_qa
    from tokensieve.zoo.video_api import answer_video, load_tiny_video_vlm

    model, processor = load_tiny_video_vlm()
    samples = clip_qa("test", 2)
    ts.apply(model, "dycoke", 0.5)
    try:
        state = tm.get_state(model)
        assert state.llm is not None and state.llm.spec.name == "dycoke-llm"
        answers = answer_video(model, processor, samples, batch_size=2, max_new_tokens=3)
        steps = state.llm.last
    finally:
        ts.remove(model)
    assert len(answers) == 2 and steps and all(len(s) == 2 for s in steps)
    ts.apply(model, "dycoke", 0.5, llm=None)
    try:
        assert tm.get_state(model).llm is None
    finally:
        ts.remove(model)
