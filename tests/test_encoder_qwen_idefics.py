"""``expedit`` inside the vision towers of Qwen2-VL / Qwen2.5-VL (one packed sequence of all
images: attention segments from ``cu_seqlens``, per-token rotary positions, Qwen2.5's window
attention) and of Idefics3 / SmolVLM (a SigLIP-style tower per crop, pixel shuffle).

References are written by hand: a forward hook on the untouched model's tower replaces its
output with the tower's blocks run one by one on the same inputs (each image frame clustered
in raster order, the clusters run with their own segments and the rotary positions of their
cells' centre patches, the grid rebuilt), so the model's own merger / connector and LLM
take it from there.
"""

from __future__ import annotations

import math

import model_checks as checks
import pytest
import torch
from test_models_idefics3 import inputs as idefics_inputs
from test_models_idefics3 import tiny as tiny_idefics
from test_models_qwen_vl import inputs as qwen_inputs
from test_models_qwen_vl import tiny_qwen
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.methods.expedit import token_clustering, token_reconstruction

ATOL = 1e-5


def centre(a: int, full: int, n: int) -> int:
    """Middle row (column) of the ``a``-th adaptive-average-pool window of ``full`` into ``n``."""
    return (a * full // n + math.ceil((a + 1) * full / n) - 1) // 2


# -- Qwen2-VL / Qwen2.5-VL ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=["qwen2", "qwen2.5"])
def qwen(request):
    return tiny_qwen(request.param)


def hand_visual(visual, pv: torch.Tensor, thw: torch.Tensor, layer: int,
                clusters: tuple[int, int], seen: dict | None = None) -> torch.Tensor:
    """The tower's ``pooler_output``, its blocks run by hand: each frame's patches clustered
    after block ``layer``; the blocks up to the next window-attention block (or the last)
    run on the clusters, each cluster at the rotary position of its cell's centre patch;
    the grid rebuilt; the remaining blocks and the merger on it. ``seen`` gets the
    clusters' ``cu_seqlens`` and ``(cos, sin)``."""
    merge = visual.spatial_merge_size
    unit = merge * merge
    pos = get_vision_position_ids(thw, merge)
    cu, _ = get_vision_attention_seqlens(thw, visual.config)
    x = visual.patch_embed(pv.type(visual.dtype))
    dim = x.shape[-1]
    full = getattr(visual, "fullatt_block_indexes", None)
    window = None
    cu_window = cu
    if full is not None:
        window, cu_window = get_vision_window_index(thw, merge, visual.window_size,
                                                    visual.patch_size)
        x = x.reshape(-1, unit, dim)[window].reshape(-1, dim)
        pos = pos.reshape(-1, unit, 2)[window].reshape(-1, 2)
    rope = visual.rotary_pos_emb(x, pos)
    depth = len(visual.blocks)
    windowed = [i for i in range(depth) if full is not None and i not in full]
    rebuild = min([depth - 1] + [i - 1 for i in windowed if i > layer])
    frames = [(h, w) for t, h, w in thw.tolist() for _ in range(t)]

    def block(i, h, cu_now, rope_now):
        blk = visual.blocks[i]
        return type(blk).forward(blk, h, cu_seqlens=cu_now, position_embeddings=rope_now)

    for i in range(layer + 1):
        x = block(i, x, cu_window if i in windowed else cu, rope)
    ch, cw = clusters
    start, pieces, lengths, anchors, saved = 0, [], [], [], []
    for h, w in frames:
        rows = pos[start:start + h * w]
        order = torch.argsort(rows[:, 0] * w + rows[:, 1]) + start
        before = x[order].unsqueeze(0)
        if ch * cw < h * w:
            centres, _ = token_clustering(before, (h, w), clusters)
            pieces.append(centres[0].to(x.dtype))
            anchors += [(centre(a, h, ch), centre(b, w, cw)) for a in range(ch) for b in range(cw)]
        else:
            centres = None
            pieces.append(before[0])
            anchors += rows[order - start].tolist()
        lengths.append(pieces[-1].shape[0])
        saved.append((order, before, centres))
        start += h * w
    y = torch.cat(pieces)
    cu_small = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(cu.dtype)
    rope_small = visual.rotary_pos_emb(y, torch.tensor(anchors))
    if seen is not None:
        seen.update(cu=cu_small, rope=rope_small)
    for i in range(layer + 1, rebuild + 1):
        y = block(i, y, cu_small, rope_small)
    at = 0
    for (order, before, centres), n in zip(saved, lengths, strict=True):
        piece = y[at:at + n].unsqueeze(0)
        x[order] = piece[0] if centres is None else token_reconstruction(piece, before,
                                                                           centres)[0]
        at += n
    for i in range(rebuild + 1, depth):
        x = block(i, x, cu_window if i in windowed else cu, rope)
    out = visual.merger(x)
    return out if window is None else out[torch.argsort(window)]


def qwen_reference_logits(model, kw: dict, layer: int, clusters) -> torch.Tensor:
    """The untouched model's logits with its tower's output replaced by :func:`hand_visual`."""
    visual = model.model.visual

    def hook(module, args, kwargs, out):
        pooled = hand_visual(module, args[0], kwargs["grid_thw"], layer, clusters)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state,
                                          pooler_output=pooled)

    handle = visual.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(**kw).logits
    finally:
        handle.remove()


def test_qwen_keep_all_equals_untouched(qwen):
    kw = qwen_inputs(qwen, [0, 1, 2])
    with torch.no_grad():
        ref = qwen(**kw).logits
        with tm.applied(qwen, "expedit", clusters=(12, 12), layer=0):  # 144 >= every frame
            out = qwen(**kw).logits
            run = tm.get_state(qwen).encoder.last
    assert torch.equal(out, ref)
    assert run.traces == []  # nothing was clustered


@pytest.mark.parametrize("clusters", [(3, 3), (4, 6)])  # (4, 6): the 4 x 8 image stays whole
def test_qwen_equals_hand_written_tower(qwen, clusters):
    kw = qwen_inputs(qwen, [0, 1, 2])
    with torch.no_grad():
        untouched = qwen(**kw).logits
        with tm.applied(qwen, "expedit", clusters=clusters, layer=0):
            out = qwen(**kw).logits
            run = tm.get_state(qwen).encoder.last
    ref = qwen_reference_logits(qwen, kw, 0, clusters)
    real = kw["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)
    assert not torch.allclose(out, untouched, atol=1e-3)
    # the block after the clustering gets the clusters' segments and rotary positions (the
    # logits of a tiny random tower are barely sensitive to them: checked directly)
    got, want = {}, {}
    visual = qwen.model.visual
    handle = visual.blocks[1].attn.register_forward_pre_hook(
        lambda _m, _a, k: got.update(cu=k["cu_seqlens"], rope=k["position_embeddings"]),
        with_kwargs=True)
    with torch.no_grad(), tm.applied(qwen, "expedit", clusters=clusters, layer=0):
        visual(kw["pixel_values"], grid_thw=kw["image_grid_thw"])
    handle.remove()
    with torch.no_grad():
        hand_visual(visual, kw["pixel_values"], kw["image_grid_thw"], 0, clusters, want)
    assert torch.equal(got["cu"], want["cu"])
    torch.testing.assert_close(got["rope"], want["rope"], atol=0, rtol=0)
    # the tower ran on the clusters of every frame (frames of 96, 64, 32 patches)
    n = clusters[0] * clusters[1]
    small = [n if n < p else p for p in (96, 64, 32)]
    step = run.traces[0]
    assert step.sizes.shape == (1, sum(small))
    assert float(step.sizes.sum()) == 96 + 64 + 32
    assert run.current.sizes is None  # the grid was rebuilt


def test_qwen_generate_equals_hand_written_tower():
    model = tiny_qwen("qwen2.5")
    kw = qwen_inputs(model, [0, 1])
    gen = checks.gen_kwargs(4)
    with torch.no_grad(), tm.applied(model, "expedit", clusters=(3, 3), layer=0):
        out = model.generate(**kw, **gen)
    visual = model.model.visual

    def hook(module, args, kwargs, result):
        pooled = hand_visual(module, args[0], kwargs["grid_thw"], 0, (3, 3))
        return BaseModelOutputWithPooling(last_hidden_state=result.last_hidden_state,
                                          pooler_output=pooled)

    handle = visual.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = model.generate(**kw, **gen)
    finally:
        handle.remove()
    assert torch.equal(out, ref)


def test_qwen_batch_equals_single_images(qwen):
    case = checks.Family(inputs=qwen_inputs, reference=None,  # type: ignore[arg-type]
                         options={"expedit": {"clusters": (3, 3), "layer": 0}})
    for side in ("left", "right"):
        checks.batch_equals_single_samples(case, qwen, "expedit", None, side)


def test_qwen_video_frames_are_clustered_one_by_one():
    """A video is one segment per frame (t = 2): each frame is clustered on its own."""
    model = tiny_qwen("qwen2")
    g = torch.Generator().manual_seed(3)
    pv = torch.randn(2 * 8 * 8, 3 * 2 * 2 * 2, generator=g)
    thw = torch.tensor([[2, 8, 8]])
    visual = model.model.visual
    with torch.no_grad():
        with tm.applied(model, "expedit", clusters=(2, 2), layer=0):
            out = visual(pv, grid_thw=thw).pooler_output
            run = tm.get_state(model).encoder.last
        ref = hand_visual(visual, pv, thw, 0, (2, 2))
    assert run.traces[0].sizes.shape == (1, 8)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_qwen_remove_restores_exactly(qwen):
    kw = qwen_inputs(qwen, [0, 1, 2])
    blocks = qwen.model.visual.blocks
    hooks = [len(b._forward_hooks) for b in blocks] + [len(qwen.model.visual._forward_pre_hooks)]
    with torch.no_grad():
        ref = qwen(**kw).logits
        ts.apply(qwen, "expedit", clusters=(3, 3), layer=0)
        assert not torch.equal(qwen(**kw).logits, ref)
        ts.remove(qwen)
        out = qwen(**kw).logits
    assert torch.equal(out, ref)
    assert all("forward" not in b.__dict__ for b in blocks)
    assert hooks == [len(b._forward_hooks) for b in blocks] + [
        len(qwen.model.visual._forward_pre_hooks)]


def test_qwen_refusals():
    q25 = tiny_qwen("qwen2.5")  # blocks 0 and 2 windowed, block 1 full attention
    with pytest.raises(ValueError, match=r"layer 2 of this tower attends within windows.*\[0\]"):
        ts.apply(q25, "expedit", clusters=4, layer=1)
    assert not tm.is_applied(q25)
    for method, kw in (("tome", {"r": 2}), ("evit", {})):
        with pytest.raises(ValueError, match="2x2 patch merger"):
            ts.apply(tiny_qwen("qwen2"), method, **kw)


# -- Idefics3 / SmolVLM ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def idefics(request):
    return tiny_idefics(request.param)


def hand_crops(vision, pv: torch.Tensor, patch_mask: torch.Tensor, layer: int,
               clusters: int) -> torch.Tensor:
    """The per-crop tower by hand: SigLIP-style layers, the 8 x 8 patches clustered after
    ``layer``, the rest on the clusters, the grid rebuilt, the post-layernorm."""
    x = vision.embeddings(pixel_values=pv, patch_attention_mask=patch_mask)
    q = math.isqrt(clusters)
    for i, lay in enumerate(vision.encoder.layers):
        x = type(lay).forward(lay, x, None)
        if i == layer:
            before = x
            centres, _ = token_clustering(x, (8, 8), (q, q))
            x = centres.to(x.dtype)
    x = token_reconstruction(x, before, centres)
    return vision.post_layernorm(x)


def test_idefics_keep_all_equals_untouched(idefics):
    kw = idefics_inputs(idefics, [0, 1, 2])
    with torch.no_grad():
        ref = idefics(**kw).logits
        with tm.applied(idefics, "expedit", clusters=64, layer=0):
            out = idefics(**kw).logits
    assert torch.equal(out, ref)


def test_idefics_equals_hand_written_tower(idefics):
    kw = idefics_inputs(idefics, [0, 1, 2])
    with torch.no_grad():
        untouched = idefics(**kw).logits
        with tm.applied(idefics, "expedit", clusters=9, layer=0):
            out = idefics(**kw).logits
            run = tm.get_state(idefics).encoder.last
    vision = idefics.model.vision_model

    def hook(module, args, kwargs, result):
        hidden = hand_crops(module, kwargs["pixel_values"], kwargs["patch_attention_mask"], 0, 9)
        return BaseModelOutputWithPooling(last_hidden_state=hidden)

    handle = vision.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = idefics(**kw).logits
    finally:
        handle.remove()
    real = kw["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)
    assert not torch.allclose(out, untouched, atol=1e-3)
    assert run.traces[0].sizes.shape == (3, 9)  # three real crops, 9 clusters each


def test_idefics_batch_equals_single_samples(idefics):
    case = checks.Family(inputs=idefics_inputs, reference=None,  # type: ignore[arg-type]
                         options={"expedit": {"clusters": 9, "layer": 0}})
    for side in ("left", "right"):
        checks.batch_equals_single_samples(case, idefics, "expedit", None, side)


def test_idefics_remove_restores_exactly(idefics):
    kw = idefics_inputs(idefics, [0, 1, 2])
    layers = idefics.model.vision_model.encoder.layers
    with torch.no_grad():
        ref = idefics(**kw).logits
        ts.apply(idefics, "expedit", clusters=9, layer=0)
        assert not torch.equal(idefics(**kw).logits, ref)
        ts.remove(idefics)
        out = idefics(**kw).logits
    assert torch.equal(out, ref)
    assert all("forward" not in lay.__dict__ and not lay._forward_hooks for lay in layers)


def test_idefics_padded_crop_refused(idefics):
    kw = idefics_inputs(idefics, [1])
    pam = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    pam[..., 24:] = False  # the last two patch columns are padding
    kw["pixel_attention_mask"] = pam
    with tm.applied(idefics, "expedit", clusters=9, layer=0), torch.no_grad():
        with pytest.raises(ValueError, match="padding mask"):
            idefics(**kw)
    with torch.no_grad():  # an all-real mask is no padding: it runs
        kw["pixel_attention_mask"] = torch.ones(1, 1, 32, 32, dtype=torch.bool)
        ref = idefics(**kw).logits
        with tm.applied(idefics, "expedit", clusters=64, layer=0):
            assert torch.equal(idefics(**kw).logits, ref)


def test_idefics_other_methods_stay_refused(idefics):
    with pytest.raises(ValueError, match="pixel shuffle"):
        ts.apply(idefics, "tome", r=2)
