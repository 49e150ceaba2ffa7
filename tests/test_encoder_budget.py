"""In-encoder methods under a budget: ``keep`` solved into ToMe's ``r`` per layer and EViT's
keep rate, the benchmark running them, the compute accounting of the reduced tower against
torch's flop counter, and ``viz`` drawing their merged groups."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.bench import protocol
from tokensieve.bench.flops import Plan, VLMDims, account
from tokensieve.core.encoder_schedule import layer_tokens
from tokensieve.methods.evit import EViTSchedule
from tokensieve.methods.tome import ToMeSchedule


# -- keep -> options ---------------------------------------------------------------------------
@pytest.mark.parametrize("keep, depth, until", [(192, 24, 22), (64, 24, 22), (100, 24, 22),
                                                (192, 4, 2), (128, 4, 2), (72, 4, 2)])
def test_tome_keep_solves_r(keep, depth, until):
    s = ToMeSchedule.for_keep(keep, 577, True, depth, until, {})
    assert isinstance(s.r, list) and len(s.r) == until + 1
    per = layer_tokens(s, s.plan(depth), depth, 577, True)
    assert per[until][1] - 1 == keep  # patch tokens out of the feature layer
    assert all(b == a for a, b in per[until + 1:])  # later layers do not reduce
    spread = [r for r in s.r if r > 0]
    if keep < 192 or depth > 4:
        assert max(spread) - min(spread) <= 1 or depth == 4  # near-constant r
    for (a, b), r in zip(per, s.r, strict=False):
        assert a - b == r and r <= (a - 1) // 2  # ToMe's 50 % cap


def test_tome_keep_errors():
    with pytest.raises(ValueError, match="out of reach"):
        ToMeSchedule.for_keep(71, 577, True, 4, 2, {})
    with pytest.raises(ValueError, match="keep and r both set"):
        ToMeSchedule.for_keep(100, 577, True, 4, 2, {"r": 3})


@pytest.mark.parametrize("keep", [400, 192, 128, 64, 20])
def test_evit_keep_solves_rate(keep):
    depth, until = 24, 22
    s = EViTSchedule.for_keep(keep, 577, True, depth, until, {})
    per = layer_tokens(s, s.plan(depth), depth, 577, True)
    assert per[until][1] - 1 == keep
    assert set(s.plan(depth)) == {6, 12, 18}  # the official layers, scaled


def test_evit_keep_errors():
    with pytest.raises(ValueError, match="out of reach"):
        EViTSchedule.for_keep(1, 577, True, 24, 22, {})
    with pytest.raises(ValueError, match="keep_rate both set"):
        EViTSchedule.for_keep(100, 577, True, 24, 22, {"keep_rate": 0.5})


# -- the patched model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from tokensieve.bench.tiny import random_tiny_llava
    from tokensieve.zoo import build_prompt, scene_qa

    model, processor = random_tiny_llava()
    sample = scene_qa("test", 1)[0]
    enc = processor(text=[build_prompt(processor, sample.question)], images=[sample.image],
                    return_tensors="pt")
    return model, processor, enc, sample


@pytest.mark.parametrize("method, keep", [("tome", 24), ("tome", 0.5), ("evit", 20)])
def test_apply_with_keep_gives_the_llm_keep_tokens(tiny, method, keep):
    model, _, enc, _ = tiny
    ts.apply(model, method, keep)
    try:
        with torch.inference_mode():
            model(**enc, logits_to_keep=1)
        state = tm.get_state(model)
        assert state.config.keep == keep
        counts = [r.num_tokens for r, _ in state.last]
    finally:
        ts.remove(model)
    assert counts == [keep if isinstance(keep, int) else round(keep * 64)]


def test_bench_runs_in_encoder_methods():
    assert protocol.method_runs("tome") == {"apply": True, "bench": True, "viz": True}
    assert protocol.method_runs("evit")["bench"]
    assert protocol.check_methods(["tome", "evit"]) == ("tome", "evit")


@pytest.mark.parametrize("method, keep", [("tome", 24), ("evit", 20)])
def test_accounting_matches_torch_flop_counter(tiny, method, keep):
    """The tower's layers (attention on the tokens a layer gets, MLP on those it leaves),
    projector and LLM at the reduced count equal the matmuls torch counts, less the method's
    own work inside the reducing layers (ToMe's similarities, EViT's CLS row), which the
    accounting leaves out."""
    model, _, enc, _ = tiny
    model.set_attn_implementation("eager")  # the flop counter sees eager attention's bmm
    dims = VLMDims.from_config(model.config)
    text = enc["input_ids"].shape[1] - dims.image_tokens
    ts.apply(model, method, keep)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            model(**enc, logits_to_keep=1)
        tower = tm.get_state(model).encoder.layer_tokens(dims.vision_tokens)
    finally:
        ts.remove(model)
        model.set_attn_implementation("sdpa")
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    prefix = "LlavaForConditionalGeneration.model.vision_tower.encoder.layers."
    overhead = 0
    for i in range(dims.vision_layers):
        layer = counts.get(f"{prefix}{i}", 0)
        overhead += layer - counts.get(f"{prefix}{i}.self_attn", 0) - counts.get(
            f"{prefix}{i}.mlp", 0)
    cost = account(dims, Plan.in_encoder_layers(tower, keep), text_tokens=text,
                   bytes_per_element=4)
    assert counts["Global"] - overhead == 2 * cost.prefill
    full = account(dims, text_tokens=text, bytes_per_element=4)
    assert cost.vision < full.vision and cost.llm_prefill < full.llm_prefill
    assert cost.llm_tokens[0] == keep + text


def test_plan_checks_the_tower_depth():
    dims = VLMDims.from_config(__import__("tokensieve.bench.tiny", fromlist=["x"])
                               .random_tiny_llava()[0].config)
    with pytest.raises(ValueError, match="tower layers"):
        account(dims, Plan.in_encoder_layers([(65, 40)], 39))


def test_viz_draws_in_encoder_groups(tiny, tmp_path):
    from tokensieve.bench.viz import visualize

    model, processor, _, sample = tiny
    out = visualize(model, processor, sample.image, "tome", 24, tmp_path / "tome.png")
    assert out["tokens"] == 24 and out["merged_groups"] > 0
    assert (tmp_path / "tome.png").stat().st_size > 0
    assert tm.get_state(model) is None
