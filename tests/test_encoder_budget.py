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
from tokensieve.methods.ats import ATSSchedule
from tokensieve.methods.evit import EViTSchedule
from tokensieve.methods.mctf import MCTFSchedule
from tokensieve.methods.tome import ToMeSchedule
from tokensieve.methods.turbo import TurboSchedule


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


@pytest.mark.parametrize("keep", [400, 192, 100])
def test_turbo_keep_solves_r_under_its_caps(keep):
    depth, until = 24, 22
    s = TurboSchedule.for_keep(keep, 577, True, depth, until, {})
    per = layer_tokens(s, s.plan(depth), depth, 577, True)
    assert per[until][1] - 1 == keep
    assert all(b == a for a, b in per[until + 1:])
    for (a, b), r in zip(per, s.r, strict=False):
        assert a - b == r and r <= (a - 1) // 2 and (r == 0 or a >= s.min_tokens)
    spread = [r for r in s.r if r > 0]
    assert max(spread) - min(spread) <= 1


def test_turbo_keep_respects_min_tokens():
    # 64 patches; a layer with fewer than min_tokens=40 tokens merges nothing, so at most
    # 65 -> 40 -> 21 (20 patches) in three layers; without the floor 65 -> 33 -> 17 -> 9
    with pytest.raises(ValueError, match="out of reach"):
        TurboSchedule.for_keep(10, 65, True, 4, 2, {})
    s = TurboSchedule.for_keep(20, 65, True, 4, 2, {})
    per = layer_tokens(s, s.plan(4), 4, 65, True)
    assert per[2][1] - 1 == 20 and all(a >= 40 for (a, b) in per if b < a)
    s = TurboSchedule.for_keep(10, 65, True, 4, 2, {"min_tokens": 0})
    assert layer_tokens(s, s.plan(4), 4, 65, True)[2][1] - 1 == 10
    with pytest.raises(ValueError, match="keep and r both set"):
        TurboSchedule.for_keep(40, 65, True, 4, 2, {"r": 3})


@pytest.mark.parametrize("keep, depth, until", [(192, 24, 22), (64, 24, 22), (24, 4, 2)])
def test_mctf_keep_solves_r_per_merging_layer(keep, depth, until):
    s = MCTFSchedule.for_keep(keep, 577 if depth == 24 else 65, True, depth, until, {})
    tokens = 577 if depth == 24 else 65
    plan = s.plan(depth)
    assert set(plan) <= {v for v in MCTFSchedule().plan(depth) if v <= until}
    per = layer_tokens(s, plan, depth, tokens, True)
    assert per[until][1] - 1 == keep
    for i, r in plan.items():  # MCTF's own per-merge rule leaves each solved r as it is
        t = per[i - 1][1] if i else tokens
        assert MCTFSchedule.layer_r(r, t, True) == r
    with pytest.raises(ValueError, match="out of reach"):
        MCTFSchedule.for_keep(5, 65, True, 4, 2, {})
    with pytest.raises(ValueError, match="2 counts for the"):
        MCTFSchedule(r=[3, 4]).plan(24)


def test_ats_keep_caps_every_ats_layer():
    s = ATSSchedule.for_keep(63, 577, True, 24, 22, {})
    assert s.tokens == 64 and set(s.plan(24).values()) == {64}
    per = layer_tokens(s, s.plan(24), 24, 577, True)
    assert per[22][1] == 64  # the cap: images keep at most this many
    with pytest.raises(ValueError, match="floor"):
        ATSSchedule.for_keep(4, 577, True, 24, 22, {})
    assert ATSSchedule.for_keep(4, 577, True, 24, 22, {"min_tokens": 1}).tokens == 5
    with pytest.raises(ValueError, match="keep and tokens both set"):
        ATSSchedule.for_keep(63, 577, True, 24, 22, {"tokens": 9})


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


@pytest.mark.parametrize("method, keep, options", [
    ("tome", 24, {}), ("tome", 0.5, {}), ("evit", 20, {}), ("turbo", 40, {}),
    ("turbo", 24, {"min_tokens": 0}), ("mctf", 24, {})])
def test_apply_with_keep_gives_the_llm_keep_tokens(tiny, method, keep, options):
    model, _, enc, _ = tiny
    ts.apply(model, method, keep, **options)
    try:
        with torch.inference_mode():
            model(**enc, logits_to_keep=1)
        state = tm.get_state(model)
        assert state.config.keep == keep
        counts = [r.num_tokens for r, _ in state.last]
    finally:
        ts.remove(model)
    assert counts == [keep if isinstance(keep, int) else round(keep * 64)]


def test_ats_keep_caps_what_the_llm_gets_and_measures_it(tiny):
    model, processor, enc, sample = tiny
    two = processor(text=[enc_text(processor, sample)] * 2, images=[sample.image] * 2,
                    return_tensors="pt")
    two["pixel_values"][1] = two["pixel_values"][1].flip(-1) * 0.5
    ts.apply(model, "ats", 20)
    try:
        with torch.inference_mode():
            model(**two, logits_to_keep=1)
        state = tm.get_state(model)
        stage = state.encoder
        counts = [r.num_tokens for r, _ in state.last]
        run = stage.last
        measured = stage.measured_tokens()
        capped = stage.layer_tokens(65)
        real = stage.layer_tokens(65, measured=True)
    finally:
        ts.remove(model)
    assert all(1 <= c <= 20 for c in counts)
    assert set(measured) == set(stage.plan)
    for i in stage.plan:  # the mean real count of the two images after each ATS layer
        trace = run.at(i)
        want = 2 * 65 if trace.mask is None and trace.layer < 0 else (
            trace.mask.sum().item() if trace.mask is not None else 2 * trace.sizes.shape[1])
        assert measured[i] == want / 2
    last = max(stage.plan)
    assert capped[last][1] == 21 and real[last][1] == round(measured[last])
    assert real[last][1] - 1 == pytest.approx(sum(counts) / 2, abs=0.5)


def enc_text(processor, sample):
    from tokensieve.zoo import build_prompt

    return build_prompt(processor, sample.question)


def test_bench_runs_in_encoder_methods():
    assert protocol.method_runs("tome") == {"apply": True, "bench": True, "viz": True}
    assert protocol.method_runs("evit")["bench"]
    assert protocol.check_methods(["tome", "evit"]) == ("tome", "evit")


@pytest.mark.parametrize("method, keep", [("tome", 24), ("evit", 20), ("ats", 40)])
def test_accounting_matches_torch_flop_counter(tiny, method, keep):
    """The tower's layers (attention on the tokens a layer gets, MLP on those it leaves),
    projector and LLM at the reduced count equal the matmuls torch counts, less the method's
    own work inside the reducing layers (ToMe's similarities, EViT's CLS row), which the
    accounting leaves out. ATS keeps an adaptive count below its cap: counted at what the
    image really kept (one image: no padding, so that is what ran)."""
    model, _, enc, _ = tiny
    model.set_attn_implementation("eager")  # the flop counter sees eager attention's bmm
    dims = VLMDims.from_config(model.config)
    text = enc["input_ids"].shape[1] - dims.image_tokens
    ts.apply(model, method, keep)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            model(**enc, logits_to_keep=1)
        stage = tm.get_state(model).encoder
        tower = stage.layer_tokens(dims.vision_tokens, measured=True)
        capped = stage.layer_tokens(dims.vision_tokens)
    finally:
        ts.remove(model)
        model.set_attn_implementation("sdpa")
    if method == "ats":
        assert tower != capped  # this image kept fewer than the cap
        keep = tower[-1][1] - 1
    else:
        assert tower == capped
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
