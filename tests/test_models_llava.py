"""tokensieve.apply on a tiny random LlavaForConditionalGeneration (LLaVA-1.5 layout).

References are computed another way: the untouched model is run on a sequence the test
prunes by hand (its own image features, gathered at the reduction's indices, spliced into
the prompt embeddings), CLS attention is recomputed with eager attention.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_checks import interleave, pad_rows, signal_seen
from model_refs import kept_indices
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import tokensieve as ts
import tokensieve.models as tm

IMG = 60  # image placeholder id
SIDE = 7  # 28 px / 4 px patches
N = SIDE * SIDE
ATOL = 1e-5


def tiny_llava(strategy: str = "default", seed: int = 0,
               text_layers: int = 2) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=28, patch_size=4,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy,
                      image_seq_length=N + (strategy == "full"))
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def prompt(texts: list[list[int]], n_img: int = N) -> list[int]:
    """Text chunks separated by one image each: [t0, <img>*n, t1, <img>*n, ..., tk]."""
    return interleave(texts, [[IMG] * n_img] * (len(texts) - 1))


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hand_pruned(model, rows: list[list[int]], pv: torch.Tensor, kept: list[torch.Tensor] | None,
                n_img: int = N):
    """Untouched LM inputs: each image's projected features at ``kept[i]`` (all when None)
    spliced into the prompt's embeddings; left-padded. Returns (embeds, mask, ids)."""
    feats = list(model.model.get_image_features(pixel_values=pv).pooler_output)
    emb = model.get_input_embeddings()
    seqs, id_rows, img = [], [], 0
    for r in rows:
        parts, ids, i = [], [], 0
        while i < len(r):
            if r[i] == IMG:
                f = feats[img] if kept is None else feats[img][kept[img]]
                parts.append(f)
                ids += [IMG] * f.shape[0]
                img += 1
                i += n_img
            else:
                parts.append(emb(torch.tensor([r[i]])))
                ids.append(r[i])
                i += 1
        seqs.append(torch.cat(parts))
        id_rows.append(ids)
    t = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(len(seqs), t, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        embeds[i, t - s.shape[0]:] = s
        mask[i, t - s.shape[0]:] = 1
    return embeds, mask, id_rows


ROWS = [prompt([[1, 5, 6], [7, 8, 9, 10]]),
        prompt([[1, 11], [12], [13, 14]]),     # two images
        [1, 15, 16, 17, 18]]                    # text only


# (a) keep everything -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastervlm", "random", "uniform"])
def test_keep_all_equals_untouched(model, method):
    ids, mask = pad_rows(ROWS[:2])
    pv = images(3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        with tm.applied(model, method, N):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
            frac = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(frac, ref, atol=ATOL, rtol=0)


def test_keep_fraction_one_equals_untouched(model):
    ids, mask = pad_rows(ROWS[:1])
    pv = images(1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        with tm.applied(model, "fastervlm", 1.0):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# signals: CLS attention from q/k equals eager attention ---------------------------------------
def test_fastervlm_keeps_top_eager_cls_attention(model):
    pv = images(2)
    ids, mask = pad_rows(ROWS[:1] * 2)
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(pv, output_attentions=True).attentions  # per layer [I, H, 1+N, 1+N]
    layer = len(att) - 2  # hidden_states[-2] is the output of layer L-2
    scores = att[layer][:, :, 0, 1:].mean(1)
    expect = torch.sort(torch.topk(scores, 12, dim=1).indices, dim=1).values
    with tm.applied(model, "fastervlm", 12), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)
        got = torch.stack(kept_indices(model))
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    assert torch.equal(got, expect)


# (b) pruning equals the untouched model on a hand-pruned sequence ----------------------------
@pytest.mark.parametrize("method,keep", [("fastervlm", 12), ("random", 20), ("uniform", 16)])
def test_pruned_equals_hand_pruned(model, method, keep):
    rows = ROWS[:2]
    ids, mask = pad_rows(rows)
    pv = images(3)
    with tm.applied(model, method, keep), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        kept = kept_indices(model)
    assert all(k.shape == (keep,) for k in kept)
    embeds, hmask, _ = hand_pruned(model, rows, pv, kept)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=hmask).logits
    assert out.shape == ref.shape
    real = hmask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_labels_follow_the_cut(model):
    rows = ROWS[:2]
    ids, mask = pad_rows(rows)
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    pv = images(3)
    with tm.applied(model, "fastervlm", 10), torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels).loss
        kept = kept_indices(model)
    embeds, hmask, id_rows = hand_pruned(model, rows, pv, kept)
    hl = torch.full(hmask.shape, -100)
    for i, r in enumerate(id_rows):
        hl[i, hmask.shape[1] - len(r):] = torch.tensor(r)
    hl = hl.masked_fill(hl == IMG, -100)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=hmask, labels=hl).loss
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0)


def test_visionzip_keeps_cls_and_merges_before_projector(model):
    rows = ROWS[:1]
    ids, mask = pad_rows(rows)
    pv = images(1)
    with tm.applied(model, "visionzip", 16), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        (r, _), = tm.last_reductions(model)
    # The method saw CLS + 49 patch tokens of the feature layer: CLS (index 0) is kept first.
    assert r.tokens.shape[1] == 16 and int(r.indices[0, 0]) == 0
    hidden = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-2]
    feats = model.model.multi_modal_projector(r.tokens)
    emb = model.get_input_embeddings()
    text = rows[0]
    start = text.index(IMG)
    seq = torch.cat([emb(torch.tensor(text[:start])), feats[0],
                     emb(torch.tensor(text[start + N:]))])[None]
    with torch.no_grad():
        ref = model(inputs_embeds=seq).logits
        dominant = hidden[0, r.indices[0]]
    torch.testing.assert_close(r.tokens[0, :r.indices.shape[1]], dominant, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# (c) generate ------------------------------------------------------------------------------
def test_generate_matches_hand_pruned(model):
    rows = ROWS
    ids, mask = pad_rows(rows)
    pv = images(3)
    with tm.applied(model, "fastervlm", 8), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv,
                             max_new_tokens=6, do_sample=False, pad_token_id=0)
        kept = kept_indices(model)
    assert torch.equal(out[:, :ids.shape[1]], ids), "sequences start with the caller's prompt"
    embeds, hmask, _ = hand_pruned(model, rows, pv, kept)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=embeds, attention_mask=hmask, max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, ids.shape[1]:], ref)


def test_generate_with_dict_output_and_max_length(model):
    ids, mask = pad_rows(ROWS[:1])
    pv = images(1)
    with tm.applied(model, "uniform", 9), torch.no_grad():
        a = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, do_sample=False,
                           max_new_tokens=4, return_dict_in_generate=True, pad_token_id=0)
        b = model.generate(ids, attention_mask=mask, pixel_values=pv, do_sample=False,
                           max_length=ids.shape[1] + 4, pad_token_id=0)
    assert torch.equal(a.sequences, b)
    assert a.sequences.shape[1] == ids.shape[1] + 4


# (d) remove restores the untouched model exactly ---------------------------------------------
def test_remove_restores_exactly(model):
    ids, mask = pad_rows(ROWS)
    pv = images(3)
    before = dict(model.__dict__)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv,
                             max_new_tokens=3, do_sample=False, pad_token_id=0)
        tm.apply(model, "fastervlm", 5)
        assert tm.is_applied(model)
        assert model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits.shape != ref.shape
        ts.remove(model)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        gen2 = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv,
                              max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref) and torch.equal(gen, gen2)
    assert dict(model.__dict__).keys() == before.keys()
    assert not tm.is_applied(model)
    assert ts.remove(model) is model  # no-op when not patched


def test_context_manager_removes_on_error(model):
    with pytest.raises(RuntimeError), tm.applied(model, "random", 10):
        raise RuntimeError("boom")
    assert not tm.is_applied(model)


def test_remove_keeps_foreign_instance_attributes(model):
    def own_forward(*a, **k):
        return type(model).forward(model, *a, **k)

    model.forward = own_forward
    try:
        tm.apply(model, "random", 10)
        assert model.forward is not own_forward
        tm.remove(model)
        assert model.__dict__["forward"] is own_forward
    finally:
        del model.forward


# (e) batches: padded batch == samples one by one -----------------------------------------------
def _split_images(rows):
    counts = [r.count(IMG) // N for r in rows]
    pv = images(sum(counts))
    per, start = [], 0
    for c in counts:
        per.append(pv[start:start + c] if c else None)
        start += c
    return pv, per


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(model, side):
    rows = ROWS
    pv, per = _split_images(rows)
    ids, mask = pad_rows(rows, side)
    with tm.applied(model, "fastervlm", 6), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        plan_valid = out.new_ones(out.shape[:2], dtype=torch.bool)
        for i, r in enumerate(rows):
            one = model(input_ids=torch.tensor([r]), pixel_values=per[i]).logits[0]
            row = out[i]
            real = row[-one.shape[0]:] if side == "left" else row[:one.shape[0]]
            torch.testing.assert_close(real, one, atol=1e-4, rtol=0)
    assert plan_valid.all()


def test_batch_generate_equals_single(model):
    rows = ROWS
    pv, per = _split_images(rows)
    ids, mask = pad_rows(rows)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with tm.applied(model, "fastervlm", 6), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **kw)
        for i, r in enumerate(rows):
            extra = {} if per[i] is None else {"pixel_values": per[i]}
            one = model.generate(input_ids=torch.tensor([r]), **extra, **kw)
            assert torch.equal(out[i, ids.shape[1]:], one[0, len(r):])


def test_second_turn_resends_history(model):
    first = prompt([[1, 5, 6], [7]])
    pv = images(1)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with tm.applied(model, "fastervlm", 10), torch.no_grad():
        ans = model.generate(input_ids=torch.tensor([first]), pixel_values=pv, **kw)
        history = ans[0].tolist() + [20, 21]
        second = model.generate(input_ids=torch.tensor([history]), pixel_values=pv, **kw)
        kept = kept_indices(model)
    assert second[0, :len(history)].tolist() == history
    embeds, hmask, _ = hand_pruned(model, [history], pv, kept)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=embeds, attention_mask=hmask, **kw)
    assert torch.equal(second[0, len(history):], ref[0])


def test_text_only_call_runs_untouched(model):
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with tm.applied(model, "fastervlm", 4):
            out = model(input_ids=ids).logits
    assert torch.equal(out, ref)


def test_inputs_embeds_with_pixel_values(model):
    rows = ROWS[:1]
    ids, mask = pad_rows(rows)
    pv = images(1)
    with tm.applied(model, "fastervlm", 10), torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                  pixel_values=pv).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_text_signal_for_cdpruner(model):
    if "cdpruner" not in ts.list_methods():
        pytest.skip("cdpruner not registered")
    rows = ROWS[:2]
    ids, mask = pad_rows(rows)
    pv = images(3)
    with tm.applied(model, "cdpruner", 10, relevance_norm="sample"), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        kept = kept_indices(model)
    # The text signal of each image is its own sample's non-image prompt embeddings.
    feats = list(model.model.get_image_features(pixel_values=pv).pooler_output)
    emb = model.get_input_embeddings()
    sample_of_image = [0, 1, 1]
    for i, f in enumerate(feats):
        text = emb(torch.tensor([t for t in rows[sample_of_image[i]] if t != IMG]))[None]
        with torch.no_grad():
            r = ts.reduce(f[None], "cdpruner", 10, text=text, relevance_norm="sample")
        assert torch.equal(r.indices[0], kept[i])
    embeds, hmask, _ = hand_pruned(model, rows, pv, kept)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=hmask).logits
    torch.testing.assert_close(out[hmask.bool()], ref[hmask.bool()], atol=ATOL, rtol=0)


# (f) clear errors ---------------------------------------------------------------------------
def test_errors(model):
    with pytest.raises(ValueError, match=r"keep=50.*49 visual"):
        tm.apply(model, "fastervlm", N + 1)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        tm.apply(LlamaForCausalLM(model.config.text_config), "random", 4)
    with pytest.raises(ValueError, match="partitions"):
        tm.apply(model, "hired", 8)
    with pytest.raises(ValueError, match="unknown option"):
        tm.apply(model, "fastervlm", 8, nope=1)
    with pytest.raises(ValueError, match="the llava adapter takes no video inputs"):
        tm.apply(model, "evs", 8)  # a video method on a family without videos
    assert not tm.is_applied(model)
    tm.apply(model, "random", 8)
    try:
        with pytest.raises(ValueError, match="already patched"):
            tm.apply(model, "random", 8)
    finally:
        tm.remove(model)
    with pytest.raises(ValueError, match="not patched"):
        tm.last_reductions(model)


def test_placeholder_mismatch_is_an_error(model):
    ids = torch.tensor([prompt([[1, 5], [6]])[:-5] + [6]])  # a truncated image run
    with tm.applied(model, "random", 8), pytest.raises(ValueError, match="placeholder"):
        model(input_ids=ids, pixel_values=images(1))


def test_full_strategy_counts_cls_as_a_visual_token():
    m = tiny_llava("full")
    rows = [prompt([[1, 5], [6, 7]], n_img=N + 1)]
    ids = torch.tensor(rows)
    pv = images(1)
    with torch.no_grad():
        ref = m(input_ids=ids, pixel_values=pv).logits
        with tm.applied(m, "fastervlm", N + 1):
            out = m(input_ids=ids, pixel_values=pv).logits
        with tm.applied(m, "fastervlm", 10):
            small = m(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert small.shape[1] == ids.shape[1] - (N + 1 - 10)


def test_multi_layer_signals_equal_eager_attention(model):
    """vtc-cls reads CLS attention of every encoder layer by default ([B, L, N]);
    hiprune with signal_layers gets attention received of the listed layers."""
    pv = images(1)
    ids, mask = pad_rows(ROWS[:1])
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = torch.stack(eager(pv, output_attentions=True).attentions, 1)  # [1, L, H, T, T]
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv)
    seen = {"vtc-cls": signal_seen(model, kw, "vtc-cls", 10, "cls_attn"),
            "hiprune": signal_seen(model, kw, "hiprune", 10, "attn_received",
                                   signal_layers=(0, "feature"))}
    expect_cls = att[:, :, :, 0, 1:].mean(2)  # every layer, head-mean CLS row
    torch.testing.assert_close(seen["vtc-cls"], expect_cls, atol=1e-6, rtol=1e-5)
    received = att.mean(dim=(2, 3))[..., 1:]  # head- and query-mean columns
    expect_recv = received[:, [0, att.shape[1] - 2]]
    torch.testing.assert_close(seen["hiprune"], expect_recv, atol=1e-6, rtol=1e-5)


def test_base_model_class_and_state_record(model):
    """LlavaModel (no LM head) is patched the same way; the state records what runs."""
    base = model.model
    ids, mask = pad_rows(ROWS[:2])
    pv = images(3)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, pixel_values=pv).last_hidden_state
        with tm.applied(base, "fastervlm", N):
            out = base(input_ids=ids, attention_mask=mask, pixel_values=pv).last_hidden_state
            record = tm.get_state(base).to_dict()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert record == {"method": "fastervlm", "keep": N, "options": {}, "seed": 0,
                      "stage": "pre-llm", "family": "llava", "signal_layers": None}


def test_bfloat16_keep_all_is_exact_and_pruning_runs():
    m = tiny_llava().to(torch.bfloat16)
    ids, mask = pad_rows(ROWS)
    pv = images(3).to(torch.bfloat16)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        with tm.applied(m, "fastervlm", N):
            out = m(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        with tm.applied(m, "visionzip", 8):
            small = m(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert small.dtype == torch.bfloat16 and torch.isfinite(small.float()).all()


@pytest.mark.parametrize("kw", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2),
                                dict(do_sample=True, num_return_sequences=2, top_k=5)])
def test_generate_beams_and_sampling(model, kw):
    ids, mask = pad_rows(ROWS)
    pv = images(3)
    gen = dict(max_new_tokens=4, pad_token_id=0, **kw)
    with tm.applied(model, "fastervlm", 8), torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **gen)
        kept = kept_indices(model)
    embeds, hmask, _ = hand_pruned(model, ROWS, pv, kept)
    with torch.no_grad():
        torch.manual_seed(0)
        ref = model.generate(inputs_embeds=embeds, attention_mask=hmask, **gen)
    n = out.shape[0] // ids.shape[0]
    assert torch.equal(out[:, :ids.shape[1]], ids.repeat_interleave(n, 0))
    assert torch.equal(out[:, ids.shape[1]:], ref)


def test_generate_without_no_grad_builds_no_graph():
    m = tiny_llava()
    ids, mask = pad_rows(ROWS[:1])
    with tm.applied(m, "divprune", 8):
        out = m.generate(input_ids=ids, attention_mask=mask, pixel_values=images(1),
                         max_new_tokens=2, do_sample=False, pad_token_id=0)
        (r, _), = tm.last_reductions(m)
    assert out.shape[1] == ids.shape[1] + 2 and not r.tokens.requires_grad
