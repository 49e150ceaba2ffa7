"""tokensieve.apply on tiny random Qwen2-VL and Qwen2.5-VL models (M-RoPE, 2x2 merger,
window attention in 2.5, images of different sizes).

References are computed another way: the untouched model runs on a sequence the test
prunes by hand (its own merged image features at the kept indices, the untouched
``get_rope_index`` positions of the kept columns), and attention received is recomputed
from eager attention weights. The checks themselves are shared (tests/model_checks.py).
"""

from __future__ import annotations

import copy

import model_checks as checks
import pytest
import torch
from model_refs import kept_indices, splice_left_padded
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
# HiPrune's official object layer (16 of Qwen2.5-VL's 32 blocks) does not exist in a tiny
# tower: read block 0 and the feature block instead.
LAYERS = {"hiprune": {"signal_layers": (0, "feature")}}
FAMILIES = ["qwen2", "qwen2.5"]


def tiny_qwen(family: str, seed: int = 0, text_layers: int = 2):
    torch.manual_seed(seed)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
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
    return checks.interleave(texts, [[VS] + [IMG] * n_tokens(g) + [VE] for g in grids])


def pixels(grids) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Flattened patches of the images (each image's pixels depend on its grid only, so a
    sample run alone sees the same images as in the batch)."""
    parts = [torch.randn(t * h * w, 3 * 2 * 2 * 2,
                         generator=torch.Generator().manual_seed(100 * h + w))
             for t, h, w in grids]
    if not parts:
        return None, None
    return torch.cat(parts), torch.tensor(grids)


def encode(rows, grids, side="left") -> dict:
    ids, mask = checks.pad_rows(rows, side)
    pv, thw = pixels(grids)
    kw = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).int())
    if pv is not None:
        kw.update(pixel_values=pv, image_grid_thw=thw)
    return kw


ROW_GRIDS = [[GRIDS[0]], [GRIDS[1], GRIDS[2]], []]
ROWS = [prompt([[1, 5, 6], [7, 8, 9]], ROW_GRIDS[0]),
        prompt([[1, 11], [12], [13, 14]], ROW_GRIDS[1]),
        [1, 15, 16, 17, 18, 19]]


def inputs(model, samples: list[int], side: str = "left") -> dict:
    return encode([ROWS[s] for s in samples], [g for s in samples for g in ROW_GRIDS[s]], side)


@torch.no_grad()
def hand_pruned(model, kw, kept: list[torch.Tensor]) -> dict:
    """Untouched-model inputs for the hand-pruned batch, with the untouched M-RoPE positions
    of the kept columns (position_ids [3, B, T'])."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    feats = list(model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])
                 .pooler_output)
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=kw["mm_token_type_ids"],
                                        image_grid_thw=kw["image_grid_thw"], attention_mask=mask)
    emb = model.get_input_embeddings()(ids)
    pieces = [f[k] for f, k in zip(feats, kept, strict=True)]
    embeds, new_mask, source = splice_left_padded(ids, mask, emb, IMG, pieces,
                                                  [f.shape[0] for f in feats], kept)
    new_pos = torch.stack([pos[:, b, source[b]] for b in range(ids.shape[0])], 1) * new_mask
    return dict(inputs_embeds=embeds, attention_mask=new_mask, position_ids=new_pos)


CASE = checks.Family(inputs=inputs, reference=hand_pruned, options=LAYERS)


# (a) keep everything ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["random", "divprune", "hiprune"])
def test_keep_all_equals_untouched(model, method):
    checks.keep_all_equals_untouched(CASE, model, method, 1.0)


# (b) pruning == untouched model on the hand-pruned sequence ----------------------------------
@pytest.mark.parametrize("method,keep", [("divprune", 6), ("random", 0.5), ("hiprune", 5)])
def test_pruned_equals_hand_pruned(model, method, keep):
    checks.pruned_equals_hand_pruned(CASE, model, method, keep)


def test_vision_features_follow_raster_order(model):
    """hiprune reduces the merger's pre-MLP features: its kept tokens must be the untouched
    merged tokens at the kept indices (checks the window-order undo of Qwen2.5-VL)."""
    kw = inputs(model, [0])
    with tm.applied(model, "hiprune", 7, **LAYERS["hiprune"]), torch.no_grad():
        model(**kw)
        (r, grid), = tm.last_reductions(model)
        merged = model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"])
        feats = model.model.visual.merger.mlp(r.tokens)[0]
    assert grid == (4, 6)
    torch.testing.assert_close(feats, merged.pooler_output[0][r.indices[0]], atol=checks.ATOL,
                               rtol=0)


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
    kw = encode(ROWS[:1], [grid])
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
    seen = checks.signal_seen(model, kw, "hiprune", 6, "attn_received",
                              signal_layers=(0, "feature"))
    assert seen.shape == (1, 2, n_tokens(grid))
    torch.testing.assert_close(seen[0].float(), expect.float(), atol=1e-5, rtol=1e-4)


# (c) generate -------------------------------------------------------------------------------
def test_generate_matches_hand_pruned(model):
    checks.generate_matches_hand_pruned(CASE, model, "divprune", 5)


def test_generate_keep_all_equals_untouched(model):
    checks.generate_keep_all_equals_untouched(CASE, model, "divprune", 1.0)


# (d) remove ---------------------------------------------------------------------------------
def test_remove_restores_exactly(model):
    checks.remove_restores_exactly(CASE, model, "divprune", 4)


# (e) padded batch == one by one ---------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(model, side):
    checks.batch_equals_single_samples(CASE, model, "hiprune", 0.5, side)


def test_batch_generate_equals_single(model):
    checks.batch_generate_equals_single(CASE, model, "divprune", 0.25)


# (f) errors ---------------------------------------------------------------------------------
def test_errors(model):
    checks.apply_refused(model, "fastervlm", 8, "cls_attn")
    checks.apply_refused(model, "hired", 8, "partitions")
    # official object layer 16 > the tiny tower's depth
    checks.apply_refused(model, "hiprune", 8, "layer 16 is not an encoder layer")
    tm.apply(model, "divprune", 9)
    try:  # the model stays patched and usable after an error in a call
        kw = inputs(model, [0])
        with torch.no_grad(), pytest.raises(ValueError, match=r"keep=9.*8 visual"):
            model(**inputs(model, [1]))  # its 4x8 image has 8 tokens
        with torch.no_grad(), pytest.raises(ValueError, match="image_grid_thw"):
            model(**{k: v for k, v in kw.items() if k != "image_grid_thw"})
    finally:
        tm.remove(model)


def test_labels_and_second_turn(model):
    """Labels are cut with the sequence; a second turn re-sending the history (with its
    image) continues from the same M-RoPE positions as the hand-pruned reference."""
    kw = inputs(model, [0])
    labels = kw["input_ids"].masked_fill(kw["input_ids"] == IMG, -100)
    gen = checks.gen_kwargs(3)
    with tm.applied(model, "divprune", 7), torch.no_grad():
        loss = model(**kw, labels=labels).loss
        kept = kept_indices(model)
        first = model.generate(**kw, **gen)
        history = first[0].tolist() + [20, 21]
        kw2 = encode([history], ROW_GRIDS[0])
        second = model.generate(**kw2, **gen)
        kept2 = kept_indices(model)
    text = [t for t in ROWS[0] if t != IMG]  # [1, 5, 6, VS, VE, 7, 8, 9]
    ref_labels = torch.tensor([text[:4] + [-100] * 7 + text[4:]])
    with torch.no_grad():
        ref = model(**hand_pruned(model, kw, kept), labels=ref_labels).loss
    torch.testing.assert_close(loss, ref, atol=checks.ATOL, rtol=0)
    assert second[0, :len(history)].tolist() == history
    with torch.no_grad():
        ref2 = model.generate(**hand_pruned(model, kw2, kept2), **gen)
    assert torch.equal(second[0, len(history):], ref2[0])
