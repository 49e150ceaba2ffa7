"""Shared pieces of the LLaVA-1.5-7B-geometry benchmarks (model builder, inputs, timing).

Used by ``bench_llava_prefill.py`` (pre-LLM methods) and ``bench_llm_prefill.py`` (in-LLM
methods); the scripts put this folder on ``sys.path`` when run as ``python benchmarks/...``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 32000
IMAGE_TOKENS = 576  # CLIP-L/336: a 24 x 24 grid


def build(llm_layers: int, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-7B-shaped model with random weights and ``llm_layers`` decoder layers
    (the full model has 32), in ``dtype``, eval mode, SDPA (the default)."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=llm_layers, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=IMAGE_TOKENS, projector_hidden_act="gelu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def inputs(dtype: torch.dtype, prefix: int, suffix: int) -> dict[str, torch.Tensor]:
    """One prompt: ``prefix`` text tokens, the 576 image placeholders, ``suffix`` text
    tokens (LLaVA-1.5's image starts at position 35), and one random 336 x 336 image."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 31000, (prefix + suffix,), generator=g)
    ids = torch.cat([text[:prefix], torch.full((IMAGE_TOKENS,), IMAGE_TOKEN),
                     text[prefix:]])[None]
    pixel_values = torch.randn(1, 3, 336, 336, generator=g).to(dtype)
    return {"input_ids": ids, "pixel_values": pixel_values}


CPU_TIMES: list[float] = []  # process CPU seconds of every timed() call, in order


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()``; its process CPU seconds go to ``CPU_TIMES`` (with one
    thread, CPU time is the compute cost, robust to other jobs on a shared machine)."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), time.process_time()
    CPU_TIMES.append(c1 - c0)
    return t1 - t0


def median_time(fn: Callable[[], Any], reps: int) -> float:
    """Median wall seconds of ``reps`` calls of ``fn`` (after one untimed warm-up call)."""
    fn()
    return statistics.median(timed(fn) for _ in range(reps))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, minimum, maximum and the interquartile range of ``values``."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2]}
