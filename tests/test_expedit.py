"""Expedit inside a vision tower: clustering after a layer, the later layers on the clusters,
the full grid rebuilt at the end; the grid-bound families (LLaVA-NeXT, Gemma 3) get their
usual grid from a reduced tower."""

from __future__ import annotations

import pytest
import torch
from test_models_gemma3 import tiny_gemma3
from test_models_llava_next import pixels, tiny_next
from test_models_qwen_vl import tiny_qwen
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.methods.expedit import ExpeditSchedule, token_clustering, token_reconstruction

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              image_size=32, patch_size=4)  # 8 x 8 patches


def backbone(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = {"clip": (CLIPVisionModel, CLIPVisionConfig),
           "siglip": (SiglipVisionModel, SiglipVisionConfig)}[kind]
    return cls[0](cls[1](**VISION)).eval()


def pv(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def hand_tower(m: torch.nn.Module, x: torch.Tensor, layer: int, clusters: int,
               c: int, **opts) -> torch.Tensor:
    """The encoder run layer by layer: cluster the patches after ``layer``, run the rest on
    the clusters, rebuild the grid after the last layer."""
    inner = getattr(m, "vision_model", m)
    h = inner.embeddings(x)
    if hasattr(inner, "pre_layrnorm"):
        h = inner.pre_layrnorm(h)
    layers = inner.encoder.layers
    side = int((h.shape[1] - c) ** 0.5)
    q = int(clusters ** 0.5)
    for i, lay in enumerate(layers):
        h = type(lay).forward(lay, h, None)
        if i == layer:
            before = h[:, c:]
            centres, _ = token_clustering(before, (side, side), (q, q))
            h = torch.cat([h[:, :c], centres.to(h.dtype)], 1)
    out = token_reconstruction(h[:, c:], before, centres, **opts)
    out = torch.cat([h[:, :c], out], 1)
    if not hasattr(inner, "pre_layrnorm"):  # SigLIP's last hidden state is post-normed
        out = inner.post_layernorm(out)
    return out


@pytest.mark.parametrize("kind, c", [("clip", 1), ("siglip", 0)])
@pytest.mark.parametrize("layer, clusters", [(0, 16), (1, 9), (2, 4)])
def test_equals_the_layers_run_by_hand(kind, c, layer, clusters):
    m = backbone(kind)
    x = pv()
    with torch.no_grad():
        ref = hand_tower(m, x, layer, clusters, c)
        ts.apply(m, "expedit", clusters=clusters, layer=layer)
        try:
            out = m(pixel_values=x, output_hidden_states=True)
            trace = tm.get_state(m).encoder.last
        finally:
            ts.remove(m)
        full = m(pixel_values=x).last_hidden_state
    assert out.last_hidden_state.shape == full.shape == (2, 64 + c, 32)
    torch.testing.assert_close(out.last_hidden_state, ref, atol=1e-5, rtol=1e-5)
    # hidden states show what each layer produced: clusters in between, the grid at the end
    assert [t.shape[1] for t in out.hidden_states] == [64 + c] * (layer + 1) + [
        clusters + c] * (3 - layer) + [64 + c]
    sizes = trace.traces[0].sizes
    assert torch.equal(sizes.sum(1), torch.full((2,), 64.0 + c))


def test_keep_all_equals_untouched():
    m = backbone("clip")
    x = pv()
    with torch.no_grad():
        ref = m(pixel_values=x).last_hidden_state
        ts.apply(m, "expedit", clusters=64, layer=1)
        out = m(pixel_values=x).last_hidden_state
        ts.remove(m)
    assert torch.equal(out, ref)


def test_batch_equals_single_images():
    m = backbone("clip")
    x = pv(3)
    with torch.no_grad():
        ts.apply(m, "expedit", clusters=16, layer=1)
        both = m(pixel_values=x).last_hidden_state
        one = torch.cat([m(pixel_values=x[i:i + 1]).last_hidden_state for i in range(3)])
        ts.remove(m)
    torch.testing.assert_close(both, one, atol=1e-5, rtol=1e-5)


def test_reconstruction_weights():
    """One cluster per token with k=1: the rebuilt token is its nearest cluster's token
    (l2 and l1 agree); with more clusters, l2 weights sum to at least 1, l1 to exactly 1."""
    g = torch.Generator().manual_seed(0)
    before = torch.randn(1, 6, 4, generator=g)
    centres = torch.randn(1, 3, 4, generator=g)
    x = torch.randn(1, 3, 4, generator=g)
    near = torch.cdist(before, centres).argmin(2)[0]
    for norm in ("l2", "l1"):
        out = token_reconstruction(x, before, centres, k=1, normalize=norm)
        torch.testing.assert_close(out[0], x[0, near])
    ones = torch.ones(1, 3, 1)
    l2 = token_reconstruction(ones, before, centres, k=3, temperature=0.01)
    l1 = token_reconstruction(ones, before, centres, k=3, temperature=0.01, normalize="l1")
    assert bool((l2 >= 1 - 1e-6).all()) and torch.allclose(l1, torch.ones_like(l1))


def test_llava_next_gets_its_usual_grid():
    model = tiny_next()
    pvs, sizes = pixels([0, 1, 2])
    with torch.no_grad():
        ref = model.model.get_image_features(pvs, sizes).pooler_output
        ts.apply(model, "expedit", clusters=9, layer=0)
        try:
            out = model.model.get_image_features(pvs, sizes).pooler_output
            run = tm.get_state(model).encoder.last
        finally:
            ts.remove(model)
        again = model.model.get_image_features(pvs, sizes).pooler_output
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert run.traces[0].sizes.shape[1] == 1 + 9  # the tower ran on CLS + 9 clusters
    assert not all(torch.allclose(o, r) for o, r in zip(out, ref, strict=True))
    assert all(torch.equal(a, r) for a, r in zip(again, ref, strict=True))


def test_gemma3_gets_its_usual_grid():
    model = tiny_gemma3()
    x = pv(2)
    with torch.no_grad():
        ref = model.model.get_image_features(x).pooler_output
        ts.apply(model, "expedit", clusters=16, layer=0)
        try:
            out = model.model.get_image_features(x).pooler_output
        finally:
            ts.remove(model)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)


@pytest.mark.parametrize("make, match", [(lambda: tiny_qwen("qwen2.5"), "attends within windows"),
                                         (lambda: tiny_next(), None)])
def test_refusals(make, match):
    model = make()
    if match is None:  # other in-encoder methods stay refused on the grid-bound families
        with pytest.raises(ValueError, match="anyres packing.*'expedit'"):
            ts.apply(model, "tome", r=2)
        return
    with pytest.raises(ValueError, match=match):
        ts.apply(model, "expedit", clusters=4)


@pytest.mark.parametrize("kw, match", [({}, "needs clusters"), ({"clusters": 10}, "square"),
                                       ({"clusters": 4, "window": 4}, "odd"),
                                       ({"clusters": 4, "layer": 3}, "leaves no layer"),
                                       ({"clusters": 4, "normalize": "x"}, "normalize")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        ts.apply(backbone("clip"), "expedit", **kw)


def test_schedule_plan():
    assert ExpeditSchedule(clusters=(2, 3)).plan(24) == {12: (2, 3)}
    assert ExpeditSchedule(clusters=4, layer=5).count((2, 2), 65, True) == 5
