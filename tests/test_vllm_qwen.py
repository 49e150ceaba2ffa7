"""tokensieve in vLLM on Qwen2-VL / Qwen2.5-VL: the plugin's tokens and log-probabilities
equal ``ts.apply``'s on tiny random models.

Needs vLLM (skipped without it): CI runs this file with the python of
``scripts/setup_vllm_env.sh``. Each family's tiny random model (2-3 tower blocks, 2 LLM
layers, 4x4-pixel patches) is saved to a temporary folder with a word-level tokenizer
holding Qwen's special tokens and a Qwen2-VL image processor, so vLLM loads it offline.
The reference is the transformers model of the same folder, in this process, reduced by
``tokensieve.applied`` with the same method and budget. Images of three shapes (wide, tall,
square) give merged grids of 8x12, 12x8 and 10x10: kept tokens keep their M-RoPE ``(t, h,
w)`` positions, and a wrong position changes the answers (checked by hand when this was
written). Engines run in this process, a few seconds each once vLLM is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("vllm", reason="vLLM is not installed "
                    "(scripts/setup_vllm_env.sh builds an environment with it)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tokensieve as ts  # noqa: E402
from tokensieve.core.budget import resolve_keep  # noqa: E402
from tokensieve.integrations.vllm import hf_overrides  # noqa: E402
from tokensieve.integrations.vllm._common import shutdown_llm  # noqa: E402

PROMPT = "<|vision_start|><|image_pad|><|vision_end|>What is shown ?"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
WORDS = ["<unk>", *(f"w{i}" for i in range(40)), "What", "is", "shown", "?"]
SIZES = [(64, 96), (96, 64), (80, 80)]  # (height, width) pixels: 8x12, 12x8, 10x10 merged
TEXT_TOKENS = 6  # <|vision_start|> <|vision_end|> What is shown ?
ARCH = {"qwen2": "Qwen2VLForConditionalGeneration",
        "qwen2.5": "Qwen2_5_VLForConditionalGeneration"}
#: (family, method, keep, options): subset methods (kept tokens must coincide), one on the
#: merger's input with attention signals, one merging tokens. (Not ``random``: its draw is
#: seeded from the bits of the tokens, and vLLM's kernels differ from transformers' in the
#: last bits, so the two draw different tokens, as two machines may.)
CASES = [
    ("qwen2", "divprune", 16, {}),
    ("qwen2", "uniform", 24, {}),
    ("qwen2", "fopru", 0.25, {}),
    ("qwen2", "dct", 16, {}),
    ("qwen2.5", "divprune", 16, {}),
    ("qwen2.5", "visiondrop", 20, {"llm": None}),  # its pre-LLM stage (see settings)
]
MAX_TOKENS = 4


def build_tiny_qwen(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny random Qwen2-VL / Qwen2.5-VL with its processor, saved to ``path``."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        model_max_length=2048)
    sizes = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    images = Qwen2VLImageProcessor(**sizes, size={"shortest_edge": 16 * 16,
                                                  "longest_edge": 96 * 96})
    videos = Qwen2VLVideoProcessor(**sizes)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
               vision_start_token_id=vocab["<|vision_start|>"],
               vision_end_token_id=vocab["<|vision_end|>"])
    text = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=2048, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                 "rope_theta": 10000.0},
                pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    if family == "qwen2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, mlp_ratio=2,
                      initializer_range=0.2)
        model: Any = Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(vision_config=vision, text_config=text, **ids))
        processor: Any = Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer,
                                          video_processor=videos, chat_template=template)
    else:
        vision = dict(depth=3, hidden_size=32, out_hidden_size=64, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      intermediate_size=64, window_size=16, fullatt_block_indexes=[1],
                      initializer_range=0.2)
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids))
        processor = Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer,
                                        video_processor=videos, chat_template=template)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


def scene_images() -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def n_tokens(h: int, w: int) -> int:
    return (h // 8) * (w // 8)


Answer = tuple[list[int], list[float], int]


@torch.no_grad()
def hf_answers(path: Path, method: str | None, keep: Any = None, **options: Any,
               ) -> list[Answer]:
    """Greedy tokens, their log-probabilities and the prompt length, in transformers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    out = []
    for image in scene_images():
        inputs = processor(text=[PROMPT], images=[image], return_tensors="pt")
        if method is None:
            gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        else:
            with ts.applied(model, method, keep=keep, **options):
                gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True)
        tokens = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item()
                    for s, t in zip(gen.scores, tokens, strict=True)]
        out.append((tokens, logprobs, int(inputs["input_ids"].shape[1])))
    return out


def make_llm(path: Path, overrides: dict[str, Any]) -> Any:
    from vllm import LLM

    return LLM(model=str(path), dtype="float32", hf_overrides=overrides, max_model_len=1024,
               enforce_eager=True, limit_mm_per_prompt={"image": 1}, max_num_seqs=8,
               distributed_executor_backend="uni", seed=0)


def vllm_answers(path: Path, overrides: dict[str, Any]) -> list[Answer]:
    from vllm import SamplingParams

    llm = make_llm(path, overrides)
    try:
        reqs = [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in scene_images()]
        outs = llm.generate(reqs, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                 logprobs=1), use_tqdm=False)
    finally:
        shutdown_llm(llm)
    answers = []
    for o in outs:
        c = o.outputs[0]
        tokens = list(c.token_ids)
        answers.append((tokens, [lp[t].logprob for lp, t in zip(c.logprobs, tokens, strict=True)],
                        len(o.prompt_token_ids)))
    return answers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-qwen")
    return {f: build_tiny_qwen(f, root / f) for f in ARCH}


def _same(got: list[Answer], want: list[Answer]) -> None:
    for (t1, l1, _), (t2, l2, _) in zip(got, want, strict=True):
        assert t1 == t2
        np.testing.assert_allclose(l1, l2, atol=1e-4)


@pytest.mark.parametrize("family", list(ARCH))
def test_unreduced_equals_transformers(checkpoints: dict[str, Path], family: str) -> None:
    """The plugin's architecture without a method is vLLM's model (a sanity check of the
    tiny checkpoint and of the reference)."""
    path = checkpoints[family]
    got = vllm_answers(path, {"architectures": ["Tokensieve" + ARCH[family]]})
    _same(got, hf_answers(path, None))
    assert [a[2] for a in got] == [TEXT_TOKENS + n_tokens(h, w) for h, w in SIZES]


@pytest.mark.parametrize("family, method, keep, options", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_reduced_equals_ts_apply(checkpoints: dict[str, Path], family: str, method: str,
                                 keep: Any, options: dict[str, Any]) -> None:
    path = checkpoints[family]
    got = vllm_answers(path, hf_overrides(method, keep, architecture=ARCH[family], **options))
    want = hf_answers(path, method, keep, **options)
    _same(got, want)
    kept = [resolve_keep(keep, n_tokens(h, w)) for h, w in SIZES]
    assert [a[2] for a in got] == [TEXT_TOKENS + k for k in kept]


@pytest.mark.parametrize("setting, message", [
    ({"method": "divprun", "keep": 16}, "unknown method 'divprun'"),
    ({"method": "divprune", "keep": 100000}, "keep=100000"),
    ({"method": "cdpruner", "keep": 16}, "text-conditioned"),
    ({"method": "fastervlm", "keep": 16}, "cls_attn"),
    ({"method": "visiondrop", "keep": 16}, "llm=None"),
])
def test_bad_settings_fail_at_start(checkpoints: dict[str, Path], setting: dict[str, Any],
                                    message: str) -> None:
    """Raw settings (not checked by ``hf_overrides``): ``LLM(...)`` raises a clear error."""
    overrides = {"architectures": ["TokensieveQwen2VLForConditionalGeneration"],
                 "tokensieve": setting}
    with pytest.raises(Exception, match=message):
        make_llm(checkpoints["qwen2"], overrides)


def test_image_below_budget_fails_its_request_only(checkpoints: dict[str, Path]) -> None:
    """Qwen images differ in size: one with fewer tokens than an int budget is refused with
    a clear error, and the engine goes on serving the others."""
    from PIL import Image
    from vllm import SamplingParams

    llm = make_llm(checkpoints["qwen2"], hf_overrides("divprune", 16,
                                                      architecture=ARCH["qwen2"]))
    try:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        small = Image.new("RGB", (16, 16), (200, 30, 30))  # 2 x 2 merged tokens
        with pytest.raises(ValueError, match="keep=16"):
            llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": small}}, params,
                         use_tqdm=False)
        out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": scene_images()[0]}},
                           params, use_tqdm=False)
        assert len(out[0].prompt_token_ids) == TEXT_TOKENS + 16
    finally:
        shutdown_llm(llm)
