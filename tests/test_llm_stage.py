"""In-LLM reduction (fastv, pdrop) on tiny random LLaVA, Qwen2-VL and Gemma 3 models.

References are built without the stage (tests/llm_refs.py): the untouched model's decoder
layers run by hand on the hand-cut sequence, scores from eager attention weights.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from llm_refs import by_hand, eager_copy, record
from model_checks import interleave, pad_rows
from model_refs import _cache_name
from test_models_llava import tiny_llava

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.core.budget import resolve_keep
from tokensieve.models._llm import find_text_model

IMG = 60
N = 49
ATOL = 2e-5
TEXTS = [[[1, 5, 6], [7, 8, 9]], [[1, 11], [12], [13, 14, 15]], [[1, 16, 17, 18, 19]]]
ROWS = [interleave(t, [[IMG] * N] * (len(t) - 1)) for t in TEXTS]
FIRST = [0, 1, 3]


def images(numbers):
    return torch.stack([torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(10 + i))
                        for i in numbers])


def inputs(samples, side="left"):
    ids, mask = pad_rows([ROWS[s] for s in samples], side)
    kw = dict(input_ids=ids, attention_mask=mask)
    numbers = [FIRST[s] + j for s in samples for j in range(len(TEXTS[s]) - 1)]
    if numbers:
        kw["pixel_values"] = images(numbers)
    return kw


@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=4)


@pytest.fixture(scope="module")
def eager(model):
    return eager_copy(model)


def image_cols(ids):
    cols = torch.nonzero(ids[0] == IMG).squeeze(1)
    runs = torch.nonzero(torch.diff(cols) > 1).squeeze(1) + 1
    return list(torch.tensor_split(cols, runs.tolist()))


def stage_kept(model):
    return [[k.clone() for k in cut.kept] for cut in tm.get_state(model).llm.last]


CASES = [("fastv", dict(keep=10), [2], "previous", "keep"),
         ("fastv", dict(keep=0.3, layer=1, positions="renumber"), [1], "previous", "renumber"),
         ("pdrop", dict(), [1, 2, 3], "own", "renumber"),
         ("pdrop", dict(keep=30, layers=(1, 3), positions="keep"), [1, 3], "own", "keep")]


@pytest.mark.parametrize("method,opts,cuts,scores,positions", CASES)
@pytest.mark.parametrize("sample", [0, 1])
def test_matches_hand_reference(model, eager, method, opts, cuts, scores, positions, sample):
    kw = inputs([sample])
    rec = record(model, kw)
    opts = dict(opts)
    keep = opts.pop("keep", None)
    cfg = ts.describe(method).make_config(opts)
    counts = [cfg.counts(N, keep, 4)] * 2
    counts = [[counts[0][c]] * 2 for c in range(len(cuts))]
    with torch.no_grad(), tm.applied(model, method, keep, **opts):
        out = model(**kw).logits
        kept = stage_kept(model)
    ref, ref_kept = by_hand(model, eager, rec, image_cols(kw["input_ids"]), cuts, counts,
                            scores, positions)
    assert [[k.tolist() for k in c] for c in kept] == [[k.tolist() for k in c] for c in ref_kept]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert not torch.allclose(out, rec.logits, atol=1e-3)  # the cut changed something


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_keep_all_equals_untouched(model, method):
    kw = inputs([0, 1, 2])
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, method, 1.0):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method,keep", [("fastv", 7), ("pdrop", 30)])
def test_padded_batch_equals_single_samples(model, method, keep, side):
    kw = inputs([0, 1, 2], side)
    with torch.no_grad(), tm.applied(model, method, keep):
        batch = model(**kw).logits
        for s in range(3):
            alone = model(**inputs([s])).logits[0]
            real = kw["attention_mask"][s].bool()
            torch.testing.assert_close(batch[s, real], alone, atol=ATOL, rtol=0)


def greedy_by_hand(model, eager, sample, steps, cuts, counts, scores, positions):
    kw = inputs([sample])
    ids = kw["input_ids"]
    t = ids.shape[1]
    cols = image_cols(ids)
    fixed, new = None, []
    for _ in range(steps):
        step_kw = dict(kw, input_ids=torch.cat([ids, torch.tensor([new], dtype=torch.long)
                                                .reshape(1, -1)], 1))
        step_kw["attention_mask"] = torch.ones_like(step_kw["input_ids"])
        rec = record(model, step_kw)
        logits, kept = by_hand(model, eager, rec, cols, cuts, counts, scores, positions,
                               prompt_len=t, fixed=fixed)
        fixed = kept if fixed is None else fixed
        new.append(int(logits[0, -1].argmax()))
    return new


@pytest.mark.parametrize("method,opts,cuts,scores,positions", CASES[:3])
def test_generate_with_cache_matches_hand_reference(model, eager, method, opts, cuts, scores,
                                                    positions):
    opts = dict(opts)
    keep = opts.pop("keep", None)
    cfg = ts.describe(method).make_config(opts)
    counts = [[c] * 2 for c in cfg.counts(N, keep, 4)]
    kw = inputs([0, 1, 2])
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    scored = dict(gen, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), tm.applied(model, method, keep, **opts):
        res = model.generate(**kw, **scored)
        out = res.sequences[:, kw["input_ids"].shape[1]:]
        # one sample without an attention mask: decoding builds the mask of its new columns
        alone = {k: v for k, v in inputs([1]).items() if k != "attention_mask"}
        res_alone = model.generate(**alone, **scored)
    for s in (0, 1):
        ref = greedy_by_hand(model, eager, s, 4, cuts, counts, scores, positions)
        assert out[s].tolist() == ref
    for step, logits in enumerate(res_alone.scores):
        torch.testing.assert_close(logits[0], res.scores[step][1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", [dict(num_beams=3), dict(do_sample=True, top_k=5)])
def test_beams_and_sampling_keep_all_equal_untouched(model, mode):
    kw = inputs([0, 1, 2])
    gen = dict(max_new_tokens=5, pad_token_id=0, eos_token_id=None, **mode)
    with torch.no_grad():
        torch.manual_seed(3)
        ref = model.generate(**kw, **gen)
        with tm.applied(model, "fastv", 1.0):
            torch.manual_seed(3)
            out = model.generate(**kw, **gen)
            with_cut = model.generate(**kw, **dict(gen, max_new_tokens=5))
    assert torch.equal(out, ref)
    assert with_cut.shape == ref.shape


def test_continuing_a_cut_cache_matches_hand_reference(model, eager):
    """Prefill with a cache, then feed two more tokens on that cache (the chat pattern):
    equals the by-hand run of the whole sequence with the prefill's kept set."""
    kw = inputs([1])
    more = torch.tensor([[21, 22]])
    t = kw["input_ids"].shape[1]
    mask = torch.ones(1, t + 2, dtype=torch.long)
    with torch.no_grad(), tm.applied(model, "fastv", 9):
        first = model(**kw, use_cache=True)
        kept = stage_kept(model)
        cache = {_cache_name(model): getattr(first, "cache", None) or first.past_key_values}
        nxt = model(input_ids=more, attention_mask=mask, use_cache=True, **cache)
        with pytest.raises(ValueError, match="whole sequence"):
            model(input_ids=more, attention_mask=mask[:, :2], **cache)
    whole = dict(kw, input_ids=torch.cat([kw["input_ids"], more], 1), attention_mask=mask)
    ref, _ = by_hand(model, eager, record(model, whole), image_cols(kw["input_ids"]), [2],
                     None, "previous", "keep", prompt_len=t, fixed=kept)
    torch.testing.assert_close(nxt.logits, ref[:, t:], atol=ATOL, rtol=0)


def test_remove_restores_exactly(model):
    kw = inputs([0, 1, 2])
    lm = find_text_model(model)
    modules = list(lm.modules())
    before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    with torch.no_grad():
        ref = model(**kw).logits
        ts.apply(model, "pdrop")
        assert model(**kw).logits.shape == ref.shape
        ts.remove(model)
        out = model(**kw).logits
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == before
    assert torch.equal(out, ref)
    assert "_tokensieve" not in model.__dict__


def test_labels_and_hidden_states(model):
    kw = inputs([0, 1], "right")
    labels = kw["input_ids"].masked_fill(kw["input_ids"] == IMG, -100).masked_fill(
        kw["attention_mask"] == 0, -100)
    with torch.no_grad(), tm.applied(model, "fastv", 5):
        out = model(**kw, labels=labels, output_hidden_states=True)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    lengths = [h.shape[1] for h in out.hidden_states]
    assert lengths[0] == kw["input_ids"].shape[1] and min(lengths[3:-1]) < lengths[0]


def test_errors(model):
    with pytest.raises(ValueError, match="layer=9"):
        ts.apply(model, "fastv", 5, layer=9)
    with pytest.raises(ValueError, match="positions"):
        ts.apply(model, "fastv", 5, positions="shift")
    with pytest.raises(ValueError, match="signal_layers"):
        ts.apply(model, "fastv", 5, signal_layers=(0,))
    with pytest.raises(ValueError, match="keep=None"):
        ts.apply(model, "divprune")
    assert not tm.is_applied(model)
    with tm.applied(model, "pdrop", 3, layers=(3,)), pytest.raises(ValueError, match="average"):
        model(**inputs([0]))


# -- other families ----------------------------------------------------------------------------
def _gemma(layers):
    from test_models_gemma3 import tiny_gemma3

    return tiny_gemma3(text_layers=layers, layer_types=["sliding_attention", "full_attention",
                                                          "sliding_attention", "sliding_attention"],
                       sliding_window=6)


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def family(request):
    if request.param == "qwen2":
        import test_models_qwen_vl as q

        model = q.tiny_qwen("qwen2", text_layers=4)
        return request.param, model, q.inputs, q.IMG
    import test_models_gemma3 as g

    return request.param, _gemma(4), g.inputs, g.IMG


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_other_families_keep_all_equals_untouched(family, method):
    _, model, make, _ = family
    kw = make(model, [0, 1, 2])
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, method, 1.0):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_other_families_batch_equals_single(family, side):
    _, model, make, _ = family
    kw = make(model, [0, 1, 2], side)
    with torch.no_grad(), tm.applied(model, "fastv", 0.5):
        batch = model(**kw).logits
        for s in range(3):
            alone = model(**make(model, [s])).logits[0]
            real = kw["attention_mask"][s].bool()
            torch.testing.assert_close(batch[s, real], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_other_families_match_hand_reference(family, positions):
    """Qwen2-VL: kept tokens keep their M-RoPE (t, h, w) position embeddings (renumbering
    does not apply). Gemma 3: sliding windows count the kept tokens, kept image tokens
    still attend bidirectionally within their image."""
    name, model, make, img = family
    kw = make(model, [1])
    ids = kw["input_ids"]
    rec = record(model, kw)
    cols = torch.nonzero(ids[0] == img).squeeze(1)
    runs = torch.nonzero(torch.diff(cols) > 1).squeeze(1) + 1
    cols = list(torch.tensor_split(cols, runs.tolist()))
    blocks = None
    if name == "gemma3":
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        blocks = get_block_sequence_ids_for_mask(kw["token_type_ids"])[0]
    with torch.no_grad(), tm.applied(model, "fastv", 0.5, positions=positions):
        out = model(**kw).logits
    counts = [[resolve_keep(0.5, c.numel()) for c in cols]]
    ref, _ = by_hand(model, eager_copy(model), rec, cols, [2], counts, "previous",
                     "keep" if name == "qwen2" else positions, blocks=blocks)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_other_families_generate(family):
    """Generation with the KV cache: keep-all equals the untouched model; a cut generates
    the same tokens in a padded batch as alone."""
    _, model, make, _ = family
    kw = make(model, [0, 1, 2])
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(**kw, **gen)
        with tm.applied(model, "fastv", 1.0):
            same = model.generate(**kw, **gen)
        with tm.applied(model, "pdrop"):
            batch = model.generate(**kw, **gen)[:, -4:]
            alone = [model.generate(**make(model, [s]), **gen)[0, -4:] for s in range(3)]
    assert torch.equal(same, ref)
    assert torch.equal(batch, torch.stack(alone))


# -- pipelines ---------------------------------------------------------------------------------
def test_pre_llm_then_in_llm_matches_hand_reference(model, eager):
    """fastervlm before the LLM, then fastv inside it: equals the by-hand cut of the
    sequence the pre-LLM step gives the LLM."""
    kw = inputs([1])
    with torch.no_grad():
        with tm.applied(model, "fastervlm", 20):
            rec = record(model, kw)
            short_ids = tm.get_state(model).last_plan.take(kw["input_ids"], 0)
        step = ts.ReduceConfig("fastv", 8, {"layer": 2})
        with tm.applied(model, "fastervlm", 20, llm=step):
            out = model(**kw).logits
            described = tm.get_state(model).to_dict()
    ref, _ = by_hand(model, eager, rec, image_cols(short_ids), [2], [[8, 8]], "previous", "keep")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert described["llm"] == {"method": "fastv", "keep": 8, "options": {"layer": 2},
                                "seed": 0, "stage": "llm"}
    batch = inputs([0, 1, 2])
    with torch.no_grad(), tm.applied(model, "fastervlm", 20, llm="pdrop"):
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        alone = model.generate(**inputs([1]), max_new_tokens=3, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    assert gen.shape == (3, batch["input_ids"].shape[1] + 3)
    assert torch.equal(gen[1, -3:], alone[0, -3:])
    with pytest.raises(ValueError, match="in-LLM method"):
        ts.apply(model, "fastervlm", 20, llm="divprune")
    with pytest.raises(ValueError, match="pipeline"):
        ts.apply(model, "fastv", 20, llm="pdrop")
    assert not tm.is_applied(model)


# -- every family: their two-layer tiny models, cut before layer 1 --------------------------------
FAMILY_BUILDERS = {
    "llava_next": ("test_models_llava_next", lambda m: m.tiny_next()),
    "llava_onevision": ("test_models_llava_onevision", lambda m: m.tiny_onevision()),
    "idefics3": ("test_models_idefics3", lambda m: m.tiny("idefics3")),
    "smolvlm": ("test_models_idefics3", lambda m: m.tiny("smolvlm")),
    "qwen2.5": ("test_models_qwen_vl", lambda m: m.tiny_qwen("qwen2.5")),
}


@pytest.mark.parametrize("name", sorted(FAMILY_BUILDERS))
def test_every_family_keep_all_batch_and_generate(name):
    import importlib

    module_name, build = FAMILY_BUILDERS[name]
    mod = importlib.import_module(module_name)
    model = build(mod)
    n = mod.CASE.samples
    kw = mod.inputs(model, list(range(n)))
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model(**kw).logits
        ref_gen = model.generate(**kw, **gen)
        with tm.applied(model, "fastv", 1.0, layer=1):
            torch.testing.assert_close(model(**kw).logits, ref, atol=ATOL, rtol=0)
            assert torch.equal(model.generate(**kw, **gen), ref_gen)
        with tm.applied(model, "fastv", 0.5, layer=1):
            batch = model(**kw).logits
            batch_gen = model.generate(**kw, **gen)[:, -3:]
            for s in range(n):
                alone_kw = mod.inputs(model, [s])
                alone = model(**alone_kw).logits[0]
                real = kw["attention_mask"][s].bool()
                torch.testing.assert_close(batch[s, real], alone, atol=ATOL, rtol=0)
                assert torch.equal(batch_gen[s], model.generate(**alone_kw, **gen)[0, -3:])
            kept = tm.get_state(model).llm.last
        assert kept and all(k.numel() > 0 for k in kept[0].kept)
        assert not torch.allclose(batch, ref, atol=1e-4)


# -- DART at its official place ------------------------------------------------------------------
@torch.no_grad()
def dart_reference_kept(model, kw, cols, keep, layer=2):
    """DART's kept indices from the untouched model's states: keys of layer K-1 (k_proj of
    its normed input, rotary embedding, heads expanded side by side), pivots and
    duplication by the token-set ``dart`` on the final-norm-normed input of layer K."""
    lm = find_text_model(model)
    seen = {}

    def grab(i):
        def pre(module, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"], kwargs)
        return pre

    hs = [lm.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True)
          for i in (layer - 1, layer)]
    model(**kw)
    for h in hs:
        h.remove()
    h_prev, kw_prev = seen[layer - 1]
    attn = lm.layers[layer - 1].self_attn
    k = attn.k_proj(lm.layers[layer - 1].input_layernorm(h_prev))
    k = k.view(1, -1, attn.config.num_key_value_heads, attn.head_dim).transpose(1, 2)
    cos, sin = kw_prev["position_embeddings"]
    rot = torch.cat([-k[..., attn.head_dim // 2:], k[..., : attn.head_dim // 2]], dim=-1)
    k = k * cos.unsqueeze(1) + rot * sin.unsqueeze(1)
    k = k.repeat_interleave(attn.config.num_attention_heads // k.shape[1], dim=1)
    keys = k.transpose(1, 2).flatten(2)[0]
    normed = lm.norm(seen[layer][0])[0]
    ids = kw["input_ids"][0]
    kept = []
    for c in cols:
        after = torch.arange(len(ids)) > c.max()
        after &= ids != IMG
        r = ts.reduce(normed[c][None], "dart", keep, keys=keys[c][None],
                      text=normed[after][None], text_keys=keys[after][None])
        kept.append(r.indices[0] if r.mask is None else r.indices[0][r.mask[0]])
    return kept


@pytest.mark.parametrize("sample", [0, 1])
def test_dart_in_llm_matches_reference(model, eager, sample):
    kw = inputs([sample])
    cols = image_cols(kw["input_ids"])
    ref_kept = dart_reference_kept(model, kw, cols, 21)
    rec = record(model, kw)
    with torch.no_grad(), tm.applied(model, "dart", 21):
        out = model(**kw).logits
        kept = stage_kept(model)
    assert [k.tolist() for k in kept[0]] == [k.tolist() for k in ref_kept]
    ref, _ = by_hand(model, eager, rec, cols, [2], None, "previous", "keep",
                     fixed=[ref_kept])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    budget = 4 + round(N * (1 - 0.778))  # the official budget: 4 + 128 of 576
    official = dart_reference_kept(model, kw, cols, budget)
    with torch.no_grad(), tm.applied(model, "dart"):
        model(**kw)
        assert tm.get_state(model).llm.schedule.counts(N, None, 4) == [budget]
        assert [k.tolist() for k in stage_kept(model)[0]] == [k.tolist() for k in official]


# -- merging methods inside the LLM ----------------------------------------------------------------
@pytest.fixture
def merge_method(monkeypatch):
    """A merging in-LLM method for the stage's plumbing: the top-k tokens by query_attn
    (ascending), then one token averaging all the others, standing for the first of them."""
    from dataclasses import dataclass

    from tokensieve.core import registry
    from tokensieve.core.reduction import Reduction
    from tokensieve.methods.fastv import FastVConfig

    @dataclass(frozen=True)
    class MergeConfig(FastVConfig):
        pass

    def fn(tokens, k, signals, config, generator):
        order = torch.sort(signals.query_attn, dim=1, descending=True, stable=True).indices
        top = order[:, :k].sort(dim=1).values
        rest = order[:, k:].sort(dim=1).values
        kept = torch.gather(tokens, 1, top[..., None].expand(-1, -1, tokens.shape[-1]))
        avg = torch.gather(tokens, 1, rest[..., None].expand(-1, -1, tokens.shape[-1]))
        out = torch.cat([kept, avg.mean(1, keepdim=True)], 1)
        return Reduction(tokens=out, indices=top, positions=torch.cat([top, rest[:, :1]], 1))

    registry._load_builtin_methods()
    monkeypatch.setitem(registry._REGISTRY, "test-merge", registry.MethodSpec(
        name="test-merge", fn=fn, paper="test", stage="llm", kind="subset+merge",
        signals=("query_attn",), config=MergeConfig))
    return "test-merge"


@torch.no_grad()
def merged_by_hand(model, eager, rec, cols, keep, layer=2):
    """The untouched layers by hand: at ``layer`` each image becomes [top-k by the last
    token's attention at layer-1 (column order), the mean of the rest], positions kept
    (the merged token takes its first source's), causal mask over the new order."""
    from llm_refs import attention

    lm, elm = find_text_model(model), find_text_model(eager)
    h = rec.hidden
    t = h.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(layer):
        w = attention(elm, i, h, rec.pos_emb[i], causal)
        h = lm.layers[i](h, attention_mask=causal[None, None], position_embeddings=rec.pos_emb[i])
    score = w[0, :, -1].mean(0)
    parts, src, full = [], [], h.clone()
    start = 0
    for c in cols:
        parts.append(h[:, start:int(c[0])])
        src += list(range(start, int(c[0])))
        order = torch.sort(score[c], descending=True, stable=True).indices
        top, rest = order[:keep].sort().values, order[keep:].sort().values
        parts += [h[:, c[top]], h[:, c[rest]].mean(1, keepdim=True)]
        src += c[top].tolist() + [int(c[rest[0]])]
        start = int(c[-1]) + 1
    parts.append(h[:, start:])
    src += list(range(start, t))
    h, src = torch.cat(parts, 1), torch.tensor(src)
    causal = torch.ones(len(src), len(src), dtype=torch.bool).tril()
    for i in range(layer, len(lm.layers)):
        cos, sin = rec.pos_emb[i]
        h = lm.layers[i](h, attention_mask=causal[None, None],
                         position_embeddings=(cos[:, src], sin[:, src]))
    full[:, src] = h
    return model.lm_head(lm.norm(full))


@pytest.mark.parametrize("sample", [0, 1])
def test_merging_method_in_llm_matches_hand_reference(model, eager, merge_method, sample):
    kw = inputs([sample])
    rec = record(model, kw)
    with torch.no_grad(), tm.applied(model, merge_method, 6):
        out = model(**kw).logits
        kept = stage_kept(model)
    ref = merged_by_hand(model, eager, rec, image_cols(kw["input_ids"]), 6)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert all(len(k) == 7 for k in kept[0])
    with torch.no_grad(), tm.applied(model, merge_method, 6):  # batched, left and right padded
        for side in ("left", "right"):
            batch = inputs([0, 1, 2], side)
            logits = model(**batch).logits
            alone = model(**inputs([sample])).logits[0]
            torch.testing.assert_close(logits[sample, batch["attention_mask"][sample].bool()],
                                       alone, atol=ATOL, rtol=0)


def test_image_query_rows_match_hand_reference(model, eager, monkeypatch):
    """query="image": each image's own tokens are the query rows (attention received from
    the image itself), [1, N, N] per image."""
    from dataclasses import dataclass

    from tokensieve.core import registry
    from tokensieve.core.ops import select, topk_indices
    from tokensieve.methods.fastv import FastVConfig

    @dataclass(frozen=True)
    class ImageRowsConfig(FastVConfig):
        query: ClassVar[str] = "image"

    def fn(tokens, k, signals, config, generator):
        assert signals.query_attn.shape == (1, tokens.shape[1], tokens.shape[1])
        return select(tokens, topk_indices(signals.query_attn.mean(1), k))

    registry._load_builtin_methods()
    monkeypatch.setitem(registry._REGISTRY, "test-image-rows", registry.MethodSpec(
        name="test-image-rows", fn=fn, paper="test", stage="llm", kind="subset",
        signals=("query_attn",), config=ImageRowsConfig))
    kw = inputs([1])
    rec = record(model, kw)
    with torch.no_grad(), tm.applied(model, "test-image-rows", 8):
        out = model(**kw).logits
        kept = stage_kept(model)
    ref, ref_kept = by_hand(model, eager, rec, image_cols(kw["input_ids"]), [2], [[8, 8]],
                            "previous", "keep", query="image")
    assert [k.tolist() for k in kept[0]] == [k.tolist() for k in ref_kept[0]]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_a_stage_can_drop_an_image_whole(model, eager, monkeypatch):
    """A count of 0 removes the image from the cut layer on (the method is not called)."""
    from dataclasses import dataclass

    from tokensieve.core import registry
    from tokensieve.methods.pdrop import PDropConfig

    @dataclass(frozen=True)
    class DropAllConfig(PDropConfig):
        def counts(self, n, keep, depth):
            return [0]

    def fn(tokens, k, signals, config, generator):
        raise AssertionError("not called for a count of 0")

    registry._load_builtin_methods()
    monkeypatch.setitem(registry._REGISTRY, "test-drop-all", registry.MethodSpec(
        name="test-drop-all", fn=fn, paper="test", stage="llm", kind="subset",
        signals=("query_attn",), config=DropAllConfig))
    kw = inputs([1])
    rec = record(model, kw)
    with torch.no_grad(), tm.applied(model, "test-drop-all", layers=(2,), positions="keep"):
        out = model(**kw).logits
    ref, _ = by_hand(model, eager, rec, image_cols(kw["input_ids"]), [2], None, "own", "keep",
                     fixed=[[torch.zeros(0, dtype=torch.long)] * 2])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
