"""MustDrop's vision-encoder stage (``mustdrop-merge``): the window merging against a
re-statement of the official ``conditional_pooling`` on fixed tensors, its options, and the
stage inside a tiny CLIP tower against the tower's layers run by hand (padded batches equal
single images), then inside a VLM with MustDrop's prefill stage after it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_encoder_methods import hand_tower
from test_encoder_methods_more import check_batch_equals_single
from test_encoder_stage import assert_untouched, backbone, hooks, pixels, run

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.methods.mustdrop_merge import window_similarity

ATOL = 1e-5


def official_pooling(feat: torch.Tensor, threshold: float, window: int) -> torch.Tensor:
    """The official ``conditional_pooling`` + ``merge_wavg`` for one image ``feat`` ``[1 + N,
    D]`` (CLS first, square grid tiled exactly by the windows), re-stated with loops: the
    mean of F.cosine_similarity over the distinct ordered pairs of each window, the windows
    at or above ``threshold`` taken by descending similarity, each merged into its last
    token by the plain mean; output CLS, the merged windows, then the other tokens in
    ascending order."""
    cls, x = feat[:1], feat[1:]
    side = int(len(x) ** 0.5)
    windows, sims = [], []
    for gy in range(side // window):
        for gx in range(side // window):
            idx = [(gy * window + dy) * side + gx * window + dx
                   for dy in range(window) for dx in range(window)]
            total = sum(float(F.cosine_similarity(x[i], x[j], dim=0))
                        for i in idx for j in idx if i != j)
            windows.append(idx)
            sims.append(total / (len(idx) * (len(idx) - 1)))
    order = sorted(range(len(sims)), key=lambda g: -sims[g])
    chosen = [g for g in order if sims[g] >= threshold]
    merged = [x[windows[g]].mean(0) for g in chosen]
    used = {i for g in chosen for i in windows[g]}
    rest = [x[i] for i in range(len(x)) if i not in used]
    return torch.stack([cls[0], *merged, *rest])


def grid_tokens(b: int = 1, side: int = 24, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Random tokens where every third 3 x 3 window is one vector plus small noise (so its
    similarity is near 1 and others are near 0: no window sits at the threshold)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, side, side, d, generator=g)
    for gy in range(side // 3):
        for gx in range(side // 3):
            if (gy * (side // 3) + gx + seed) % 3 == 0:
                base = torch.randn(b, 1, 1, d, generator=g)
                x[:, gy * 3:gy * 3 + 3, gx * 3:gx * 3 + 3] = base + 0.05 * torch.randn(
                    b, 3, 3, d, generator=g)
    return x.reshape(b, side * side, d)


def test_window_similarity_is_the_mean_pairwise_cosine():
    x = grid_tokens(side=6)
    sim = window_similarity(x, (6, 6), 3)
    for g, (gy, gx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        idx = [(gy * 3 + dy) * 6 + gx * 3 + dx for dy in range(3) for dx in range(3)]
        want = sum(float(F.cosine_similarity(x[0, i], x[0, j], dim=0))
                   for i in idx for j in idx if i != j) / 72
        assert sim[0, g].item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_equals_official_conditional_pooling(seed):
    x = grid_tokens(seed=seed)
    cls = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(9))
    want = official_pooling(torch.cat([cls, x], 1)[0], 0.8, 3)
    r = ts.reduce(x, "mustdrop-merge", 576)
    got = torch.cat([cls[0], r.tokens[0]])
    assert got.shape == want.shape and got.shape[0] < 577
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert r.sizes.sum().item() == 576 and r.assignment.max().item() == r.tokens.shape[1] - 1
    merged = int((r.sizes[0] == 9).sum())
    # each merged token stands at its window's last (bottom-right) token
    for j in range(merged):
        members = (r.assignment[0] == j).nonzero().squeeze(1)
        assert len(members) == 9 and r.positions[0, j].item() == members.max().item()


def test_raster_order_cap_and_batches():
    x = torch.cat([grid_tokens(seed=0), grid_tokens(seed=1)])
    off = ts.reduce(x, "mustdrop-merge", 576)
    ras = ts.reduce(x, "mustdrop-merge", 576, order="raster")
    for b in range(2):
        real = off.mask[b] if off.mask is not None else torch.ones(off.tokens.shape[1], dtype=bool)
        pos = off.positions[b][real]
        order = torch.argsort(pos)
        torch.testing.assert_close(ras.tokens[b][real], off.tokens[b][real][order])
        one = ts.reduce(x[b:b + 1], "mustdrop-merge", 576)
        torch.testing.assert_close(off.tokens[b, :one.tokens.shape[1]], one.tokens[0])
    # a cap below what the threshold leaves merges further windows, best first
    assert off.tokens.shape[1] > 300
    capped = ts.reduce(x[:1], "mustdrop-merge", 300)
    assert capped.tokens.shape[1] == 576 - 8 * 35  # the fewest windows: ceil(276 / 8)
    sim = window_similarity(x[:1], (24, 24), 3)[0]
    merged = {int(p) // 72 * 8 + int(p) % 24 // 3 for p in capped.positions[0, :35]}
    assert merged == set(sim.argsort(descending=True)[:35].tolist())  # the most similar
    with pytest.raises(ValueError, match="out of reach"):
        ts.reduce(x[:1], "mustdrop-merge", 63)  # every window merged leaves 64


def test_merge_options_are_checked():
    x = grid_tokens(side=6)
    for bad in ({"threshold": 1.5}, {"threshold": "0.8"}, {"window": 1}, {"window": 2.0},
                {"order": "sorted"}):
        with pytest.raises(ValueError):
            ts.reduce(x, "mustdrop-merge", 36, **bad)
    with pytest.raises(ValueError, match="mustdrop-merge: layer"):
        ts.apply(backbone("clip"), "mustdrop-merge", layer=-1)


# -- inside a tower ---------------------------------------------------------------------------
def threshold_for(m, pv: torch.Tensor, window: int = 2) -> float:
    """A threshold between the layer-0 window similarities of the images, so that they
    merge different numbers of windows."""
    out = run(m, pv).hidden_states[1][:, 1:]
    sims = window_similarity(out, (8, 8), window).flatten().sort(descending=True).values
    return float((sims[2] + sims[3]) / 2)


def merge_rule(threshold: float, window: int):
    def rule(i, where, x, probs, v, sizes):
        if where != "post" or i != 0:
            return x, sizes
        r = ts.reduce(x[:, 1:], "mustdrop-merge", 64, threshold=threshold, window=window)
        return torch.cat([x[:, :1], r.tokens], dim=1), None
    return rule


def test_stage_equals_hand_run_tower_and_batches_pad():
    m = backbone("clip")
    pv = pixels(2)
    thr = threshold_for(m, pv)
    before = hooks(m)
    both = check_batch_equals_single(m, pv, "mustdrop-merge", threshold=thr, window=2)
    for i in range(2):
        ref = hand_tower(m, pv[i:i + 1], merge_rule(thr, 2))
        ts.apply(m, "mustdrop-merge", threshold=thr, window=2)
        out = run(m, pv[i:i + 1])
        trace = tm.get_state(m).encoder.last.current
        ts.remove(m)
        assert [h.shape for h in out.hidden_states] == [h.shape for h in ref]
        for a, b in zip(out.hidden_states, ref, strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        assert trace.sizes.sum().item() == 65
    ts.apply(m, "mustdrop-merge", threshold=thr, window=2)
    run(m, pv)
    mask = tm.get_state(m).encoder.last.current.mask
    ts.remove(m)
    assert mask is not None and mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]
    assert both.shape[1] == mask.shape[1]
    assert_untouched(m, before)


def test_a_batch_where_one_image_merges_nothing_equals_single_images():
    m = backbone("clip")
    pv = pixels(2)
    out = run(m, pv).hidden_states[1][:, 1:]
    best = window_similarity(out, (8, 8), 2).max(dim=1).values
    thr = float(best.mean())  # between the two images' most similar windows
    lo = int(best.argmin())
    ts.apply(m, "mustdrop-merge", threshold=thr, window=2)
    alone = run(m, pv[lo:lo + 1]).last_hidden_state
    ts.remove(m)
    assert alone.shape[1] == 65  # this image merges nothing, the other does
    both = check_batch_equals_single(m, pv, "mustdrop-merge", threshold=thr, window=2)
    untouched = run(m, pv).last_hidden_state
    assert both.shape[1] == 65 and torch.equal(both[lo], untouched[lo])
    assert bool((both[1 - lo, -1] == 0).all())  # the other image merged: padded


def test_nothing_similar_is_untouched():
    m = backbone("clip")
    pv = pixels(2)
    ref = run(m, pv)
    ts.apply(m, "mustdrop-merge", threshold=1.0, window=2)
    out = run(m, pv)
    ts.remove(m)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert torch.equal(a, b)


def test_vlm_runs_the_merge_then_mustdrops_prefill_stage():
    from tokensieve.bench.tiny import random_tiny_llava
    from tokensieve.zoo import build_prompt, scene_qa

    model, processor = random_tiny_llava()
    sample = scene_qa("test", 1)[0]
    enc = processor(text=[build_prompt(processor, sample.question)], images=[sample.image],
                    return_tensors="pt")
    ts.apply(model, "mustdrop-merge", threshold=-1.0, window=2)  # every 2 x 2 window merges
    try:
        state = tm.get_state(model)
        assert state.llm is not None and state.llm.spec.name == "mustdrop"
        with torch.inference_mode():
            model(**enc, logits_to_keep=1)
        assert [r.num_tokens for r, _ in state.last] == [16]  # 16 windows of 4 patches
    finally:
        ts.remove(model)
    ts.apply(model, "mustdrop-merge", llm=None)
    try:
        assert tm.get_state(model).llm is None
    finally:
        ts.remove(model)


# -- the key set --------------------------------------------------------------------------------
def test_key_set_is_the_last_layers_top_cls_attention():
    """The official key set: the last layer's head-mean CLS attention row over its input (the
    features), top ceil(0.08 * patches), per image of a padded batch."""
    m = backbone("clip")
    pv = pixels(2)
    thr = threshold_for(m, pv)
    last = len(m.encoder.layers) - 1
    for i in range(2):
        seen = {}

        def rule(layer, where, x, probs, v, sizes, seen=seen):
            if where == "post" and layer == last:
                row = probs[0, :, 0, 1:].mean(0)
                k = -(-8 * (x.shape[1] - 1) // 100)
                seen["keys"] = sorted(torch.topk(row, k).indices.tolist())
            return merge_rule(thr, 2)(layer, where, x, probs, v, sizes)

        hand_tower(m, pv[i:i + 1], rule)
        ts.apply(m, "mustdrop-merge", threshold=thr, window=2)
        run(m, pv)
        keys = tm.get_state(m).encoder.last.state["protect"]
        ts.remove(m)
        assert keys[i].tolist() == seen["keys"]
    ts.apply(m, "mustdrop-merge", key_share=0.0)
    assert len(tm.get_state(m).encoder.plan) == 1
    ts.remove(m)


def test_prefill_stage_never_drops_the_key_set():
    from tokensieve.bench.tiny import random_tiny_llava
    from tokensieve.zoo import build_prompt, scene_qa

    model, processor = random_tiny_llava()
    sample = scene_qa("test", 1)[0]
    enc = processor(text=[build_prompt(processor, sample.question)], images=[sample.image],
                    return_tensors="pt")
    # thresholds of 1 drop every token the key set does not protect
    drop_all = ts.ReduceConfig("mustdrop", None, options={"global_thr": 1.0, "individual_thr": 1.0})
    ts.apply(model, "mustdrop-merge", threshold=1.0, llm=drop_all)  # no window merges
    try:
        with torch.inference_mode():
            model(**enc, logits_to_keep=1)
        state = tm.get_state(model)
        keys = state.encoder.last.state["protect"][0]
        cuts = state.llm.last
    finally:
        ts.remove(model)
    assert len(keys) == 6  # ceil(0.08 * 64)
    assert cuts and all(sorted(c.kept[0].tolist()) == keys.tolist() for c in cuts)
