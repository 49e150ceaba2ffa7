"""tokensieve.apply on tiny random Qwen2-VL and Qwen2.5-VL models (M-RoPE, 2x2 merger,
window attention in 2.5, images of different sizes).

References are computed another way: the untouched model runs on a sequence the test
prunes by hand (its own merged image features at the kept indices, the untouched
``get_rope_index`` positions of the kept columns), and attention received is recomputed
from eager attention weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AttentionInterface,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward

import tokensieve.models as tm

IMG, VID, VS, VE = 60, 61, 58, 59
ATOL = 1e-5
# HiPrune's official object layer (16 of Qwen2.5-VL's 32 blocks) does not exist in a tiny
# tower: read block 0 and the feature block instead.
LAYERS = {"hiprune": {"signal_layers": (0, "feature")}}
FAMILIES = ["qwen2", "qwen2.5"]


def tiny_qwen(family: str, seed: int = 0):
    torch.manual_seed(seed)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                 "rope_theta": 10000.0},
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
               vision_end_token_id=VE)
    if family == "qwen2":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=2,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, mlp_ratio=2)
        return Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(vision_config=vision, text_config=text, **ids)).eval()
    vision = dict(depth=3, hidden_size=32, out_hidden_size=32, num_heads=4, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  intermediate_size=64, window_size=8, fullatt_block_indexes=[1])
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_qwen(request.param)


GRIDS = [(1, 8, 12), (1, 8, 8), (1, 4, 8)]  # patches; merged tokens: 24, 16, 8


def n_tokens(grid) -> int:
    return grid[0] * grid[1] * grid[2] // 4


def prompt(texts: list[list[int]], grids: list[tuple[int, int, int]]) -> list[int]:
    out: list[int] = []
    for i, chunk in enumerate(texts):
        if i:
            out += [VS] + [IMG] * n_tokens(grids[i - 1]) + [VE]
        out += chunk
    return out


def pixels(grids) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Flattened patches of the images (each image's pixels depend on its grid only, so a
    sample run alone sees the same images as in the batch)."""
    parts = [torch.randn(t * h * w, 3 * 2 * 2 * 2,
                         generator=torch.Generator().manual_seed(100 * h + w))
             for t, h, w in grids]
    if not parts:
        return None, None
    return torch.cat(parts), torch.tensor(grids)


def batch(rows: list[list[int]], side: str = "left"):
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def inputs(rows, grids, side="left"):
    ids, mask = batch(rows, side)
    pv, thw = pixels(grids)
    kw = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).int())
    if pv is not None:
        kw.update(pixel_values=pv, image_grid_thw=thw)
    return kw


ROW_GRIDS = [[GRIDS[0]], [GRIDS[1], GRIDS[2]], []]
ROWS = [prompt([[1, 5, 6], [7, 8, 9]], ROW_GRIDS[0]),
        prompt([[1, 11], [12], [13, 14]], ROW_GRIDS[1]),
        [1, 15, 16, 17, 18, 19]]
ALL_GRIDS = [g for gs in ROW_GRIDS for g in gs]


@torch.no_grad()
def hand_pruned(model, kw, kept: list[torch.Tensor] | None):
    """Untouched-model inputs for the hand-pruned batch: (embeds, mask, position_ids [3,B,T'])."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = list(model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])
                 .pooler_output)
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=kw["mm_token_type_ids"],
                                        image_grid_thw=kw["image_grid_thw"], attention_mask=mask)
    emb = model.get_input_embeddings()(ids)
    rows, img = [], 0
    for b in range(ids.shape[0]):
        cols, vecs, t = [], [], 0
        while t < ids.shape[1]:
            if mask[b, t] == 0:
                t += 1
                continue
            if ids[b, t] == IMG:
                k = torch.arange(feats[img].shape[0]) if kept is None else kept[img]
                cols += (t + k).tolist()
                vecs.append(feats[img][k])
                t += feats[img].shape[0]
                img += 1
            else:
                cols.append(t)
                vecs.append(emb[b, t:t + 1])
                t += 1
        rows.append((cols, torch.cat(vecs)))
    n = max(len(c) for c, _ in rows)
    embeds = torch.zeros(len(rows), n, emb.shape[-1])
    new_mask = torch.zeros(len(rows), n, dtype=torch.long)
    new_pos = torch.zeros(3, len(rows), n, dtype=torch.long)
    for b, (cols, vec) in enumerate(rows):
        embeds[b, n - len(cols):] = vec
        new_mask[b, n - len(cols):] = 1
        new_pos[:, b, n - len(cols):] = pos[:, b, cols]
    return embeds, new_mask, new_pos


def kept_indices(model):
    return [r.indices[0] for r, _ in tm.last_reductions(model)]


# (a) keep everything ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["random", "divprune", "hiprune"])
def test_keep_all_equals_untouched(model, method):
    kw = inputs(ROWS, ALL_GRIDS)
    with torch.no_grad():
        ref = model(**kw).logits
        with tm.applied(model, method, 1.0, **LAYERS.get(method, {})):
            out = model(**kw).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# (b) pruning == untouched model on the hand-pruned sequence ----------------------------------
@pytest.mark.parametrize("method,keep", [("divprune", 6), ("random", 0.5), ("hiprune", 5)])
def test_pruned_equals_hand_pruned(model, method, keep):
    kw = inputs(ROWS, ALL_GRIDS)
    with tm.applied(model, method, keep, **LAYERS.get(method, {})), torch.no_grad():
        out = model(**kw).logits
        kept = kept_indices(model)
    embeds, mask, pos = hand_pruned(model, kw, kept)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    assert out.shape == ref.shape
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_vision_features_follow_raster_order(model):
    """hiprune reduces the merger's pre-MLP features: its kept tokens must be the untouched
    merged tokens at the kept indices (checks the window-order undo of Qwen2.5-VL)."""
    kw = inputs(ROWS[:1], ROW_GRIDS[0])
    with tm.applied(model, "hiprune", 7, **LAYERS["hiprune"]), torch.no_grad():
        model(**kw)
        (r, grid), = tm.last_reductions(model)
        merged = model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])
        feats = model.model.visual.merger.mlp(r.tokens)[0]
    assert grid == (4, 6)
    torch.testing.assert_close(feats, merged.pooler_output[0][r.indices[0]], atol=ATOL, rtol=0)


_CAPTURED: list[torch.Tensor] = []


def _capturing_eager(module, q, k, v, attention_mask, **kw):
    out, weights = eager_attention_forward(module, q, k, v, attention_mask, **kw)
    _CAPTURED.append(weights.detach())
    return out, weights


def test_attn_received_equals_eager_attention(model):
    """Attention received recomputed from SDPA-time q/k equals the eager weights' column
    means of the signal block (summed over each 2x2 group)."""
    AttentionInterface.register("tokensieve_test_eager", _capturing_eager)
    grid = GRIDS[0]
    kw = inputs(ROWS[:1], [grid])
    eager = copy.deepcopy(model)
    eager.model.visual.config._attn_implementation = "tokensieve_test_eager"
    _CAPTURED.clear()
    with torch.no_grad():
        eager.model.visual(kw["pixel_values"], grid_thw=kw["image_grid_thw"])
    visual = model.model.visual
    s = kw["pixel_values"].shape[0]
    # Every block gives one [1, H, n, n] chunk per attention segment (the image, or each
    # window of a window-attention block), in the tower's (window) order.
    per_block, cols, done = [], [], 0
    for w in _CAPTURED:
        cols.append(w.sum(dim=(1, 2))[0])
        done += w.shape[-1]
        if done == s:
            per_block.append(torch.cat(cols) / (w.shape[1] * s))
            cols, done = [], 0
    assert len(per_block) == len(visual.blocks)
    feature = max(getattr(visual, "fullatt_block_indexes", None) or [len(visual.blocks) - 1])
    recv = torch.stack([per_block[0], per_block[feature]])
    if hasattr(visual, "window_size"):
        from transformers.vision_utils import get_vision_window_index

        order, _ = get_vision_window_index(kw["image_grid_thw"], spatial_merge_size=2,
                                           window_size=visual.window_size,
                                           patch_size=visual.patch_size)
        recv = recv.reshape(2, -1, 4)[:, torch.argsort(order)].reshape(2, -1)
    expect = recv.reshape(2, -1, 4).sum(-1)
    seen = {}

    def spy(tokens, k, signals, config, generator):
        seen["attn"] = signals.attn_received
        return original(tokens, k, signals, config, generator)

    from tokensieve.core import registry

    spec = registry.get_method("hiprune")
    original = spec.fn
    registry._REGISTRY["hiprune"] = spec.__class__(**{**spec.__dict__, "fn": spy})
    try:
        with tm.applied(model, "hiprune", 6, signal_layers=(0, "feature")), torch.no_grad():
            model(**kw)
    finally:
        registry._REGISTRY["hiprune"] = spec
    assert seen["attn"].shape == (1, 2, n_tokens(grid))
    torch.testing.assert_close(seen["attn"][0].float(), expect.float(), atol=1e-5, rtol=1e-4)


# (c) generate -------------------------------------------------------------------------------
def test_generate_matches_hand_pruned(model):
    kw = inputs(ROWS, ALL_GRIDS)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with tm.applied(model, "divprune", 5), torch.no_grad():
        out = model.generate(**kw, **gen)
        kept = kept_indices(model)
    ids = kw["input_ids"]
    assert torch.equal(out[:, :ids.shape[1]], ids)
    embeds, mask, pos = hand_pruned(model, kw, kept)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, **gen)
    assert torch.equal(out[:, ids.shape[1]:], ref)


def test_generate_keep_all_equals_untouched(model):
    kw = inputs(ROWS, ALL_GRIDS)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(**kw, **gen)
        with tm.applied(model, "divprune", 1.0):
            out = model.generate(**kw, **gen)
    assert torch.equal(out, ref)


# (d) remove ---------------------------------------------------------------------------------
def test_remove_restores_exactly(model):
    kw = inputs(ROWS, ALL_GRIDS)
    keys = set(model.__dict__)
    with torch.no_grad():
        ref = model(**kw).logits
        tm.apply(model, "divprune", 4)
        assert model(**kw).logits.shape != ref.shape
        tm.remove(model)
        out = model(**kw).logits
    assert torch.equal(out, ref)
    assert set(model.__dict__) == keys


# (e) padded batch == one by one ---------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(model, side):
    kw = inputs(ROWS, ALL_GRIDS, side)
    with tm.applied(model, "hiprune", 0.5, **LAYERS["hiprune"]), torch.no_grad():
        out = model(**kw).logits
        for i, (r, grids) in enumerate(zip(ROWS, ROW_GRIDS, strict=True)):
            one = model(**inputs([r], grids)).logits[0]
            row = out[i, -one.shape[0]:] if side == "left" else out[i, :one.shape[0]]
            torch.testing.assert_close(row, one, atol=1e-4, rtol=0)


def test_batch_generate_equals_single(model):
    kw = inputs(ROWS, ALL_GRIDS)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with tm.applied(model, "divprune", 0.25), torch.no_grad():
        out = model.generate(**kw, **gen)
        for i, (r, grids) in enumerate(zip(ROWS, ROW_GRIDS, strict=True)):
            one = model.generate(**inputs([r], grids), **gen)
            assert torch.equal(out[i, kw["input_ids"].shape[1]:], one[0, len(r):])


# (f) errors ---------------------------------------------------------------------------------
def test_errors(model):
    with pytest.raises(ValueError, match="cls_attn"):
        tm.apply(model, "fastervlm", 8)
    with pytest.raises(ValueError, match="partitions"):
        tm.apply(model, "hired", 8)
    with pytest.raises(ValueError, match="layer 16 is not an encoder layer"):
        tm.apply(model, "hiprune", 8)  # official object layer 16 > the tiny tower's depth
    tm.apply(model, "divprune", 9)
    try:
        kw = inputs(ROWS[:1], ROW_GRIDS[0])
        with torch.no_grad(), pytest.raises(ValueError, match=r"keep=9.*8 visual"):
            model(**inputs(ROWS[1:2], ROW_GRIDS[1]))  # its 4x8 image has 8 tokens
        with torch.no_grad(), pytest.raises(ValueError, match="image_grid_thw"):
            model(**{k: v for k, v in kw.items() if k != "image_grid_thw"})
    finally:
        tm.remove(model)


def test_labels_and_second_turn(model):
    """Labels are cut with the sequence; a second turn re-sending the history (with its
    image) continues from the same M-RoPE positions as the hand-pruned reference."""
    kw = inputs(ROWS[:1], ROW_GRIDS[0])
    labels = kw["input_ids"].masked_fill(kw["input_ids"] == IMG, -100)
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with tm.applied(model, "divprune", 7), torch.no_grad():
        loss = model(**kw, labels=labels).loss
        kept = kept_indices(model)
        first = model.generate(**kw, **gen)
        history = first[0].tolist() + [20, 21]
        kw2 = inputs([history], ROW_GRIDS[0])
        second = model.generate(**kw2, **gen)
        kept2 = kept_indices(model)
    embeds, mask, pos = hand_pruned(model, kw, kept)
    text = [t for t in ROWS[0] if t != IMG]  # [1, 5, 6, VS, VE, 7, 8, 9]
    ref_labels = torch.tensor([text[:4] + [-100] * 7 + text[4:]])
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                    labels=ref_labels).loss
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0)
    assert second[0, :len(history)].tolist() == history
    embeds, mask, pos = hand_pruned(model, kw2, kept2)
    with torch.no_grad():
        ref2 = model.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, **gen)
    assert torch.equal(second[0, len(history):], ref2[0])
