"""In-encoder methods beyond ToMe / EViT: ATS (adaptive counts, padded batches), MCTF.

Each method is checked three ways: its token-set function against a re-statement of the
official computation on fixed tensors; inside a tiny CLIP tower against the tower's layers
run by hand (eager attention written out, the re-stated official step applied where the
method acts); and the model-level contracts (keep-all equals untouched, a batch equals
each image alone, ``remove`` exact).
"""

from __future__ import annotations

import pytest
import torch
from test_encoder_stage import assert_untouched, backbone, eager_attention, hooks, pixels, run

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.methods.ats import ATSSchedule, ats_layer_keep

ATOL = 1e-5


# -- hand-run CLIP tower ----------------------------------------------------------------------
@torch.no_grad()
def hand_tower(m, pv: torch.Tensor, rule, prop_attn: bool = False) -> list[torch.Tensor]:
    """The CLIP tower's layers by hand; ``rule(i, where, x, probs, v, sizes)`` with
    ``where`` in ("pre", "mid", "post") returns ``(x, sizes)``; for "pre" it gets the probs
    of the layer's attention over its unreduced input. Returns every layer's output."""
    x = m.pre_layrnorm(m.embeddings(pv))
    outs, sizes = [x], None
    for i, layer in enumerate(m.encoder.layers):
        def attn(x, sizes, layer=layer):
            bias = None if sizes is None or not prop_attn else sizes.log()
            out, _, probs, v = eager_attention(layer.self_attn, layer.layer_norm1(x), bias)
            return out, probs, v
        h, probs, v = attn(x, sizes)
        x2, sizes2 = rule(i, "pre", x, probs, v, sizes)
        if x2 is not x:
            x, sizes = x2, sizes2
            h, probs, v = attn(x, sizes)
        x = x + h
        x, sizes = rule(i, "mid", x, probs, v, sizes)
        x = x + layer.mlp(layer.layer_norm2(x))
        x, sizes = rule(i, "post", x, probs, v, sizes)
        outs.append(x)
    return outs


# -- ATS ---------------------------------------------------------------------------------------
def official_ats_keep(probs: torch.Tensor, v: torch.Tensor, n_tokens: int | None) -> list[int]:
    """ATS's sampling of one image re-stated from the official ``AdaptiveTokenSampler``:
    ``probs`` ``[1, H, T, T]``, ``v`` ``[1, T, H*Dh]``; returns the kept token indices
    (CLS first, then ascending)."""
    t = probs.shape[-1]
    n = t if n_tokens is None else n_tokens
    n = min(max(min(n, t), 8), t)
    score = probs[0, :, 0].sum(0) * v[0].norm(dim=-1)  # head-sum CLS attention * ||V||
    score = score[1:] / score[1:].sum()
    sorted_s, order = torch.sort(score)
    cdf = torch.cumsum(sorted_s, 0)
    ncdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
    start = ncdf[ncdf > 0].min()
    m = n - 1
    ys = start + (1 - start) * torch.arange(m) / (m - 1)  # create_ys
    picks = torch.argmin((ys[:, None] - ncdf[None, :]).abs(), dim=1).unique()
    return [0, *sorted((order[picks] + 1).tolist())]


@pytest.mark.parametrize("n_tokens", [None, 30, 12, 3])
def test_ats_layer_keep_equals_official(n_tokens):
    """On fixed tensors, one image at a time, and padded in a batch (padding never kept)."""
    g = torch.Generator().manual_seed(0)
    b, t, h = 3, 40, 4
    logits = torch.randn(b, h, t, t, generator=g) * 3
    values = torch.randn(b, t, 32, generator=g)
    reals = [40, 33, 25]
    valid = torch.arange(t)[None] < torch.tensor(reals)[:, None]
    for i, real in enumerate(reals):
        probs = logits[i:i + 1, :, :real, :real].softmax(-1)
        want = official_ats_keep(probs, values[i:i + 1, :real], n_tokens)
        cls_attn = probs[:, :, 0].mean(1)
        alone = ats_layer_keep(cls_attn, values[i:i + 1, :real], None, n_tokens, 8)
        assert torch.nonzero(alone[0]).flatten().tolist() == want
        # the same image padded in a batch: padded keys masked (zero attention)
        padded = logits[i:i + 1].masked_fill(~valid[i][None, None, None], float("-inf"))
        batch_attn = padded.softmax(-1)[:, :, 0].mean(1)
        keep = ats_layer_keep(batch_attn, values[i:i + 1], valid[i:i + 1], n_tokens, 8)
        assert torch.nonzero(keep[0]).flatten().tolist() == want
        assert not bool(keep[0, real:].any())


def ats_rule(layers: tuple[int, ...], n_tokens: int | None):
    def rule(i, where, x, probs, v, sizes):
        if where != "mid" or i not in layers:
            return x, sizes
        keep = official_ats_keep(probs, v, n_tokens)
        return x[:, keep], None
    return rule


@pytest.mark.parametrize(("options", "layers"), [({"tokens": 24}, (1, 2, 3)),
                                                 ({"tokens": 40, "layers": (0, 2)}, (0, 2)),
                                                 ({}, (1, 2, 3))])  # official: own counts
def test_ats_equals_hand_run_tower_and_batch_equals_single(options, layers):
    """Images of one batch keep different counts: each real row of every layer's output
    equals that image run by hand alone (the official sampling re-stated); padding rows
    are zero and the final mask says which rows are real."""
    m = backbone("clip")
    pv = pixels(3)
    ref_out = run(m, pv).last_hidden_state
    before = hooks(m)
    ts.apply(m, "ats", **options)
    out = run(m, pv)
    trace = tm.get_state(m).encoder.last.current
    counts = []
    for i in range(3):
        ref = hand_tower(m, pv[i:i + 1], ats_rule(layers, options.get("tokens")))
        real = ref[-1].shape[1]
        counts.append(real)
        for a, r in zip(out.hidden_states, ref, strict=True):
            torch.testing.assert_close(a[i:i + 1, :r.shape[1]], r, atol=ATOL, rtol=0)
            assert bool((a[i, r.shape[1]:] == 0).all())
        alone = run(m, pv[i:i + 1]).last_hidden_state
        assert alone.shape[1] == real
        torch.testing.assert_close(out.last_hidden_state[i:i + 1, :real], alone, atol=ATOL,
                                   rtol=0)
    assert len(set(counts)) > 1, "the test wants images that keep different counts"
    assert trace.mask.sum(1).tolist() == counts
    assert trace.positions[:, 0].eq(0).all()
    ts.remove(m)
    assert_untouched(m, before)
    assert torch.equal(run(m, pv).last_hidden_state, ref_out)


@pytest.mark.parametrize("kind", ["clip", "vit", "dinov2"])
def test_ats_keep_all_equals_untouched(kind):
    m = backbone(kind)
    pv = pixels()
    ref = run(m, pv)
    ts.apply(m, "ats", layers=())
    assert torch.equal(run(m, pv).last_hidden_state, ref.last_hidden_state)
    ts.remove(m)
    # every token sampled (uniform attention here is near-flat): nothing is dropped either
    ts.apply(m, "ats", tokens=1000, layers=(0,), min_tokens=1)
    out = run(m, pv)
    trace = tm.get_state(m).encoder.last.current
    if trace.sizes is None:
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    ts.remove(m)


def test_ats_official_layers_and_options():
    assert sorted(ATSSchedule().plan(12)) == list(range(3, 12))
    assert sorted(ATSSchedule().plan(24)) == list(range(6, 24, 2))
    assert ATSSchedule(tokens=50).plan(12)[3] == 50
    for bad in ({"tokens": 0}, {"min_tokens": True}, {"layers": (1.5,)},
                {"use_values": 1}):
        with pytest.raises(ValueError):
            ATSSchedule(**bad)
    with pytest.raises(ValueError, match="needs a CLS token"):
        ts.apply(backbone("siglip"), "ats")


def test_ats_llava_images_bring_their_own_counts():
    """LLaVA-1.5: each image's placeholders are cut to its own count (padding dropped);
    one image alone gives the logits of the hand-built prompt."""
    from test_encoder_stage import llava_inputs, tiny_llava

    model = tiny_llava()
    inputs = llava_inputs(1)
    opts = {"tokens": 20, "layers": (0, 1)}
    rule = ats_rule((0, 1), 20)
    emb, mask = llava_reference_ats(model, inputs, rule)
    ts.apply(model, "ats", **opts)
    with torch.no_grad():
        out = model(**inputs).logits
        ref = model(inputs_embeds=emb, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    both = llava_inputs(2)
    with torch.no_grad():
        model(**both)
    reds = tm.last_reductions(model)
    trace = tm.get_state(model).encoder.last.at(1)
    assert [r.tokens.shape[1] for r, _ in reds] == (trace.mask.sum(1) - 1).tolist()
    ts.remove(model)


@torch.no_grad()
def llava_reference_ats(model, inputs, rule):
    """LLaVA's LM input by hand for one image: the tower by hand up to the feature layer
    (1 of 3), CLS dropped, projected, spliced into a prompt with that many placeholders."""
    from test_encoder_stage import IMG, llava_inputs

    tower = model.model.vision_tower
    outs = hand_tower(tower, inputs["pixel_values"],
                      lambda i, w, x, p, v, s: rule(i, w, x, p, v, s) if i <= 1 else (x, s))
    feats = model.model.multi_modal_projector(outs[2][:, 1:])
    short = llava_inputs(1, n_img=feats.shape[1])
    ids = short["input_ids"]
    emb = model.get_input_embeddings()(ids.masked_fill(ids == IMG, 0))
    emb[ids == IMG] = feats.reshape(-1, feats.shape[-1])
    return emb, short["attention_mask"]


# -- MCTF --------------------------------------------------------------------------------------
def official_mctf(x: torch.Tensor, attn: torch.Tensor, size: torch.Tensor | None, r: int,
                  taus=(1.0, 20.0, 40.0), bidirection: bool = True, pooling: int = 1):
    """One MCTF merge of one image re-stated from the official ``bipartite_soft_matching``
    and ``merge_wavg`` (CLS protected): ``x`` ``[T, C]``, ``attn`` ``[T]`` received
    attention, ``size`` ``[T]`` or None. Returns ``(x' [T', C], size' [T'], members
    [T', T] bool)`` with the rows put in the order of their surviving token."""
    t = x.shape[0]
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    met = x / x.norm(dim=-1, keepdim=True)
    a, b = met[::2], met[1::2]
    scores = ((a @ b.T + 1) / 2) ** (1 / taus[0])
    inv = 1 / attn
    inv = inv / inv.max()
    scores = scores * (inv[::2, None] * inv[None, 1::2]) ** (1 / taus[1])
    if size is not None:
        inv_s = 1 / size
        inv_s = inv_s / inv_s.max()
        scores = scores * (inv_s[::2, None] * inv_s[None, 1::2]) ** (1 / taus[2])
    scores[:1, :] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(descending=True)
    unm, src = edge[r1:].sort().values, edge[:r1]
    dst = node_idx[src]
    if bidirection:
        node_max2, node_idx2 = scores[unm].T.max(dim=-1)
        edge2 = node_max2.argsort(descending=True)
        unm2, src2 = edge2[r2:], edge2[:r2]
        dst2 = node_idx2[src2]

    def merge(z: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        def into(base, idx, src_rows):  # scatter_reduce along the tokens
            return base.scatter_reduce(0, idx[:, None].expand(-1, base.shape[1]), src_rows,
                                       mode)
        za, zb = z[::2], z[1::2]
        u = za[unm]
        d = into(zb, dst, za[src])
        if not bidirection:
            return torch.cat([u, d])
        return torch.cat([into(u, dst2, d[src2]), d[unm2]])

    s = torch.ones(t) if size is None else size
    if pooling == 1:
        w = attn * s / s.max()
    else:
        w = s
    out = merge(x * w[:, None]) / merge(w[:, None])
    new_size = merge(s[:, None])[:, 0]
    members = merge(torch.eye(t), "amax") > 0
    survivor = torch.cat([2 * unm, 2 * unm2 + 1]) if bidirection else \
        torch.cat([2 * unm, torch.arange(1, t, 2)])
    order = survivor.argsort()
    return out[order], new_size[order], members[order]


@pytest.mark.parametrize(("r", "bidirection", "with_size"), [(10, True, False), (11, True, True),
                                                             (7, False, True)])
def test_mctf_match_and_pool_equal_official(r, bidirection, with_size):
    from tokensieve.methods.mctf import mctf_match, mctf_pool

    g = torch.Generator().manual_seed(1)
    t = 33
    x = torch.randn(2, t, 16, generator=g)
    attn = torch.rand(2, t, generator=g) + 0.01
    size = torch.randint(1, 5, (2, t), generator=g).float() if with_size else None
    match = mctf_match(x, r, attn=attn, sizes=size, bidirectional=bidirection,
                       protect_first=True)
    out, new_size, _ = mctf_pool(match, x, size, attn)
    for i in range(2):
        want, want_size, members = official_mctf(x[i], attn[i], None if size is None
                                                 else size[i], r, bidirection=bidirection)
        mine = torch.nn.functional.one_hot(match.slot[i], t - r).T.bool()
        assert torch.equal(mine, members)
        torch.testing.assert_close(out[i], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(new_size[i], want_size)
    assert match.slot[:, 0].eq(0).all()


def test_mctf_token_set():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 50, 8, generator=g)
    attn = torch.rand(2, 50, generator=g) + 0.01
    r = ts.reduce(x, "mctf", keep=9, attn_received=attn, has_cls=True)
    assert r.tokens.shape == (2, 9, 8) and r.sizes.sum(1).eq(50).all()
    assert r.positions[:, 0].eq(0).all() and r.sizes[:, 0].eq(1).all()
    # one round (keep >= half): the official merge of r = 50 - 30 tokens
    one = ts.reduce(x, "mctf", keep=30, attn_received=attn, has_cls=True)
    for i in range(2):
        want, _, _ = official_mctf(x[i], attn[i], None, 20)
        torch.testing.assert_close(one.tokens[i], want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="tau_info"):
        ts.reduce(x, "mctf", keep=9, attn_received=attn, tau_info=-1)


def mctf_rule(layers, r: int, where: str):
    def rule(i, w, x, probs, v, sizes):
        if w != where or i not in layers:
            return x, sizes
        t = x.shape[1]
        rr = min(t - 10 if t - r < 10 else r, (t - 1) // 2)
        attn = probs.mean(dim=(1, 2))  # received attention, head and query mean
        outs = [official_mctf(x[j], attn[j], None if sizes is None else sizes[j], rr)
                for j in range(x.shape[0])]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    return rule


@pytest.mark.parametrize(("osa", "where"), [(2, "pre"), (0, "post")])
def test_mctf_equals_hand_run_tower(osa, where):
    m = backbone("clip")
    pv = pixels(2)
    ref = hand_tower(m, pv, mctf_rule((0, 1, 2, 3), 6, where), prop_attn=True)
    ts.apply(m, "mctf", r=6, one_step_ahead=osa)
    out = run(m, pv)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in ref]
    for a, b in zip(out.hidden_states, ref, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert tm.get_state(m).encoder.last.current.sizes.sum(1).eq(65).all()
    ts.remove(m)


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit", "dinov2"])
def test_mctf_keep_all_batch_remove(kind):
    m = backbone(kind)
    pv = pixels(3)
    ref = run(m, pv)
    before = hooks(m)
    ts.apply(m, "mctf", r=0)
    assert torch.equal(run(m, pv).last_hidden_state, ref.last_hidden_state)
    ts.remove(m)
    for osa in (2, 0):
        ts.apply(m, "mctf", r=6, one_step_ahead=osa)
        both = run(m, pv).last_hidden_state
        assert both.shape[1] == ref.last_hidden_state.shape[1] - 24
        for i in range(3):
            torch.testing.assert_close(both[i:i + 1], run(m, pv[i:i + 1]).last_hidden_state,
                                       atol=ATOL, rtol=0)
        ts.remove(m)
    assert_untouched(m, before)
    assert torch.equal(run(m, pv).last_hidden_state, ref.last_hidden_state)


def test_mctf_options():
    from tokensieve.methods.mctf import MCTFSchedule

    assert sorted(MCTFSchedule().plan(12)) == list(range(1, 12))
    assert MCTFSchedule().position == "pre" and MCTFSchedule(one_step_ahead=0).position == "post"
    assert MCTFSchedule.layer_r(16, 197, True) == 16
    assert MCTFSchedule.layer_r(0.35, 197, True) == int(196 * 0.35)
    assert MCTFSchedule.layer_r(16, 20, True) == 9  # t - 10 = 10, capped at half
    for bad, match in (({"one_step_ahead": 1}, "SDPA"), ({"r": -1}, "r=-1"),
                       ({"pooling": "max"}, "pooling"), ({"tau_size": float("nan")}, "tau")):
        with pytest.raises(ValueError, match=match):
            MCTFSchedule(**bad)


# -- Turbo -------------------------------------------------------------------------------------
def turbo_rule(r: int, alpha: float = 1.0, min_tokens: int = 40):
    """Official Turbo in a block, re-stated: ToMe's matching on the head-mean keys with the
    A tokens ranked by ``max cos - 100 alpha cls_attn`` (own code, not the library's)."""
    def merge(x, k, probs, sizes):
        t = x.shape[1]
        rr = min(r, (t - 1) // 2)
        if rr <= 0 or t < min_tokens:
            return x, sizes
        metric = k.mean(1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        best, best_b = (a @ b.transpose(-1, -2)).max(-1)
        cls_attn = probs[:, :, 0].mean(1)
        best = best - 100 * alpha * cls_attn[:, ::2]
        best[:, 0] = -torch.inf
        s = torch.ones(x.shape[:2]) if sizes is None else sizes
        outs, new_sizes = [], []
        for j in range(x.shape[0]):
            order = torch.sort(best[j], descending=True, stable=True).indices
            src = 2 * order[:rr]
            dst = 2 * best_b[j, order[:rr]] + 1
            total = (x[j] * s[j, :, None]).index_add(0, dst, x[j, src] * s[j, src, None])
            size = s[j].index_add(0, dst, s[j, src])
            keep = torch.ones(t, dtype=torch.bool)
            keep[src] = False
            outs.append(total[keep] / size[keep, None])
            new_sizes.append(size[keep])
        return torch.stack(outs), torch.stack(new_sizes)
    return merge


@pytest.mark.parametrize(("r", "min_tokens"), [(8, 0), (12, 40)])
def test_turbo_equals_hand_run_tower(r, min_tokens):
    from test_encoder_stage import hand_tower as tome_hand_tower

    m = backbone("clip")
    pv = pixels(2)
    merge = turbo_rule(r, min_tokens=min_tokens)
    ref, sizes = tome_hand_tower(m, pv, lambda i, x, k, p, s: merge(x, k, p, s), True)
    ts.apply(m, "turbo", r=r, min_tokens=min_tokens)
    out = run(m, pv)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in ref]
    for a, b in zip(out.hidden_states, ref, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(tm.get_state(m).encoder.last.current.sizes, sizes)
    ts.remove(m)


@pytest.mark.parametrize("kind", ["clip", "vit", "dinov2"])
def test_turbo_keep_all_batch_remove(kind):
    m = backbone(kind)
    pv = pixels(3)
    ref = run(m, pv)
    before = hooks(m)
    ts.apply(m, "turbo", r=0)
    assert torch.equal(run(m, pv).last_hidden_state, ref.last_hidden_state)
    ts.remove(m)
    ts.apply(m, "turbo", r=6, min_tokens=0)
    both = run(m, pv).last_hidden_state
    assert both.shape[1] == ref.last_hidden_state.shape[1] - 24
    for i in range(3):
        torch.testing.assert_close(both[i:i + 1], run(m, pv[i:i + 1]).last_hidden_state,
                                   atol=ATOL, rtol=0)
    ts.remove(m)
    assert_untouched(m, before)
    with pytest.raises(ValueError, match="needs r"):
        ts.apply(m, "turbo")
    with pytest.raises(ValueError, match="needs a CLS token"):
        ts.apply(backbone("siglip"), "turbo", r=4)
