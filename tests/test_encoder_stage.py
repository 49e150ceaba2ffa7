"""The in-encoder stage: ToMe and EViT inside tiny CLIP / SigLIP / ViT / Dinov2 backbones and
LLaVA-1.5's CLIP tower.

References are built without the stage: the tower's layers run by hand (eager attention
with the log-size bias written out), with tokensieve's token-set functions (ToMe's
bipartite matching, ``evit_select``) applied between attention and MLP.
"""

from __future__ import annotations

import math

import pytest
import torch
from model_refs import greedy
from test_models_llava_next import tiny_next
from test_models_qwen_vl import tiny_qwen
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

import tokensieve as ts
import tokensieve.models as tm
from tokensieve.methods._matching import bipartite_soft_matching
from tokensieve.methods.evit import evit_select
from tokensieve.methods.tome import parse_r
from tokensieve.models._encoder import REFUSED, apply_encoder

ATOL = 1e-5
SIDE = 8  # 32 px / 4 px patches
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              image_size=32, patch_size=4)


def backbone(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "clip":
        m = CLIPVisionModel(CLIPVisionConfig(**VISION))
    elif kind == "siglip":
        m = SiglipVisionModel(SiglipVisionConfig(**VISION))
    elif kind == "vit":
        m = ViTModel(ViTConfig(**VISION))
    else:
        m = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     image_size=32, patch_size=4, mlp_ratio=2))
    return m.eval()


def layers_of(m: torch.nn.Module) -> torch.nn.ModuleList:
    enc = getattr(m, "encoder", m)
    return getattr(enc, "layers", None) or enc.layer


def pixels(b: int = 2, seed: int = 1, side: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


KINDS = ["clip", "siglip", "vit", "dinov2"]


@torch.no_grad()
def run(m: torch.nn.Module, pv: torch.Tensor):
    return m(pixel_values=pv, output_hidden_states=True)


def hooks(m: torch.nn.Module) -> list[tuple[str, list, list]]:
    """Every module's forward hooks and pre-hooks (transformers installs its own output
    capturing hooks on a first call with ``output_hidden_states``)."""
    return [(name, list(mod._forward_hooks.values()), list(mod._forward_pre_hooks.values()))
            for name, mod in m.named_modules()]


def assert_untouched(m: torch.nn.Module, before: list | None = None) -> None:
    """No tokensieve attribute or layer forward is left on the model, and the hooks are the
    ones it had before apply."""
    assert not tm.is_applied(m) and "_tokensieve" not in vars(m)
    for layer in layers_of(m):
        assert "forward" not in vars(layer)
    if before is not None:
        assert hooks(m) == before


# -- backbones ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("method", "options"), [("tome", {"r": 0}),
                                                 ("evit", {"keep_rate": 1.0})])
def test_keep_all_equals_untouched(kind, method, options):
    if kind == "siglip" and method == "evit":
        pytest.skip("SigLIP has no CLS token (evit refused, tested below)")
    m = backbone(kind)
    pv = pixels()
    ref = run(m, pv)
    before = hooks(m)
    ts.apply(m, method, **options)
    out = run(m, pv)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert torch.equal(a, b)
    if ref.pooler_output is not None:
        assert torch.equal(out.pooler_output, ref.pooler_output)
    ts.remove(m)
    assert_untouched(m, before)


@pytest.mark.parametrize("kind", KINDS)
def test_tome_backbone_fewer_tokens_and_remove_exact(kind):
    m = backbone(kind)
    pv = pixels()
    ref = run(m, pv)
    before = hooks(m)
    ts.apply(m, "tome", r=8)
    out = run(m, pv)
    n0 = ref.last_hidden_state.shape[1]
    assert out.last_hidden_state.shape == (2, n0 - 4 * 8, 32)
    # output_hidden_states: what each layer really produced
    assert [h.shape[1] for h in out.hidden_states] == [n0 - 8 * i for i in range(5)]
    assert torch.equal(out.hidden_states[0], ref.hidden_states[0])
    trace = tm.get_state(m).encoder.last.current
    assert trace.sizes.shape == (2, n0 - 32) and torch.equal(trace.sizes.sum(1),
                                                              torch.full((2,), float(n0)))
    assert trace.source.shape == (2, n0) and int(trace.source.min()) >= 0
    if kind != "siglip":  # CLS protected and first
        assert trace.positions[:, 0].eq(0).all() and trace.sizes[:, 0].eq(1).all()
    ts.remove(m)
    assert_untouched(m, before)
    again = run(m, pv)
    assert torch.equal(again.last_hidden_state, ref.last_hidden_state)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_single(kind):
    m = backbone(kind)
    pv = pixels(3)
    method, opts = ("tome", {"r": (8, -1)}) if kind == "siglip" else ("evit", {})
    for meth, o in (("tome", {"r": 6}), (method, opts)):
        ts.apply(m, meth, **o)
        both = run(m, pv).last_hidden_state
        for i in range(3):
            one = run(m, pv[i:i + 1]).last_hidden_state
            torch.testing.assert_close(both[i:i + 1], one, atol=ATOL, rtol=0)
        ts.remove(m)


# -- ToMe against the hand-run tower ----------------------------------------------------------
def eager_attention(attn: torch.nn.Module, h: torch.Tensor, bias: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of a CLIP layer by hand (eager softmax, ``bias`` ``[B, T]``, e.g.
    ``log(size)``, added to each key's logits). Returns (output [B, T, D], keys
    [B, H, T, Dh], probabilities [B, H, T, T], values [B, T, H*Dh])."""
    b, t, _ = h.shape
    heads = attn.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, t, heads, -1).transpose(1, 2)

    v_flat = attn.v_proj(h)
    q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(v_flat)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
    return attn.out_proj(out), k, probs, v_flat


@torch.no_grad()
def hand_tower(m: CLIPVisionModel, pv: torch.Tensor, rule, prop_attn: bool,
               until: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The CLIP tower's layers run by hand, ``rule(i, x, keys, probs, sizes)`` -> ``(x, sizes)``
    between attention and MLP. Returns every layer's output (index 0: embeddings) and the
    final sizes."""
    x = m.pre_layrnorm(m.embeddings(pv))
    outs, sizes = [x], None
    for i, layer in enumerate(m.encoder.layers):
        bias = None if sizes is None or not prop_attn else sizes.log()
        h, k, probs, _ = eager_attention(layer.self_attn, layer.layer_norm1(x), bias)
        x = x + h
        if until is None or i <= until:
            x, sizes = rule(i, x, k, probs, sizes)
        x = x + layer.mlp(layer.layer_norm2(x))
        outs.append(x)
    return outs, sizes


def tome_rule(schedule: list[int], use_keys: bool = True):
    def rule(i, x, k, probs, sizes):
        r = min(schedule[i], (x.shape[1] - 1) // 2)
        if r <= 0:
            return x, sizes
        metric = k.mean(1) if use_keys else x  # head-mean keys [B, T, Dh]
        match = bipartite_soft_matching(metric, r, protect_first=True)
        return match.merge_wavg(x, sizes)
    return rule


@pytest.mark.parametrize(("r", "prop_attn"), [(8, True), (8, False), ((12, -1), True),
                                              ([0, 20, 3], True), (40, True)])
def test_tome_equals_hand_run_tower(r, prop_attn):
    """ToMe inside the tower = the layers by hand with the token-set matching between
    attention and MLP; proportional attention = eager logits + log(size)."""
    m = backbone("clip")
    pv = pixels()
    ref, sizes = hand_tower(m, pv, tome_rule(parse_r(4, r)), prop_attn)
    ts.apply(m, "tome", r=r, prop_attn=prop_attn)
    out = run(m, pv)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in ref]
    for a, b in zip(out.hidden_states, ref, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(tm.get_state(m).encoder.last.current.sizes, sizes)
    ts.remove(m)


def test_proportional_attention_matters():
    """The log-size bias changes the outputs once tokens are merged (so the check above
    tests it), and the SDPA mask the layers get is ``log(size)`` ``[B, 1, 1, T]``."""
    m = backbone("clip")
    pv = pixels()
    seen = []
    attn = m.encoder.layers[2].self_attn
    handle = attn.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw.get("attention_mask", args[1] if len(args) > 1
                                                 else None)), with_kwargs=True)
    outs = {}
    for prop in (True, False):
        ts.apply(m, "tome", r=8, prop_attn=prop)
        outs[prop] = run(m, pv).last_hidden_state
        if prop:
            sizes_before_2 = tm.get_state(m).encoder.last.at(1).sizes
        ts.remove(m)
    handle.remove()
    assert not torch.allclose(outs[True], outs[False], atol=1e-4)
    assert seen[0].shape == (2, 1, 1, 65 - 16) and seen[1] is None
    torch.testing.assert_close(seen[0][:, 0, 0], sizes_before_2.log())


def test_parse_r_schedules():
    assert parse_r(4, 8) == [8, 8, 8, 8]
    assert parse_r(3, (8, -1)) == [16, 8, 0]
    assert parse_r(3, (8, 1)) == [0, 8, 16]
    assert parse_r(4, [1, 2]) == [1, 2, 0, 0]
    assert parse_r(1, 5) == [5]


# -- EViT against the hand-run tower ----------------------------------------------------------
def evit_rule(layers: tuple[int, ...], rate: float = 0.7, fuse: bool = True):
    def rule(i, x, k, probs, sizes):
        if i not in layers:
            return x, sizes
        t = x.shape[1]
        left = math.ceil(rate * (t - 1))
        cls_attn = probs[:, :, 0].mean(1)  # head-mean CLS row of the layer's attention
        r = evit_select(x, 1 + left + int(fuse), cls_attn, has_cls=True, fuse=fuse)
        return r.tokens, None
    return rule


@pytest.mark.parametrize(("options", "layers"), [({}, (1, 2, 3)),
                                                 ({"layers": (0, 2), "keep_rate": 0.5,
                                                   "fuse": False}, (0, 2))])
def test_evit_equals_hand_run_tower(options, layers):
    m = backbone("clip")
    pv = pixels()
    ref, _ = hand_tower(m, pv, evit_rule(layers, options.get("keep_rate", 0.7),
                                         options.get("fuse", True)), prop_attn=False)
    ts.apply(m, "evit", **options)
    out = run(m, pv)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in ref]
    for a, b in zip(out.hidden_states, ref, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    trace = tm.get_state(m).encoder.last.current
    if options.get("fuse", True):  # fused tokens carry the dropped ones: sizes add up
        assert torch.equal(trace.sizes.sum(1), torch.full((2,), 65.0))
    else:
        assert int((trace.source < 0).sum()) > 0
    ts.remove(m)
    assert_untouched(m)


def test_evit_official_layers_scale_with_depth():
    from tokensieve.methods.evit import EViTSchedule

    assert sorted(EViTSchedule().plan(12)) == [3, 6, 9]
    assert sorted(EViTSchedule().plan(24)) == [6, 12, 18]
    assert sorted(EViTSchedule().plan(4)) == [1, 2, 3]
    assert EViTSchedule(keep_rate=1.0).plan(12) == {}


# -- options and refusals ---------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "method", "kw", "match"), [
    ("clip", "tome", {}, "needs r"),
    ("clip", "tome", {"r": -1}, "r=-1"),
    ("clip", "tome", {"r": 4, "ratio": 2}, "unknown option"),
    ("clip", "tome", {"r": 4, "keep": 10}, "keep and r both set"),
    ("clip", "evit", {"keep_rate": 0.0}, "keep_rate=0.0"),
    ("clip", "evit", {"layers": (7,)}, "not layers of this 4-layer"),
    ("siglip", "evit", {}, "needs a CLS token"),
    ("clip", "fastervlm", {"keep": 8}, "vision backbone without an LLM"),
    ("clip", "kmedoids", {}, "needs clusters"),
])
def test_bad_options_refused(kind, method, kw, match):
    m = backbone(kind)
    with pytest.raises(ValueError, match=match):
        ts.apply(m, method, **kw)
    assert_untouched(m)


def test_grid_families_refused():
    for family, why in REFUSED.items():
        adapter = type("A", (), {"family": family})
        with pytest.raises(ValueError, match="cannot take yet") as err:
            apply_encoder(torch.nn.Linear(1, 1), adapter, "tome", None, seed=0,
                          signal_layers=None, llm=None, options={"r": 4})
        assert why in str(err.value)
    for model in (tiny_next(), tiny_qwen("qwen2-vl")):
        with pytest.raises(ValueError, match="needs the whole patch grid|whole patch grid"):
            ts.apply(model, "tome", r=4)
        assert not tm.is_applied(model)


# -- LLaVA-1.5 --------------------------------------------------------------------------------
IMG = 60
LSIDE = 7
N = LSIDE * LSIDE


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=28, patch_size=4,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=N)
    return LlavaForConditionalGeneration(cfg).eval()


def llava_inputs(b: int = 2, n_img: int = N) -> dict[str, torch.Tensor]:
    rows = [[1, 5 + i, 7] + [IMG] * n_img + [9, 11 + i, 13] for i in range(b)]
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(b, 3, 28, 28,
                                        generator=torch.Generator().manual_seed(3))}


@torch.no_grad()
def llava_reference(model, inputs, rule, prop_attn: bool = True):
    """The LM inputs by hand: the tower run layer by layer with ``rule`` up to the feature
    layer (1 of 3), CLS dropped, projected, spliced into a prompt with that many
    placeholders. Returns (inputs_embeds, attention_mask)."""
    outs, _ = hand_tower(model.model.vision_tower, inputs["pixel_values"], rule, prop_attn,
                         until=1)
    feats = model.model.multi_modal_projector(outs[2][:, 1:])  # hidden_states[-2], no CLS
    k = feats.shape[1]
    short = llava_inputs(inputs["input_ids"].shape[0], n_img=k)
    ids = short["input_ids"]
    emb = model.get_input_embeddings()(ids.masked_fill(ids == IMG, 0))
    emb[ids == IMG] = feats.reshape(-1, feats.shape[-1])
    return emb, short["attention_mask"]


def test_llava_r0_equals_untouched():
    model = tiny_llava()
    inputs = llava_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
        gen_ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    ts.apply(model, "tome", r=0)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen_ref)
    ts.remove(model)
    ts.apply(model, "evit", keep_rate=1.0)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    ts.remove(model)
    assert "forward" not in vars(model) and "generate" not in vars(model)
    assert all("forward" not in vars(la) for la in model.model.vision_tower.encoder.layers)


@pytest.mark.parametrize(("method", "options", "rule"), [
    ("tome", {"r": 4}, tome_rule([4, 4, 4])),
    ("evit", {"layers": (0, 1, 2)}, evit_rule((0, 1, 2))),
])
def test_llava_llm_gets_reduced_tokens(method, options, rule):
    """The tower reduces up to the feature layer (-2: layer 1 of 3; layer 2 does not
    reduce); the prompt's placeholders are cut to the tokens that come out (CLS dropped);
    logits and greedy generation equal the untouched model on the hand-built input."""
    model = tiny_llava()
    inputs = llava_inputs()
    emb, mask = llava_reference(model, inputs, rule, prop_attn=method == "tome")
    ts.apply(model, method, **options)
    with torch.no_grad():
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = model(inputs_embeds=emb, attention_mask=mask).logits  # no images: untouched
    assert out.logits.shape == ref.shape
    torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)
    assert torch.equal(gen[:, inputs["input_ids"].shape[1]:],
                       greedy(model, 4, inputs_embeds=emb, attention_mask=mask))
    reds = tm.last_reductions(model)
    assert len(reds) == 2 and reds[0][0].tokens.shape[1] == emb.shape[1] - 6
    for r, grid in reds:
        assert grid is None and r.assignment.shape == (1, N)
        if method == "tome":
            assert int(r.sizes.sum()) == N and r.positions.min() >= 0
    ts.remove(model)


def test_llava_batch_equals_single():
    model = tiny_llava()
    inputs = llava_inputs()
    ts.apply(model, "tome", r=6)
    with torch.no_grad():
        both = model(**inputs).logits
        for i in range(2):
            one = model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits
            torch.testing.assert_close(both[i:i + 1], one, atol=ATOL, rtol=0)
    ts.remove(model)


def test_llava_encoder_then_in_llm_pipeline():
    """tome in the tower, then fastv inside the LLM (one apply, recorded in to_dict)."""
    model = tiny_llava()
    inputs = llava_inputs()
    ts.apply(model, "tome", r=4, llm=ts.ReduceConfig("fastv", keep=10, options={"layer": 1}))
    with torch.no_grad():
        out = model(**inputs)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    state = tm.get_state(model)
    assert out.logits.shape[1] == 6 + 41 and gen.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert [c.shape[0] for c in state.llm.last[0].kept] == [10, 10]  # per image
    assert state.to_dict()["llm"]["method"] == "fastv"
    ts.remove(model)
    assert all("forward" not in vars(la) for la in model.model.vision_tower.encoder.layers)
