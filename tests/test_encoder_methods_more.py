"""In-encoder methods of issue 15, part two: CenterCLIP's k-medoids, GTP-ViT, FlowCut.

Each method is checked against a re-statement of its official computation on fixed tensors
(own code, written from the official algorithm), inside a tiny CLIP tower against the
tower's layers run by hand with the method's token-set function applied where it acts,
and for the model-level contracts (keep-all equals untouched, a batch equals each image
alone, ``remove`` exact, sizes of a merge add up to the input count).
"""

from __future__ import annotations

import pytest
import torch
from test_encoder_methods import hand_tower
from test_encoder_stage import assert_untouched, backbone, hooks, pixels, run

import tokensieve as ts
import tokensieve.models as tm

ATOL = 1e-5


def check_batch_equals_single(m, pv: torch.Tensor, method: str, **options) -> torch.Tensor:
    """Apply, run the batch and each image alone; the rows agree. Returns the batch output."""
    ts.apply(m, method, **options)
    both = run(m, pv).last_hidden_state
    for i in range(pv.shape[0]):
        one = run(m, pv[i:i + 1]).last_hidden_state
        torch.testing.assert_close(both[i:i + 1, :one.shape[1]], one, atol=ATOL, rtol=0)
    ts.remove(m)
    return both


def check_keep_all(kind: str, method: str, **options) -> None:
    m = backbone(kind)
    pv = pixels()
    ref = run(m, pv)
    before = hooks(m)
    ts.apply(m, method, **options)
    out = run(m, pv)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert torch.equal(a, b)
    ts.remove(m)
    assert_untouched(m, before)


# -- CenterCLIP k-medoids --------------------------------------------------------------------
def official_kmedoids(x: torch.Tensor, k: int, threshold: float = 1e-6, iters: int = 100):
    """CenterCLIP's ``batch_fast_kmedoids`` for one segment ``x`` ``[N, D]``, re-stated:
    distances shifted all negative (``d - max - 1``), diagonal minus one, KKZ start, each
    medoid the argmin over all tokens of the cluster-masked row sums, stop when the summed
    medoid shift is below ``threshold``; medoids sorted, assignment recomputed."""
    d = torch.cdist(x[None], x[None])[0]
    d = d - d.max() - 1.0
    d = d - torch.eye(len(x))
    med = [int(x.norm(dim=-1).argmax())]
    for _ in range(1, k):
        med.append(int(d[med].min(dim=0).values.argmax()))
    med = torch.tensor(med)
    for _ in range(iters):
        prev = med
        assign = d[med].min(dim=0).indices
        mask = assign[None] == torch.arange(k)[:, None]  # [K, N]
        sums = (d[None] * mask[:, :, None] * mask[:, None, :]).sum(-1)
        med = sums.argmin(dim=-1)
        if float((x[med] - x[prev]).norm(dim=-1).sum()) < threshold:
            break
    med = med.sort().values
    return med, d[med].min(dim=0).indices


def test_kmedoids_encoder_config_equals_official():
    from tokensieve.methods.kmedoids import KMedoidsSchedule, kmedoids_one

    g = torch.Generator().manual_seed(3)
    # few clusters: a two-member cluster's members tie exactly, and the official code's
    # shifted float32 distances break such ties by rounding noise (here: the lower index)
    for n, k in ((49, 4), (30, 3), (64, 5)):
        x = torch.randn(n, 16, generator=g)
        med, assign = kmedoids_one(x, k, KMedoidsSchedule(clusters=k).config)
        want_med, want_assign = official_kmedoids(x, k)
        assert med.tolist() == want_med.tolist()
        assert assign.tolist() == want_assign.tolist()


def kmedoids_rule(layer: int, k: int, output: str = "medoids"):
    """CenterCLIP's step by hand: before ``layer``'s attention, CLS + the token-set
    function's medoids (or means) of the patch tokens."""
    def rule(i, where, x, probs, v, sizes):
        if where != "pre" or i != layer:
            return x, sizes
        r = ts.reduce(x[:, 1:], "kmedoids", k, iterations=100, threshold=1e-6, output=output)
        return torch.cat([x[:, :1], r.tokens], dim=1), r.sizes.float()
    return rule


@pytest.mark.parametrize(("options", "layer", "k"), [({"clusters": 20}, 2, 20),
                                                     ({"clusters": 9, "layer": 0,
                                                       "output": "means"}, 0, 9)])
def test_kmedoids_equals_hand_run_tower(options, layer, k):
    m = backbone("clip")
    pv = pixels(2)
    ref = hand_tower(m, pv, kmedoids_rule(layer, k, options.get("output", "medoids")))
    ts.apply(m, "kmedoids", **options)
    out = run(m, pv)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in ref]
    for a, b in zip(out.hidden_states, ref, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    trace = tm.get_state(m).encoder.last.current
    assert trace.sizes.sum(1).eq(65).all() and trace.sizes[:, 0].eq(1).all()
    assert trace.positions[:, 0].eq(0).all() and int(trace.source.min()) >= 0
    ts.remove(m)


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit"])
def test_kmedoids_keep_all_batch_remove(kind):
    check_keep_all(kind, "kmedoids", clusters=64)  # every patch its own cluster: untouched
    m = backbone(kind)
    pv = pixels(3)
    run(m, pv)  # transformers installs its output capturing hooks on a first call
    before = hooks(m)
    out = check_batch_equals_single(m, pv, "kmedoids", clusters=10)
    assert out.shape[1] == 10 + int(kind != "siglip")
    assert_untouched(m, before)


def test_kmedoids_options_and_keep():
    from tokensieve.methods.kmedoids import KMedoidsSchedule

    assert KMedoidsSchedule(clusters=49).plan(12) == {7: 49}
    assert KMedoidsSchedule(clusters=49).plan(24) == {14: 49}
    assert KMedoidsSchedule(clusters=4).position == "pre"
    for bad in ({}, {"clusters": 0}, {"clusters": 4, "layer": -1},
                {"clusters": 4, "distance": "l1"}):
        with pytest.raises(ValueError):
            KMedoidsSchedule(**bad)
    m = backbone("clip")
    ts.apply(m, "kmedoids", keep=16)
    assert run(m, pixels()).last_hidden_state.shape[1] == 17
    ts.remove(m)


# -- GTP-ViT -----------------------------------------------------------------------------------
def official_gtp(x, probs, graph, num_prop, alpha=0.1, scales=None):
    """GTP's ``select`` (MixedAttnMax) and ``propagate`` (GraphProp) with a CLS token,
    re-stated: ``x`` ``[B, N, C]``, ``probs`` ``[B, H, N, N]``, ``graph`` ``[B, N-1, N-1]``.
    Returns (x', graph', scales') with the kept tokens in rank order, and the kept indices."""
    b, n, c = x.shape
    rank = torch.diagonal(probs, dim1=-2, dim2=-1)[:, :, 1:].max(1)[0] * \
        probs[:, :, :, 1:].sum(-2).max(1)[0]
    rank = torch.argsort(rank, dim=1, descending=True)
    kept, prop = rank[:, :-num_prop] + 1, rank[:, -num_prop:] + 1

    def rows(t, idx):
        return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    xk, xp = rows(x, kept), rows(x, prop)
    w = rows(graph, kept - 1)
    wp = w.gather(2, (prop - 1).unsqueeze(1).expand(-1, w.shape[1], -1))
    w = w.gather(2, (kept - 1).unsqueeze(1).expand(-1, w.shape[1], -1))
    xk = xk + alpha * wp @ xp
    s = torch.ones(b, n) if scales is None else scales
    sp = s[:, 1:].gather(1, prop - 1)
    sk = s[:, 1:].gather(1, kept - 1) + alpha * (wp @ sp[..., None])[..., 0]
    return torch.cat([x[:, :1], xk], 1), w, torch.cat([s[:, :1], sk], 1), kept


def official_spatial(n):
    """GTP's spatial graph of ``n`` patches, symmetrically normalised."""
    side = int(n ** 0.5)
    i = torch.arange(n)
    r1, c1 = i[:, None] // side, i[:, None] % side
    r2, c2 = i[None] // side, i[None] % side
    g = ((r1 - r2).abs() <= 1).float() * ((c1 - c2).abs() <= 1).float() - torch.eye(n)
    dg = torch.diag_embed(g.sum(-1) ** -0.5)
    return dg @ g @ dg


def test_gtp_propagation_equals_official():
    from tokensieve.methods.gtp import build_graph, gtp_propagate, gtp_ranking

    g = torch.Generator().manual_seed(4)
    b, n, h = 2, 37, 3
    x = torch.randn(b, n, 8, generator=g)
    probs = (torch.randn(b, h, n, n, generator=g) * 2).softmax(-1)
    scales = torch.rand(b, n, generator=g) + 0.5
    graph = build_graph("spatial", x[:, 1:], None, 8)
    torch.testing.assert_close(graph[0], official_spatial(n - 1))
    want_x, want_g, want_s, kept = official_gtp(x, probs, graph, 7, scales=scales)
    scores = gtp_ranking(torch.diagonal(probs, dim1=-2, dim2=-1), probs.sum(-2), "MixedAttnMax")
    prop = gtp_propagate(x, 7, scores, graph, alpha=0.1, has_cls=True, sizes=scales)
    order = kept.argsort(dim=1)  # official rank order -> ascending
    assert torch.equal(prop.kept[:, 1:], kept.gather(1, order))
    idx = torch.cat([torch.zeros(b, 1, dtype=torch.long), order + 1], 1)
    torch.testing.assert_close(prop.tokens, want_x.gather(1, idx[..., None].expand(-1, -1, 8)))
    torch.testing.assert_close(prop.sizes, want_s.gather(1, idx))
    og = want_g.gather(1, order[..., None].expand(-1, -1, n - 8))
    torch.testing.assert_close(prop.graph, og.gather(2, order[:, None].expand(-1, n - 8, -1)))


def test_gtp_semantic_graph_equals_official():
    from tokensieve.methods.gtp import semantic_graph

    x = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(5))
    xn = x / x.norm(dim=-1, keepdim=True)
    cos = xn @ xn.transpose(-1, -2)
    thr = torch.kthvalue(cos, 30 - 4, dim=-1, keepdim=True)[0]
    want = torch.where(cos >= thr, 1.0, 0.0) - torch.eye(30)
    assert torch.equal(semantic_graph(x, 4), want)


def gtp_rule(m, pv, num_prop, alpha=0.1, prop_attn=False, kind="spatial"):
    """GTP by hand: the graph from the layer-0 input, per layer MixedAttnMax from the eager
    probabilities and :func:`gtp_propagate` between attention and MLP."""
    from tokensieve.methods.gtp import build_graph, gtp_propagate, gtp_ranking

    with torch.no_grad():
        x0 = m.pre_layrnorm(m.embeddings(pv))
    state = {"graph": build_graph(kind, x0[:, 1:], None, 8)}

    def rule(i, where, x, probs, v, sizes):
        r = min(num_prop[i], x.shape[1] - 2)
        if where != "mid" or r <= 0:
            return x, sizes
        scores = gtp_ranking(torch.diagonal(probs, dim1=-2, dim2=-1), probs.sum(-2),
                             "MixedAttnMax")
        prop = gtp_propagate(x, r, scores, state["graph"], alpha=alpha, has_cls=True,
                             sizes=sizes)
        state["graph"] = prop.graph
        return prop.tokens, prop.sizes
    return rule


@pytest.mark.parametrize(("options", "per_layer"), [
    ({"num_prop": 6}, [6] * 4),
    ({"num_prop": [0, 20, 30, 3], "prop_attn": True, "alpha": 0.5}, [0, 20, 30, 3]),
    ({"num_prop": 5, "graph": "mixed"}, [5] * 4),
])
def test_gtp_equals_hand_run_tower(options, per_layer):
    m = backbone("clip")
    pv = pixels(2)
    rule = gtp_rule(m, pv, per_layer, options.get("alpha", 0.1), options.get("prop_attn", False),
                    options.get("graph", "spatial"))
    ref = hand_tower(m, pv, rule, prop_attn=options.get("prop_attn", False))
    ts.apply(m, "gtp", **options)
    out = run(m, pv)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in ref]
    for a, b in zip(out.hidden_states, ref, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    trace = tm.get_state(m).encoder.last.current
    assert trace.positions[:, 0].eq(0).all()
    ts.remove(m)


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2"])
def test_gtp_keep_all_batch_remove(kind):
    check_keep_all(kind, "gtp", num_prop=0)
    m = backbone(kind)
    pv = pixels(3)
    run(m, pv)
    before = hooks(m)
    out = check_batch_equals_single(m, pv, "gtp", num_prop=5, graph="mixed")
    assert out.shape[1] == 64 + int(kind != "siglip") - 20
    assert_untouched(m, before)


def test_gtp_options_and_keep():
    from tokensieve.methods.gtp import GTPSchedule

    assert GTPSchedule(num_prop=4).plan(12) == {i: 4 for i in range(12)}
    assert GTPSchedule(num_prop=[0, 2]).plan(3) == {1: 2}
    for bad in ({}, {"num_prop": -1}, {"num_prop": 2, "alpha": -1.0},
                {"num_prop": 2, "selection": "CLSAttnMean"}, {"num_prop": 2, "graph": "knn"}):
        with pytest.raises(ValueError):
            GTPSchedule(**bad)
    m = backbone("clip")
    ts.apply(m, "gtp", keep=21)
    assert run(m, pixels()).last_hidden_state.shape[1] == 22
    ts.remove(m)
    r = ts.reduce(torch.randn(2, 17, 8), "gtp", 9, attn_received=torch.rand(2, 17),
                  has_cls=True)
    assert r.tokens.shape == (2, 9, 8) and r.indices[:, 0].eq(0).all()


# -- FlowCut -----------------------------------------------------------------------------------
def official_flowcut_layer(x, probs, v_heads, cum, rpl, target):
    """The FlowCut block of the official ``CLIPEncoderLayer_forward``, re-stated, after the
    MLP: ``x`` ``[B, T, C]``, ``probs`` ``[B, H, T, T]``, ``v_heads`` ``[B, H, T, Dh]``,
    ``target`` CLS included. Returns ``(x, cum)``."""
    if x.shape[1] <= target:
        return x, cum
    cls_attention = probs[:, :, 0, 1:].mean(dim=1)
    semantic = (v_heads[:, :, :1] @ v_heads.transpose(-1, -2)).softmax(-1).mean(1)[:, 0]
    value = v_heads.mean(1)
    score = (cls_attention / cls_attention.sum(-1, keepdim=True)
             + semantic[:, 1:] / semantic[:, 1:].sum(-1, keepdim=True)) * \
        torch.norm(value[:, 1:], p=1, dim=-1)
    cum = score.clone() if cum is None else 0.5 * cum + 0.5 * score
    if rpl % 2:
        return x, cum
    if rpl:
        n = cls_attention.shape[-1]
        prob = cls_attention / cls_attention.sum(-1, keepdim=True)
        ratio = -(prob * prob.log()).sum(-1) / torch.log(torch.tensor(n))
        r = (n - (target - 1)) / rpl ** 0.5 * (1 - ratio ** 2)
        prune = int(r.max(0).values.round())
    else:
        prune = x.shape[1]
    keep_n = max(x.shape[1] - prune, target)
    idx = torch.topk(cum, keep_n - 1, dim=1).indices.sort(dim=1).values
    top = x[:, 1:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], top], 1), cum.gather(1, idx)


def test_flowcut_layer_equals_official():
    from tokensieve.methods.ats import padded_subset_step  # noqa: F401  (shared helper)
    from tokensieve.methods.flowcut import FlowCutSchedule

    g = torch.Generator().manual_seed(6)
    b, h, t = 1, 4, 50
    sched = FlowCutSchedule(target_num=9)
    for rpl in (4, 3, 0):
        x = torch.randn(b, t, 16, generator=g)
        probs = (torch.randn(b, h, t, t, generator=g) * 2).softmax(-1)
        v = torch.randn(b, h, t, 8, generator=g)
        prev = torch.rand(b, t - 1, generator=g)
        want, want_cum = official_flowcut_layer(x, probs, v, prev, rpl, 10)
        state = {"flowcut_scores": prev.clone()}
        signals = {"cls_attn": probs[:, :, 0].mean(1), "head_values": v}
        step = sched.run_step(x, None, signals, rpl, True, state)
        got = x if step is None else step.tokens
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(state["flowcut_scores"], want_cum)
        assert rpl % 2 == 0 or step is None
    assert got.shape[1] == 10


def flowcut_rule(select: int, target: int, heads: int = 4):
    state = {"cum": None}

    def rule(i, where, x, probs, v, sizes):
        if where != "post" or i >= select:
            return x, sizes
        vh = v.reshape(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)
        x, state["cum"] = official_flowcut_layer(x, probs, vh, state["cum"], select - i - 1,
                                                 target + 1)
        return x, sizes
    return rule


@pytest.mark.parametrize(("options", "select"), [({"target_num": 12}, 2),
                                                 ({"target_num": 5, "select_layer": 3}, 3)])
def test_flowcut_equals_hand_run_tower_per_image(options, select):
    """Each image of a batch (own adaptive counts, padded) equals the official layers run
    by hand on it alone; the last pruning layer leaves exactly CLS + target_num."""
    m = backbone("clip")
    pv = pixels(3)
    ts.apply(m, "flowcut", **options)
    out = run(m, pv)
    for i in range(3):
        ref = hand_tower(m, pv[i:i + 1], flowcut_rule(select, options["target_num"]))
        for a, r in zip(out.hidden_states, ref, strict=True):
            torch.testing.assert_close(a[i:i + 1, :r.shape[1]], r, atol=ATOL, rtol=0)
            assert bool((a[i, r.shape[1]:] == 0).all())
        assert ref[select].shape[1] == options["target_num"] + 1
    trace = tm.get_state(m).encoder.last.current
    assert trace.positions[:, 0].eq(0).all()
    ts.remove(m)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_flowcut_keep_all_batch_remove(kind):
    check_keep_all(kind, "flowcut", target_num=64)
    m = backbone(kind)
    pv = pixels(3)
    run(m, pv)
    before = hooks(m)
    check_batch_equals_single(m, pv, "flowcut", target_num=7)
    assert_untouched(m, before)


def test_flowcut_options_token_set_and_keep():
    from tokensieve.methods.flowcut import FlowCutSchedule

    assert FlowCutSchedule(target_num=64).plan(24) == {i: 21 - i for i in range(22)}
    for bad in ({}, {"target_num": 0}, {"target_num": 4, "select_layer": 0}):
        with pytest.raises(ValueError):
            FlowCutSchedule(**bad)
    with pytest.raises(ValueError, match="needs a CLS token"):
        ts.apply(backbone("siglip"), "flowcut", target_num=8)
    m = backbone("clip")
    ts.apply(m, "flowcut", keep=10)
    assert run(m, pixels()).hidden_states[2].shape[1] == 11
    ts.remove(m)
    g = torch.Generator().manual_seed(7)
    x, attn, v = torch.randn(2, 30, 8, generator=g), torch.rand(2, 30, generator=g), \
        torch.randn(2, 30, 16, generator=g)
    r = ts.reduce(x, "flowcut", 10, cls_attn=attn, values=v, heads=2)
    assert r.indices[:, 0].eq(0).all() and r.tokens.shape == (2, 10, 8)
    vh = v.reshape(2, 30, 2, 8).transpose(1, 2)
    score = ((attn[:, 1:] / attn[:, 1:].sum(-1, keepdim=True))
             + (vh[:, :, :1] @ vh.transpose(-1, -2)).softmax(-1).mean(1)[:, 0, 1:]
             / (vh[:, :, :1] @ vh.transpose(-1, -2)).softmax(-1).mean(1)[:, 0, 1:].sum(-1, True)
             ) * vh.mean(1)[:, 1:].abs().sum(-1)
    want = score.topk(9, dim=1).indices.sort(dim=1).values + 1
    assert torch.equal(r.indices[:, 1:], want)


def test_flowcut_padded_batch_equals_official_per_image():
    """Two pruning layers on a batch whose images prune different adaptive counts: the
    second layer gets the padded tokens (and the padding-masked signals the stage gives);
    each image's real rows equal the official layers run on it alone."""
    from tokensieve.methods.flowcut import FlowCutSchedule

    g = torch.Generator().manual_seed(8)
    b, h, t, target = 3, 4, 60, 8
    sched = FlowCutSchedule(target_num=target - 1)
    x = torch.randn(b, t, 16, generator=g)
    sharp = torch.tensor([1.0, 4.0, 8.0])[:, None, None, None]
    logits = torch.randn(b, h, t, t, generator=g) * sharp
    v = torch.randn(b, h, t, 8, generator=g)
    state: dict = {}
    step = sched.run_step(x, None, {"cls_attn": logits.softmax(-1)[:, :, 0].mean(1),
                                    "head_values": v}, 4, True, state)
    assert step is not None and step.mask is not None
    counts = step.mask.sum(1)
    assert len(set(counts.tolist())) == 3, "the test wants three different counts"
    # second layer on the padded tokens: new attention logits / values over the kept rows
    t2 = step.tokens.shape[1]
    logits2 = torch.randn(b, h, t2, t2, generator=g) * sharp
    v2 = torch.randn(b, h, t2, 8, generator=g)
    masked = logits2.masked_fill(~step.mask[:, None, None], float("-inf"))
    signals = {"cls_attn": masked.softmax(-1)[:, :, 0].mean(1), "head_values": v2,
               "valid": step.mask}
    step2 = sched.run_step(step.tokens, step.sizes, signals, 0, True, state)
    for i in range(b):
        n = int(counts[i])
        one, cum = official_flowcut_layer(x[i:i + 1], logits[i:i + 1].softmax(-1),
                                          v[i:i + 1], None, 4, target)
        torch.testing.assert_close(step.tokens[i:i + 1, :n], one)
        lg = logits2[i:i + 1, :, :n, :n]
        two, _ = official_flowcut_layer(one, lg.softmax(-1), v2[i:i + 1, :, :n], cum, 0,
                                        target)
        torch.testing.assert_close(step2.tokens[i:i + 1], two)
