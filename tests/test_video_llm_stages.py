"""holitom-llm and prunevid-llm (the in-LLM stages of HoliTom and PruneVid) against
re-statements of the official selections, against by-hand references on tiny random LLaVA
and Qwen2-VL models (the video run cut like an image), and the two-stage pipelines
``apply(model, "holitom" / "prunevid", keep)`` on a Qwen2-VL video prompt; ``fastv`` cutting
a video run like the hand reference of tests/llm_refs.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from llm_refs import allowed, attention, by_hand, eager_copy, record
from test_llm_stage import ATOL, image_cols, inputs
from test_models_llava import tiny_llava
from test_models_qwen_vl import IMG as QIMG
from test_models_qwen_vl import VID, tiny_qwen
from test_models_video import qwen_inputs

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.core.budget import resolve_keep
from tokensieve.core.schedule import AS_RUN, ScoreForm
from tokensieve.methods._temporal import FLOOR, apportion
from tokensieve.models._llm import find_text_model

# -- re-statements of the official selections ----------------------------------------------


def official_holitom(hidden: torch.Tensor, last_row: torch.Tensor, ratio: float = 0.5,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One visual block of ``Qwen2Model_holitom.forward`` at ``layer_idx == HOLITOM_k``,
    re-stated on plain tensors: ``hidden`` [N, D] the block's states at the layer input,
    ``last_row`` [N] the head-mean attention of the last token (layer K-1). Returns the kept
    indices (ascending) and their states after the in-place pairwise merges."""
    h = hidden.clone()
    n = h.shape[0]
    top = last_row.topk(round(n * (1 - ratio))).indices  # score order, as the official
    rest = torch.arange(n)[~torch.isin(torch.arange(n), top)]  # ascending
    a, b = h[rest], h[top]
    sim = (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).T)
    best = sim.max(dim=-1).indices
    for i, src in enumerate(rest.tolist()):
        t = int(top[best[i]])
        h[t] = (h[t] + h[src]) / 2
    kept = top.sort().values
    return kept, h[kept]


def official_prunevid(attn: torch.Tensor, alpha: float = 0.4) -> torch.Tensor:
    """``VTPWindowCache.process_attention`` with the visual block as one group: ``attn``
    [H, R, N] (text rows after the block -> block columns), the max over heads then over
    rows, the top ``int(N * alpha)``; returned ascending (the official sorts the kept
    columns before gathering)."""
    score = attn.max(dim=0).values.max(dim=0).values
    return score.topk(int(attn.shape[-1] * alpha)).indices.sort().values


@pytest.mark.parametrize("n", [7, 16, 49, 50])
def test_holitom_llm_matches_official_merge(n):
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(1, n, 12, generator=g)
    row = torch.rand(1, n, generator=g).softmax(-1)
    k = ts.describe("holitom-llm").make_config({}).counts(n, None, 28)[0]
    assert k == round(n * 0.5)
    r = ts.reduce(hidden, "holitom-llm", k, query_attn=row)
    kept, states = official_holitom(hidden[0], row[0])
    assert r.indices[0].tolist() == kept.tolist() and torch.equal(r.positions, r.indices)
    torch.testing.assert_close(r.tokens[0], states, atol=1e-6, rtol=1e-5)
    assert int(r.sizes.sum()) == n
    # The corrected variant: the mean of the kept token and the tokens merged into it.
    mean = ts.reduce(hidden, "holitom-llm", k, query_attn=row, merge="mean")
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[kept] = False
    cos = torch.nn.functional.cosine_similarity(hidden[0, dropped, None], hidden[0, None, kept],
                                                dim=-1)
    target = cos.argmax(dim=1)
    for j, t in enumerate(kept.tolist()):
        group = torch.cat([hidden[0, t:t + 1], hidden[0, dropped][target == j]])
        torch.testing.assert_close(mean.tokens[0, j], group.mean(0), atol=1e-6, rtol=1e-5)
    # Keeping every token changes nothing.
    assert torch.equal(ts.reduce(hidden, "holitom-llm", n, query_attn=row).tokens, hidden)


def official_prunevid_windows(score: torch.Tensor, static_sizes: list[int],
                              dynamic_sizes: list[int], window_sizes: list[int],
                              alpha: float = 0.4) -> list[int]:
    """``VTPWindowCache.process_attention`` on the official layout (per window: its static
    tokens, then its frames' dynamic tokens frame after frame) from the reduced scores
    ``[N]``: the top ``int(static * alpha)`` static tokens and, per frame, the top
    ``int(per_frame * alpha)`` dynamic ones; the kept columns as a sorted list."""
    kept, start = [], 0
    for static, dynamic, window in zip(static_sizes, dynamic_sizes, window_sizes, strict=True):
        part = score[start:start + static + dynamic]
        kept += (part[:static].topk(int(static * alpha)).indices + start).tolist()
        frames = part[static:].view(window, -1)
        top = frames.topk(int(frames.shape[-1] * alpha), dim=-1).indices
        for f in range(window):
            kept += (top[f] + start + static + f * frames.shape[-1]).tolist()
        start += static + dynamic
    return sorted(kept)


def _window_groups(static_sizes, dynamic_sizes, window_sizes) -> torch.Tensor:
    ids, g = [], 0
    for static, dynamic, window in zip(static_sizes, dynamic_sizes, window_sizes, strict=True):
        ids += [g] * static
        g += 1
        for _ in range(window):
            ids += [g] * (dynamic // window)
            g += 1
    return torch.tensor(ids)


@pytest.mark.parametrize("layout", [([30, 12], [40, 60], [2, 3]), ([7], [96], [4]),
                                    ([0, 25, 9], [36, 24, 50], [3, 2, 5])])
def test_prunevid_llm_groups_match_official_windows(layout):
    """With PruneVid's groups, the selection is the official per-window, per-frame one
    (the group ids scrambled: a group is a set of columns, not a block)."""
    static, dynamic, window = layout
    ids = _window_groups(static, dynamic, window)
    n = ids.numel()
    g = torch.Generator().manual_seed(n)
    attn = torch.rand(1, 4, n, generator=g).softmax(-1)
    x = torch.randn(1, n, 8, generator=g)
    relabel = torch.randperm(int(ids.max()) + 1, generator=g)
    k = int(n * 0.4)
    r = ts.reduce(x, "prunevid-llm", k, query_attn=attn, groups=relabel[ids][None])
    want = official_prunevid_windows(attn[0].max(dim=0).values, static, dynamic, window)
    assert r.indices[0].tolist() == want


def test_prunevid_llm_groups_share_an_explicit_count_and_pad_a_batch():
    ids = _window_groups([12, 5], [30, 16], [3, 2])
    n = ids.numel()
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(2, n, generator=g)
    x = torch.randn(2, n, 8, generator=g)
    groups = torch.stack([ids, torch.zeros_like(ids)])   # row 1: one group
    r = ts.reduce(x, "prunevid-llm", 20, query_attn=attn, groups=groups)
    assert r.mask is None and r.indices.shape == (2, 20)  # an explicit count: exactly 20
    sizes = torch.bincount(ids).tolist()
    counts = torch.bincount(ids[r.indices[0]], minlength=len(sizes)).tolist()
    assert counts == apportion(sizes, 20, [FLOOR] * len(sizes))
    for grp, c in enumerate(counts):                         # each group's top scores
        members = torch.nonzero(ids == grp).squeeze(1)
        top = members[attn[0, members].topk(c).indices] if c else members[:0]
        assert sorted(top.tolist()) == sorted(r.indices[0][ids[r.indices[0]] == grp].tolist())
    assert r.indices[1].tolist() == attn[1].topk(20).indices.sort().values.tolist()
    k = int(n * 0.4)                                         # the official floors: rows differ
    r = ts.reduce(x, "prunevid-llm", k, query_attn=attn, groups=groups)
    real = r.mask.sum(dim=1).tolist()
    assert real == [sum(int(s * 0.4) for s in sizes), k]
    with pytest.raises(ValueError, match="groups"):
        ts.reduce(x, "prunevid-llm", k, query_attn=attn, groups=groups.float())
    with pytest.raises(ValueError, match="groups"):
        ts.reduce(x, "prunevid-llm", k, query_attn=attn, groups=groups - 2)


@pytest.mark.parametrize("n,rows", [(20, 3), (49, 6), (144, 1)])
def test_prunevid_llm_matches_official_selection(n, rows):
    g = torch.Generator().manual_seed(n + rows)
    attn = torch.rand(1, rows, n, generator=g).softmax(-1)  # one head: head-mean = head-max
    k = ts.describe("prunevid-llm").make_config({}).counts(n, None, 32)[0]
    assert k == int(n * 0.4)
    x = torch.randn(1, n, 8, generator=g)
    padded = torch.cat([attn, torch.zeros(1, 2, n)], dim=1)  # all-zero rows: padding
    r = ts.reduce(x, "prunevid-llm", k, query_attn=padded)
    assert r.indices[0].tolist() == official_prunevid(attn).tolist()
    torch.testing.assert_close(r.tokens, x[:, r.indices[0]])


def test_schedules_and_pipelines():
    holi = ts.describe("holitom-llm").make_config({})
    assert holi.cut_layers(28) == (18,)  # HOLITOM_k=18 of Qwen2-7B's 28 layers
    assert holi.cut_layers(4) == (3,)
    assert holi.counts(301, None, 28) == [150]  # round(150.5): Python rounding
    assert holi.counts(300, 0.25, 28) == [75]
    assert ts.describe("holitom-llm").make_config({"layer": 2}).cut_layers(4) == (2,)
    prune = ts.describe("prunevid-llm").make_config({})
    assert prune.cut_layers(32) == (11,)  # selected_layer=10 scores, 11 sees the kept set
    assert prune.cut_layers(4) == (1,)
    assert prune.counts(49, None, 32) == [19] and prune.counts(49, 10, 32) == [10]
    assert ts.describe("holitom").llm_stage == "holitom-llm"
    assert ts.describe("prunevid").llm_stage == "prunevid-llm"
    with pytest.raises(ValueError, match="layer"):
        ts.describe("holitom-llm").make_config({"layer": 5}).cut_layers(4)
    with pytest.raises(ValueError, match="alpha"):
        ts.describe("prunevid-llm").make_config({"alpha": 1.5})
    assert prune.score_form == ScoreForm(rotary=False, causal=False, heads="max")
    assert ts.describe("prunevid-llm").make_config({"attention": "as-run"}).score_form == AS_RUN
    with pytest.raises(ValueError, match="attention"):
        ts.describe("prunevid-llm").make_config({"attention": "eager"})
    with pytest.raises(ValueError, match="merge"):
        ts.describe("holitom-llm").make_config({"merge": "sum"})


# -- by-hand references in tiny models -------------------------------------------------------

Choose = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]],
                  tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def one_cut_by_hand(model, eager, kw: dict, layer: int, cols: list[torch.Tensor],
                    choose: Choose, official_scores: bool = False,
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of one sample (batch 1, no padding) cut by hand before decoder ``layer``:
    the untouched layers run by hand up to it, ``choose(h [T, D], attn [T, T], cols)``
    (``attn``: layer-1's eager attention, head-mean) gives the kept columns (ascending)
    and their states; the later layers run on those with the kept columns' position
    embeddings (original positions; M-RoPE (t, h, w) for Qwen) and a causal mask; every
    column cut keeps its state at the cut. Also the kept indices per visual run.

    ``official_scores``: ``attn`` is PruneVid's official score instead: the same eager
    attention with the identity rotation (cos 1, sin 0) and no mask at all (every key),
    maximum over heads."""
    rec = record(model, kw)
    lm, elm = find_text_model(model), find_text_model(eager)
    h = rec.hidden
    t = h.shape[1]
    ok = allowed(t, None, None)
    for i in range(layer):
        before = h
        h = lm.layers[i](h, attention_mask=ok[None, None], position_embeddings=rec.pos_emb[i])
    if official_scores:
        cos, sin = rec.pos_emb[layer - 1]
        identity = (torch.ones_like(cos), torch.zeros_like(sin))
        attn = attention(elm, layer - 1, before, identity, torch.ones_like(ok))[0].amax(0)
    else:
        attn = attention(elm, layer - 1, before, rec.pos_emb[layer - 1], ok)[0].mean(0)
    full = h.clone()
    keep, states = choose(h[0], attn, cols)
    h = states[None]
    for i in range(layer, len(lm.layers)):
        cos, sin = rec.pos_emb[i]
        h = lm.layers[i](h, attention_mask=allowed(len(keep), None, None)[None, None],
                         position_embeddings=(cos[:, keep], sin[:, keep]))
    full[:, keep] = h
    kept = [torch.searchsorted(c, keep[torch.isin(keep, c)]) for c in cols]
    return model.lm_head(lm.norm(full)), kept


def holitom_choose(h, attn, cols):
    h = h.clone()
    keep = torch.ones(h.shape[0], dtype=torch.bool)
    for c in cols:
        kept, states = official_holitom(h[c], attn[-1, c])
        keep[c] = False
        keep[c[kept]] = True
        h[c[kept]] = states
    idx = torch.nonzero(keep).squeeze(1)
    return idx, h[idx]


def prunevid_choose(h, attn, cols):
    visual = torch.zeros(h.shape[0], dtype=torch.bool)
    for c in cols:
        visual[c] = True
    keep = ~visual
    for c in cols:
        text = torch.nonzero(~visual).squeeze(1)
        text = text[text > c.max()]  # the text after the run rates it
        kept = official_prunevid(attn[text][:, c][None])  # rows combined over heads
        keep[c[kept]] = True
    idx = torch.nonzero(keep).squeeze(1)
    return idx, h[idx]


CHOOSE = {"holitom-llm": holitom_choose, "prunevid-llm": prunevid_choose}


def visual_runs(ids: torch.Tensor, tokens: tuple[int, ...]) -> list[torch.Tensor]:
    cols = torch.nonzero(torch.isin(ids[0], torch.tensor(tokens))).squeeze(1)
    runs = torch.nonzero((torch.diff(cols) > 1) | (torch.diff(ids[0, cols]) != 0)).squeeze(1)
    return list(torch.tensor_split(cols, (runs + 1).tolist()))


@pytest.fixture(scope="module")
def llava():
    model = tiny_llava(text_layers=4)
    return model, eager_copy(model)


@pytest.fixture(scope="module")
def qwen():
    model = tiny_qwen("qwen2", text_layers=4)
    return model, eager_copy(model)


def _check_by_hand(model, eager, kw, cols, method, options):
    spec = ts.describe(method).make_config(options)
    layer = spec.cut_layers(4)[0]
    with torch.no_grad(), tm.applied(model, method, **options):
        out = model(**kw).logits
        cuts = tm.get_state(model).llm.last
    official = method == "prunevid-llm" and options.get("attention", "official") == "official"
    ref, ref_kept = one_cut_by_hand(model, eager, kw, layer, cols, CHOOSE[method], official)
    assert [c.layer for c in cuts] == [layer]
    assert [k.tolist() for k in cuts[0].kept] == [k.tolist() for k in ref_kept]
    assert [len(k) for k in ref_kept] == [spec.counts(len(c), None, 4)[0] for c in cols]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert not torch.allclose(out, model(**kw).logits, atol=1e-3)  # the cut changed something


@pytest.mark.parametrize("method,options", [("holitom-llm", {}), ("holitom-llm", {"layer": 2}),
                                            ("prunevid-llm", {}),
                                            ("prunevid-llm", {"layer": 2}),
                                            ("prunevid-llm", {"attention": "as-run"})])
@pytest.mark.parametrize("sample", [0, 1])
def test_llava_matches_hand_reference(llava, method, options, sample):
    model, eager = llava
    kw = inputs([sample])
    _check_by_hand(model, eager, kw, image_cols(kw["input_ids"]), method, options)


def test_prunevid_official_scores_choose_other_tokens(llava):
    """The two score forms pick different tokens on this prompt, so the references above
    tell them apart."""
    model, _ = llava
    kw = inputs([0])
    kept = {}
    for form in ("official", "as-run"):
        with torch.no_grad(), tm.applied(model, "prunevid-llm", attention=form):
            model(**kw)
            kept[form] = [k.tolist() for k in tm.get_state(model).llm.last[0].kept]
    assert kept["official"] != kept["as-run"]


@pytest.mark.parametrize("method", ["holitom-llm", "prunevid-llm"])
@pytest.mark.parametrize("sample", [0, 1])
def test_qwen_video_run_matches_hand_reference(qwen, method, sample):
    """Sample 0: an image then a video (both runs cut); sample 1: a video alone."""
    model, eager = qwen
    kw = qwen_inputs(model, [sample])
    cols = visual_runs(kw["input_ids"], (QIMG, VID))
    assert len(cols) == (2 if sample == 0 else 1)
    _check_by_hand(model, eager, kw, cols, method, {"layer": 2})


def test_fastv_cuts_the_qwen_video_run_like_the_hand_reference(qwen):
    model, eager = qwen
    kw = qwen_inputs(model, [0])
    ids = kw["input_ids"]
    cols = visual_runs(ids, (QIMG, VID))
    assert [int(ids[0, c[0]]) for c in cols] == [QIMG, VID]
    with torch.no_grad(), tm.applied(model, "fastv", 0.5):
        out = model(**kw).logits
        cuts = tm.get_state(model).llm.last
    counts = [[resolve_keep(0.5, c.numel()) for c in cols]]
    ref, ref_kept = by_hand(model, eager, record(model, kw), cols, [2], counts, "previous",
                            "keep")
    assert [len(k) for k in cuts[0].kept] == [8, 8]  # the video's 16 tokens cut to 8
    assert [k.tolist() for k in cuts[0].kept] == [k.tolist() for k in ref_kept[0]]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# -- the two-stage pipelines on a Qwen2-VL video prompt ---------------------------------------


@pytest.mark.parametrize("method,llm", [("holitom", "holitom-llm"),
                                        ("prunevid", "prunevid-llm")])
def test_pipeline_on_qwen_video(qwen, method, llm):
    model, _ = qwen
    kw = qwen_inputs(model, [1])  # text, a video of 3 x 2 x 2 merged tokens, text
    n_video = int((kw["input_ids"] == VID).sum())
    with torch.no_grad(), tm.applied(model, method, 0.5):
        out = model(**kw).logits
        state = tm.get_state(model)
        described = state.to_dict()
        cuts = state.llm.last
        (groups,) = state.last_groups
        gen = model.generate(**kw, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert described["method"] == method and described["stage"] == "pre-llm"
    assert described["llm"]["method"] == llm and described["llm"]["stage"] == "llm"
    assert described["llm"]["keep"] is None  # the official in-LLM budget
    assert torch.isfinite(out).all()
    assert gen.shape == (1, kw["input_ids"].shape[1] + 3)
    # The video reaches the LLM with at most half its tokens (the pre-LLM step shortens
    # the sequence: logits are those of the shortened one), and the in-LLM stage cuts that
    # run again at its official share.
    entering = n_video - (kw["input_ids"].shape[1] - out.shape[1])
    assert 0 < entering <= resolve_keep(0.5, n_video)
    (video,) = cuts[0].kept
    expect = ts.describe(llm).make_config({}).counts(entering, None, 4)[0]
    if groups is not None:  # PruneVid: int(0.4 * size) of each group of its merge
        assert method == "prunevid" and groups.numel() == entering
        expect = sum(int(s * 0.4) for s in torch.bincount(groups).tolist())
    assert len(video) == expect < entering
    assert not tm.is_applied(model)


# -- prunevid-llm's cache: decoding after the prefill sees the kept tokens only ---------------


def _kv(cache, i):
    layer = cache.layers[i]
    return layer.keys, layer.values


@pytest.mark.parametrize("sample", [0, 1])
def test_prunevid_decoding_equals_a_hand_pruned_cache(llava, sample):
    """A decoding step after prunevid-llm's prefill equals the untouched model continuing
    from a cache whose every layer holds the kept columns only (what the official code
    leaves: layers from the cut on never saw the dropped tokens, the earlier layers' cache
    is pruned after the prefill), at the next original position. ``cache="keep"`` (the
    earlier layers keep every column) decodes differently."""
    from transformers import DynamicCache

    model, _ = llava
    kw = inputs([sample])
    t = kw["input_ids"].shape[1]
    steps = {}
    for mode in ("official", "keep"):
        with torch.no_grad(), tm.applied(model, "prunevid-llm", layer=2, cache=mode):
            out = model(**kw, use_cache=True)
            kept = tm.get_state(model).llm.last[0].kept
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            pruned = DynamicCache()
            cols = image_cols(kw["input_ids"])
            keep = torch.ones(t, dtype=torch.bool)
            for c, k in zip(cols, kept, strict=True):
                keep[c] = False
                keep[c[k]] = True
            idx = torch.nonzero(keep).squeeze(1)
            for i in range(len(cache.layers)):
                k, v = _kv(cache, i)
                if k.shape[2] == t:                     # the layers before the cut: prune
                    k, v = k[:, :, idx], v[:, :, idx]
                assert k.shape[2] == idx.numel()
                pruned.update(k.clone(), v.clone(), i)
            mask = torch.cat([kw["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
            steps[mode] = model(input_ids=nxt, attention_mask=mask, past_key_values=cache,
                                use_cache=True).logits[:, -1]
        ref = model(input_ids=nxt, attention_mask=torch.ones(1, idx.numel() + 1,
                                                              dtype=torch.long),
                    position_ids=torch.tensor([[t]]), past_key_values=pruned).logits[:, -1]
        if mode == "official":
            torch.testing.assert_close(steps[mode], ref, atol=ATOL, rtol=0)
        else:
            assert not torch.allclose(steps[mode], ref, atol=1e-3)


def test_prunevid_official_cache_batched_generation_equals_single(llava):
    model, _ = llava
    with torch.no_grad(), tm.applied(model, "prunevid-llm", layer=2):
        both = model.generate(**inputs([0, 1]), max_new_tokens=6, do_sample=False)[:, -6:]
        for row, s in enumerate((0, 1)):
            one = model.generate(**inputs([s]), max_new_tokens=6, do_sample=False)[:, -6:]
            assert both[row].tolist() == one[0].tolist()


def test_prunevid_pipeline_prunes_per_group_of_its_merge(qwen, monkeypatch):
    """``apply(model, "prunevid")`` hands the groups of its pre-LLM merge (a segment's
    static tokens, each frame's dynamic ones) to its in-LLM stage, which keeps
    ``int(size * 0.4)`` of each group by the layer's scores: the kept set equals the
    per-group top of the scores the stage rated with, on a 16-frame clip."""
    import test_models_video as tmv

    model, _ = qwen
    monkeypatch.setattr(tmv, "QWEN_SAMPLES", [([[1, 11], [12, 13]], [("video", (16, 8, 8))])])
    kw = qwen_inputs(model, [0])
    seen = []
    real_reduce = ts.reduce

    def spy(tokens, method, k, **kwargs):
        r = real_reduce(tokens, method, k, **kwargs)
        if method == "prunevid-llm":
            seen.append((kwargs["groups"], kwargs["query_attn"], r))
        return r

    monkeypatch.setattr(tm._llm, "reduce", spy)
    with torch.no_grad(), tm.applied(model, "prunevid", 0.5):
        model(**kw)
        state = tm.get_state(model)
        (red, _), = state.last
        (video,) = state.llm.last[0].kept
    (groups, attn, r), = seen
    pre = red.groups[0] if red.mask is None else red.groups[0][red.mask[0]]
    assert groups[0].tolist() == pre.tolist()           # every token entering, in order
    sizes = torch.bincount(pre).tolist()
    assert len([s for s in sizes if s]) > 3             # static groups and frames
    assert len(video) == sum(int(s * 0.4) for s in sizes) > 0
    score = attn[0].amax(dim=0)
    for g, size in enumerate(sizes):
        members = torch.nonzero(pre == g).squeeze(1)
        top = members[torch.sort(score[members], descending=True, stable=True).indices]
        assert sorted(top[:int(size * 0.4)].tolist()) == \
            sorted(video[pre[video] == g].tolist())


def test_prunevid_llm_keeps_tokens_in_no_group():
    """Group -1 (a video's newline after PruneVid's merge) is kept and counts towards an
    explicit ``k``; the official floors apply to the groups at the default count."""
    ids = torch.tensor([0] * 10 + [1] * 10 + [-1])
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(1, 21, generator=g)
    attn[0, -1] = 0.0                                        # the least attended token
    x = torch.randn(1, 21, 8, generator=g)
    r = ts.reduce(x, "prunevid-llm", int(21 * 0.4), query_attn=attn, groups=ids[None])
    assert r.indices[0].tolist()[-1] == 20 and r.indices.shape[1] == 4 + 4 + 1
    r = ts.reduce(x, "prunevid-llm", 5, query_attn=attn, groups=ids[None])
    assert r.indices.shape[1] == 5 and 20 in r.indices[0].tolist()
