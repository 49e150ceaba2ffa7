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
