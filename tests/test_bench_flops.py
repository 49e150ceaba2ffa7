"""Analytic accounting: FastV's formula, published numbers, and a brute-force count of the
matrix multiplications a real (tiny, random) LLaVA runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from tokensieve.bench.flops import (
    Plan,
    StackDims,
    VLMDims,
    account,
    decode_macs,
    fastv_layer_flops,
    llava15_dims,
    plan_for,
)


def llava_15_7b() -> VLMDims:
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 layers, 1024 wide, MLP 4096) and Vicuna-7B
    (32 layers, 4096 wide, 32 heads, gated MLP 11008, vocabulary 32064), built offline."""
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=24, num_attention_heads=16,
                                       image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=32, num_attention_heads=32,
                                vocab_size=32064),
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    dims = VLMDims.from_config(cfg)
    assert dims == llava15_dims("7b")
    return dims


def test_reads_llava_config():
    d = llava_15_7b()
    assert d.image_tokens == 576 and d.vision_tokens == 577 and d.cls_tokens == 1
    assert d.llm == StackDims(layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128,
                              intermediate=11008, gated=True)
    assert d.vision is not None and not d.vision.gated and d.vision_layers == 24
    assert d.projector == ((1024, 4096), (4096, 4096))


@pytest.mark.parametrize("n", [1, 64, 576, 640])
def test_fastv_eq5_for_mha_plain_mlp(n):
    """FastV (Chen et al., ECCV 2024) Eq. 5: C(n) = 4nd^2 + 2n^2d + 2ndm per layer."""
    d, m = 4096, 11008
    layer = StackDims(layers=1, hidden=d, heads=32, kv_heads=32, head_dim=128,
                      intermediate=m, gated=False)
    assert layer.layer_macs(n) == fastv_layer_flops(n, d, m)
    assert fastv_layer_flops(n, d, m) == 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m


def test_gated_mlp_and_gqa_terms():
    base = dict(layers=1, hidden=64, heads=8, head_dim=8, intermediate=96)
    plain = StackDims(kv_heads=8, gated=False, **base)
    gated = StackDims(kv_heads=8, gated=True, **base)
    gqa = StackDims(kv_heads=2, gated=False, **base)
    n = 10
    assert gated.layer_macs(n) - plain.layer_macs(n) == n * 64 * 96  # the gate projection
    # k and v shrink from 8 heads to 2: 2 * n * d * (8 - 2) * head_dim fewer
    assert plain.layer_macs(n) - gqa.layer_macs(n) == 2 * n * 64 * 6 * 8
    assert gqa.kv_bytes_per_token(2) == 2 * 2 * 8 * 2


def test_published_llava_15_7b_numbers():
    """PyramidDrop (Xing et al., arXiv:2410.17247v2, supplementary Table 1, stage ablation):
    LLaVA-1.5-7B inference 3.82 TFLOPs with all 576 image tokens; with lambda = 0.5 over
    S = 4 stages (576 / 288 / 144 / 72 tokens from layers 0 / 8 / 16 / 24) 1.78 TFLOPs. Their
    count is the LLM over the image tokens with FastV's formula and Vicuna's three-matrix MLP,
    multiply-adds counted once: our convention."""
    d = llava_15_7b()
    full = account(d)
    assert round(full.llm_prefill / 1e12, 2) == 3.82
    pdrop = account(d, Plan.llm_schedule([(8, 288), (16, 144), (24, 72)]))
    assert round(pdrop.llm_prefill / 1e12, 2) == 1.78
    # 64 tokens before the LLM: the LLM costs what it costs on 64 tokens, 0.42 T (~11 %).
    pre64 = account(d, Plan.pre_llm(64))
    assert round(pre64.llm_prefill / 1e12, 2) == 0.42
    assert pre64.llm_prefill == 32 * d.llm.layer_macs(64)
    # CLIP ViT-L/14-336 image tower: 381.92 GFLOPs in open_clip's docs/model_profile.csv,
    # which counts a multiply-add as 2 FLOPs (fvcore MACs x 2): 190.96 G multiply-adds here.
    assert round(2 * full.vision / 1e9, 2) == 381.92
    assert full.hardware_flops == 2 * full.prefill


def test_pre_llm_reduction_equals_llm_at_n_prime():
    d = llava_15_7b()
    for k, text in [(64, 0), (192, 35), (576, 60)]:
        c = account(d, Plan.pre_llm(k), text_tokens=text)
        ref = account(d, text_tokens=text)
        assert c.llm_prefill == sum(d.llm.layer_macs(k + text) for _ in range(32))
        assert c.vision == ref.vision and c.projector == ref.projector  # tower untouched
        assert c.llm_tokens == (k + text,) * 32
    assert account(d, Plan.pre_llm(576)) == account(d)
    # reducing the tower's features also shrinks the projector's work, nothing else
    a, b = account(d, Plan.pre_llm(64)), account(d, Plan.pre_llm(64, before_projector=True))
    assert b.projector == 64 * (1024 * 4096 + 4096 * 4096) == a.projector * 64 // 576
    assert (b.vision, b.llm_prefill, b.kv_cache_bytes) == (a.vision, a.llm_prefill,
                                                          a.kv_cache_bytes)


def test_in_llm_and_in_encoder_plans():
    d = llava_15_7b()
    text = 40
    fastv = account(d, Plan.in_llm(2, 288), text_tokens=text)
    expect = 2 * d.llm.layer_macs(576 + text) + 30 * d.llm.layer_macs(288 + text)
    assert fastv.llm_prefill == expect
    assert fastv.llm_tokens[:2] == (616, 616) and set(fastv.llm_tokens[2:]) == {328}
    # KV cache: 2 layers hold 616 tokens, 30 hold 328 (fp16: 2 bytes)
    per_tok = 2 * 32 * 128 * 2
    assert fastv.kv_cache_bytes == per_tok * (2 * 616 + 30 * 328)
    enc = account(d, Plan.in_encoder(12, 144), text_tokens=text)
    assert enc.vision_layer_tokens[:12] == (577,) * 12 and set(enc.vision_layer_tokens[12:]) == {
        145}
    assert enc.llm_tokens == (144 + text,) * 32
    assert enc.projector == 144 * (1024 * 4096 + 4096 * 4096)
    assert plan_for("llm", 64) == Plan.in_llm(2, 64)


def test_kv_bytes_formula():
    """2 * layers * kv_heads * head_dim * tokens * bytes."""
    d = llava_15_7b()
    c = account(d, text_tokens=24, bytes_per_element=2)
    assert c.kv_cache_bytes == 2 * 32 * 32 * 128 * 600 * 2
    assert c.kv_cache_bytes == 600 * 512 * 1024  # 0.5 MiB per token for LLaMA-7B in fp16


def test_decode_step_cost():
    d = llava_15_7b()
    c = account(d, Plan.pre_llm(64), text_tokens=36)
    one = d.llm.layer_macs(1, 101)
    assert c.decode == 32 * one + 4096 * 32064
    assert decode_macs(d, c.llm_tokens, step=3) == 32 * d.llm.layer_macs(1, 104) + 4096 * 32064


def test_analytic_table_is_computed():
    from tokensieve.bench.report import analytic_table

    table = analytic_table("7b")
    assert "| full | 3.82 | 100.0% | 0.191 |" in table
    assert "| PyramidDrop 576/288/144/72 at 0/8/16/24 | 1.78 |" in table
    assert "| pre-LLM, 64 tokens | 0.42 |" in table
    assert llava15_dims("13b").llm.layers == 40
    with pytest.raises(ValueError, match="size"):
        llava15_dims("70b")


@pytest.mark.parametrize("bad", [
    dict(plan=Plan.pre_llm(577)),
    dict(plan=Plan.llm_schedule([(8, 288), (4, 100)])),
    dict(plan=Plan.llm_schedule([(8, 288), (16, 300)])),
    dict(plan=Plan.in_llm(33, 64)),
    dict(text_tokens=-1),
])
def test_bad_plans_raise(bad):
    with pytest.raises(ValueError):
        account(llava_15_7b(), **bad)


def test_gqa_config_is_read():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    s = StackDims.from_config(cfg)
    assert (s.kv_heads, s.head_dim, s.gated) == (2, 16, True)
    with pytest.raises(ValueError, match="hidden_size"):
        StackDims.from_config(object())


# -- brute force: count the matmuls a real tiny LLaVA runs --------------------------------
@pytest.fixture(scope="module")
def tiny():
    from tokensieve.bench.tiny import random_tiny_llava
    from tokensieve.zoo import build_prompt, scene_qa

    model, processor = random_tiny_llava()
    model.set_attn_implementation("eager")  # the flop counter sees eager attention's bmm
    sample = scene_qa("test", 1)[0]
    enc = processor(text=[build_prompt(processor, sample.question)], images=[sample.image],
                    return_tensors="pt")
    return model, enc


def _counted(model, **kw) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(**kw)
    return fc.get_total_flops()


def test_matches_torch_flop_counter_full_and_decode(tiny):
    """GQA (4 query / 2 kv heads), gated MLP, CLIP tower with CLS, 2-layer projector."""
    model, enc = tiny
    dims = VLMDims.from_config(model.config)
    text = enc["input_ids"].shape[1] - dims.image_tokens
    cost = account(dims, text_tokens=text, bytes_per_element=4)
    assert _counted(model, **enc, logits_to_keep=1) == 2 * cost.prefill
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2)
    assert fc.get_total_flops() == 2 * (cost.prefill + cost.decode)
    with torch.inference_mode():
        cache = model(**enc, use_cache=True, logits_to_keep=1).past_key_values
    assert sum(x.keys.nbytes + x.values.nbytes for x in cache.layers) == cost.kv_cache_bytes


def test_matches_torch_flop_counter_pre_llm(tiny):
    models = pytest.importorskip("tokensieve.models")
    model, enc = tiny
    dims = VLMDims.from_config(model.config)
    text = enc["input_ids"].shape[1] - dims.image_tokens
    models.apply(model, "random", 16)
    try:
        counted = _counted(model, **enc, logits_to_keep=1)
        with torch.inference_mode():
            cache = model(**enc, use_cache=True, logits_to_keep=1).past_key_values
    finally:
        models.remove(model)
    cost = account(dims, Plan.pre_llm(16), text_tokens=text, bytes_per_element=4)
    assert counted == 2 * cost.prefill
    assert sum(x.keys.nbytes + x.values.nbytes for x in cache.layers) == cost.kv_cache_bytes


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_matches_torch_flop_counter(family):
    """Patch merger (4 patches per LLM token), M-RoPE decoder with GQA, and for Qwen2.5-VL
    a gated tower MLP and window attention (8x8-patch windows, one global layer)."""
    import transformers as tf

    text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]})
    common = dict(depth=3, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)
    if family == "qwen2_vl":
        cfg_cls, model_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
        vision = dict(embed_dim=32, hidden_size=48, mlp_ratio=2, **common)
    else:
        cfg_cls, model_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        vision = dict(hidden_size=32, out_hidden_size=48, intermediate_size=40, window_size=32,
                      fullatt_block_indexes=[2], **common)
    cfg = cfg_cls(vision_config=vision, text_config=text, image_token_id=99,
                  vision_start_token_id=97, vision_end_token_id=98)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    model.set_attn_implementation("eager")
    h = w = 16
    n = h * w // 4
    ids = torch.tensor([[1, 2, 97] + [99] * n + [98, 5, 6]])
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(input_ids=ids, pixel_values=torch.randn(h * w, 3 * 2 * 4 * 4),
              image_grid_thw=torch.tensor([[1, h, w]]), mm_token_type_ids=(ids == 99).long(),
              logits_to_keep=1)
    dims = VLMDims.from_config(model.config)
    with pytest.raises(ValueError, match="for_grid"):
        account(dims)
    dims = dims.for_grid(1, h, w)
    assert dims.image_tokens == n and dims.vision_tokens == h * w
    assert dims.vision.gated == (family == "qwen2_5_vl")
    cost = account(dims, text_tokens=ids.shape[1] - n)
    assert fc.get_total_flops() == 2 * cost.prefill

    # the protocol sizes such models for its images with the processor's image grid
    from PIL import Image

    from tokensieve.bench.protocol import model_dims

    class Processor:
        image_processor = tf.Qwen2VLImageProcessorPil(
            min_pixels=64 * 64, max_pixels=64 * 64, patch_size=4, merge_size=2,
            temporal_patch_size=2)

    assert model_dims(model, Processor(), Image.new("RGB", (64, 64))) == dims
    with pytest.raises(ValueError, match="depends on the image"):
        model_dims(model)


def test_llava_next_anyres_counts_from_the_processor():
    """LLaVA-NeXT (anyres): the processor's layout gives the LLM's visual tokens (crops,
    unpadding, newlines); the tower runs once per crop and the projector on every crop's
    patches. Exact against torch's flop counter."""
    import transformers as tf

    from tokensieve.bench.protocol import model_dims
    from tokensieve.zoo import build_prompt, scene_qa
    from tokensieve.zoo.build import (
        CHAT_TEMPLATE,
        CLIP_MEAN,
        CLIP_STD,
        IMAGE_TOKEN,
        build_tokenizer,
    )

    tok = build_tokenizer()
    pins = [[28, 56], [56, 28], [56, 56]]
    processor = tf.LlavaNextProcessor(
        image_processor=tf.LlavaNextImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
            image_grid_pinpoints=pins, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)),
        tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    cfg = tf.LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=4,
                                       image_size=28, patch_size=4, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=pins)
    model = tf.LlavaNextForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("eager")
    sample = scene_qa("test", 1)[0]
    dims = model_dims(model, processor, sample.image)
    enc = processor(text=[build_prompt(processor, sample.question)], images=[sample.image],
                    return_tensors="pt")
    assert dims.image_tokens == int((enc["input_ids"] == cfg.image_token_index).sum())
    assert dims.crops == enc["pixel_values"].shape[1] > 1 and dims.approximate
    text = enc["input_ids"].shape[1] - dims.image_tokens
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(**enc, logits_to_keep=1)
    assert fc.get_total_flops() == 2 * account(dims, text_tokens=text).prefill
