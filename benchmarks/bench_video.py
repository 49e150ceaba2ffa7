"""Selection cost of the video methods next to the prefill they shorten (Qwen2-7B geometry).

A clip of ``--frames`` frames of ``--side x --side`` tokens (default 32 x 14 x 14 = 6,272
tokens, and 50 frames = 9,800, about 10k) with Qwen2-7B's LLM width (3,584), in bf16 on
CPU. Consecutive frames share most of their content (each frame is the previous one plus
noise, a few regions moving), so the temporal methods have real static and dynamic tokens.
Each method reduces the clip to ``--keep`` of its tokens (default 0.25) through
``tokensieve.reduce`` with the signals it reads (``frames``, the per-frame ``grid``, an
``attn_received`` per frame); image methods run per frame (``divprune``, ``pool``) as
``ts.apply(..., video="frame")`` does.

The prefill is one Qwen2-7B decoder layer (width 3,584, 28 query / 4 key-value heads, MLP
18,944, SDPA) on the reduced sequence (kept tokens + ``--text`` text tokens), times the 28
layers of the model: the "reduced prefill" the method's selection is compared with
(target: selection <= 5 % of it at 10k tokens). The layer is timed once per clip size;
methods are timed interleaved over ``--repeats`` rounds (median, min, max).

Run: ``python benchmarks/bench_video.py`` (about 3 minutes on 2 CPU cores; ``--json F``
writes the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

import tokensieve as ts
from tokensieve.core.budget import resolve_keep

sys.path.insert(0, os.path.dirname(__file__))
from _common import spread  # noqa: E402

WIDTH, HEADS, KV_HEADS, MLP, LAYERS = 3584, 28, 4, 18944, 28
#: Image methods run per frame (``video="frame"``) for comparison.
FRAME_METHODS = ("divprune", "pool")
#: Methods that cannot reach ``--keep`` (DyCoke keeps every other frame whole): their
#: official budget instead, ``(keep, options)``; their prefill is timed at their own count.
OFFICIAL_BUDGET = {"dycoke": (1.0, {"prune_ratio": 0.7})}


def clip(frames: int, side: int, width: int, dtype: torch.dtype, seed: int = 0,
         ) -> dict[str, Any]:
    """A synthetic clip with its signals (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    base = torch.randn(n, width, generator=g)
    steps = 0.15 * torch.randn(frames, n, width, generator=g)
    moving = torch.rand(frames, n, generator=g) < 0.1  # a tenth of the tokens change a lot
    steps = steps + moving[..., None] * torch.randn(frames, n, width, generator=g)
    steps[0] = 0
    tokens = (base + steps.cumsum(0)).reshape(1, frames * n, width)
    attn = torch.rand(frames, n, generator=g).softmax(-1).reshape(1, -1)
    return {"tokens": tokens.to(dtype), "attn_received": attn, "frames": frames,
            "grid": (side, side)}


def run_method(method: str, inputs: dict[str, Any], keep: float) -> ts.Reduction:
    """One reduction of the clip as ``apply`` would run it."""
    tokens = inputs["tokens"]
    keep, options = OFFICIAL_BUDGET.get(method, (keep, {}))
    if method in FRAME_METHODS:
        t, (h, w) = inputs["frames"], inputs["grid"]
        per_frame = tokens.reshape(t, h * w, -1)
        return ts.reduce(per_frame, method, keep, grid=(h, w),
                         attn_received=inputs["attn_received"].reshape(t, -1))
    signals = {k: v for k, v in inputs.items() if k != "tokens"}
    return ts.reduce(tokens, method, keep, **signals, **options)


def _count(r: ts.Reduction, method: str, frames: int) -> int:
    """Tokens the clip keeps (per-frame methods: every frame's)."""
    return r.num_tokens * (frames if method in FRAME_METHODS else 1)


def decoder_layer(dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """One Qwen2-7B decoder layer (random weights) and its rotary embedding."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    cfg = Qwen2Config(hidden_size=WIDTH, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      intermediate_size=MLP, num_hidden_layers=1, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        layer = Qwen2DecoderLayer(cfg, layer_idx=0).eval()
        rope = Qwen2RotaryEmbedding(cfg)
    finally:
        torch.set_default_dtype(previous)
    return layer, rope


@torch.no_grad()
def layer_seconds(layer: torch.nn.Module, rope: Any, length: int, dtype: torch.dtype,
                  reps: int) -> list[float]:
    """Wall seconds of the layer on a causal sequence of ``length`` tokens."""
    x = torch.randn(1, length, WIDTH, dtype=dtype)
    pos = torch.arange(length)[None]
    emb = rope(x, pos)
    out = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        layer(x, attention_mask=None, position_ids=pos, position_embeddings=emb,
              is_causal=True)
        out.append(time.perf_counter() - t0)
    return out[1:]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 50])
    parser.add_argument("--side", type=int, default=14)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer-repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    video = [m for m in ts.list_methods() if "frames" in ts.describe(m).signals]
    methods = args.methods or video + list(FRAME_METHODS)
    layer, rope = decoder_layer(dtype)
    results: dict[str, Any] = {"settings": vars(args), "threads": torch.get_num_threads(),
                               "load": os.getloadavg(), "sizes": []}
    for frames in args.frames:
        inputs = clip(frames, args.side, WIDTH, dtype)
        n = inputs["tokens"].shape[1]
        kept = resolve_keep(args.keep, n)
        counts = {m: _count(run_method(m, inputs, args.keep), m, frames) for m in methods}
        prefills = {c: [LAYERS * s for s in layer_seconds(layer, rope, c + args.text, dtype,
                                                           args.layer_repeats)]
                    for c in sorted({kept, *counts.values()})}
        prefill = prefills[kept]
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.repeats):
            order = methods if r % 2 == 0 else methods[::-1]
            for m in order:
                t0 = time.perf_counter()
                run_method(m, inputs, args.keep)
                times[m].append(time.perf_counter() - t0)
        med_prefill = statistics.median(prefill)
        size = {"frames": frames, "tokens": n, "kept": kept,
                "reduced_prefill_s": spread(prefill), "methods": {}}
        print(f"\n{frames} frames x {args.side}x{args.side} = {n} tokens -> {kept} kept "
              f"(+{args.text} text); reduced prefill ({LAYERS} x one layer): "
              f"{med_prefill:.2f} s")
        print(f"{'method':<14}{'tokens':>8}{'selection ms':>14}{'min':>9}{'max':>9}"
              f"{'% of its prefill':>18}")
        for m in methods:
            s = spread(times[m])
            own = statistics.median(prefills[counts[m]])
            share = 100 * s["median"] / own
            size["methods"][m] = {**{k: v * 1e3 for k, v in s.items()}, "tokens": counts[m],
                                  "reduced_prefill_s": own, "percent": share}
            print(f"{m:<14}{counts[m]:>8}{s['median'] * 1e3:>14.1f}{s['min'] * 1e3:>9.1f}"
                  f"{s['max'] * 1e3:>9.1f}{share:>17.2f}%")
        results["sizes"].append(size)
    results["load_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
