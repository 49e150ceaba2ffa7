"""Vision-tower time with in-encoder token reduction: CLIP-L/14-336 geometry, untouched vs
``tome`` (r = 8, 16) and ``evit`` (official: layers 6 / 12 / 18 of 24, keep rate 0.7).

A ``CLIPVisionModel`` with CLIP-L/14 at 336 px sizes (24 layers, width 1024, 16 heads, MLP
4096, 577 tokens), random weights, bf16 on CPU, SDPA. Measured, interleaved over repeats
(every variant once per round; medians, IQR, min / max):

- the tower's forward per batch size (wall and process CPU seconds; with ``--threads 1``
  the CPU time is the compute cost, robust to other jobs on a shared machine);
- the speed-up, the median over rounds of the round's untouched / patched CPU time, and
  from the fastest round of each (the least disturbed by other jobs on a shared machine);
- the FLOPs-ideal speed-up ``MACs(untouched) / MACs(patched)`` from the tokens every layer
  runs on (``EncoderStage.layer_tokens``, ``tokensieve.bench.flops``), and measured / ideal;
- the overhead of the reduction per reducing layer: the signal from the layer's q / k and
  the schedule's step (ToMe's matching and merge, EViT's ranking and fusion) timed alone on
  inputs of that layer's shape, summed over the layers that reduce;
- the static-shape speed-up: the untouched tower's own layers run on the token counts the
  method leaves at every layer (attention and MLP each on its count; the tokens are simply
  cut, no method work), timed in the same rounds. It is the best any reduction with those
  counts can reach on this machine: ``measured / static`` is the method's own efficiency,
  ``static / ideal`` how far the layers' matmuls fall short of scaling with their FLOPs at
  the reduced counts.

Run: ``python benchmarks/bench_encoder.py --threads 1 --batches 1,2,4 --repeats 5``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
from _common import spread
from transformers import CLIPVisionConfig, CLIPVisionModel

import tokensieve as ts
from tokensieve.bench.flops import StackDims
from tokensieve.models import get_state
from tokensieve.models._encoder import cls_attention_row
from tokensieve.models._signals import mean_keys

VARIANTS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "untouched": None, "tome r=8": ("tome", {"r": 8}), "tome r=16": ("tome", {"r": 16}),
    "evit": ("evit", {}),
}


def build(dtype: torch.dtype) -> CLIPVisionModel:
    """CLIP-L/14-336 sizes, random weights."""
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768, attn_implementation="sdpa")
    return CLIPVisionModel(cfg).to(dtype).eval()


def tower_macs(model: CLIPVisionModel, tokens: list[tuple[int, int]]) -> int:
    """Multiply-adds of the encoder layers (attention half on the first count, MLP on the
    second); the patch embedding is the same for every variant and left out."""
    dims = StackDims.from_config(model.config, gated=False)
    return sum(dims.layer_macs(a, mlp_tokens=b) for a, b in tokens)


def paired_ratio(ref: list[float], other: list[float]) -> float:
    """Median over rounds of ``ref[i] / other[i]``: each round times every variant back to
    back, so a round's ratio cancels the slow drifts of a shared machine that a ratio of
    two medians keeps."""
    return statistics.median(a / b for a, b in zip(ref, other, strict=True))


def static_forward(model: CLIPVisionModel, pixels: torch.Tensor,
                   tokens: list[tuple[int, int]]) -> torch.Tensor:
    """The untouched tower with its tokens cut to ``tokens`` ``[(attention, mlp)]`` per layer
    (each layer's attention on the first count, its MLP on the second): the same modules and
    kernels as the untouched forward, no reduction work."""
    vm = model.vision_model if hasattr(model, "vision_model") else model
    h = vm.pre_layrnorm(vm.embeddings(pixels))
    for layer, (a, m) in zip(vm.encoder.layers, tokens, strict=True):
        h = h[:, :a].contiguous()
        h = h + layer.self_attn(layer.layer_norm1(h), attention_mask=None)[0]
        h = h[:, :m].contiguous()
        h = h + layer.mlp(layer.layer_norm2(h))
    return vm.post_layernorm(h[:, 0])


def step_overhead(model: CLIPVisionModel, batch: int, reps: int) -> float:
    """Seconds per pass that the installed method adds outside the layers' own matmuls:
    the signal from q / k and the schedule's step at every reducing layer, timed alone."""
    stage = get_state(model).encoder
    tokens = stage.layer_tokens(577)
    dtype = next(model.parameters()).dtype
    heads, scale, width = stage.heads, stage.scale, 1024
    total = 0.0
    g = torch.Generator().manual_seed(0)
    for i, param in stage.plan.items():
        t = tokens[i][0]
        x = torch.randn(batch, t, width, generator=g).to(dtype)
        q = torch.randn(batch, t, width, generator=g).to(dtype)
        k = torch.randn(batch, t, width, generator=g).to(dtype)
        sizes = torch.ones(batch, t)

        def run(x: torch.Tensor = x, q: torch.Tensor = q, k: torch.Tensor = k,
                sizes: torch.Tensor = sizes, param: Any = param) -> None:
            signals = {}
            if "keys" in stage.schedule.signals:
                signals["keys"] = mean_keys(k, heads)
            if "cls_attn" in stage.schedule.signals:
                signals["cls_attn"] = cls_attention_row(q, k, heads, scale)
            stage.schedule.step(x, sizes, signals, param, True)

        run()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        total += statistics.median(times)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench_encoder.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16
    model = build(dtype)
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    pixels = {b: torch.randn(b, 3, 336, 336, generator=gen).to(dtype) for b in batches}
    ideal: dict[str, float] = {}
    overhead: dict[str, dict[int, float]] = {}
    tokens_out: dict[str, int] = {}
    counts: dict[str, list[tuple[int, int]]] = {}
    base = tower_macs(model, [(577, 577)] * 24)
    for name, v in VARIANTS.items():
        if v is None:
            ideal[name], tokens_out[name] = 1.0, 577
            continue
        ts.apply(model, v[0], **v[1])
        per = get_state(model).encoder.layer_tokens(577)
        counts[name] = per
        ideal[name] = base / tower_macs(model, per)
        tokens_out[name] = per[-1][1]
        overhead[name] = {b: step_overhead(model, b, 5) for b in batches}
        ts.remove(model)
    wall: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    static_cpu: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for rnd in range(args.repeats + 1):  # round 0: warm-up, not kept
            for b in batches:
                for name, v in VARIANTS.items():
                    if v is not None:
                        ts.apply(model, v[0], **v[1])
                    try:
                        c0, t0 = time.process_time(), time.perf_counter()
                        model(pixel_values=pixels[b])
                        t1, c1 = time.perf_counter(), time.process_time()
                    finally:
                        if v is not None:
                            ts.remove(model)
                    if rnd:
                        wall.setdefault((name, b), []).append(t1 - t0)
                        cpu.setdefault((name, b), []).append(c1 - c0)
                    if v is not None:
                        c0 = time.process_time()
                        static_forward(model, pixels[b], counts[name])
                        if rnd:
                            static_cpu.setdefault((name, b), []).append(
                                time.process_time() - c0)
    rows = []
    print(f"CLIP-L/14-336, bf16, CPU, {args.threads} thread(s), {args.repeats} interleaved "
          "rounds; times: median [IQR] (min-max) seconds")
    print(f"{'variant':<11} {'B':>2} {'tokens out':>10} {'wall s':>24} {'cpu s':>8} "
          f"{'speed-up':>8} {'ideal':>6} {'meas/ideal':>10} {'overhead %':>10} "
          f"{'static':>6} {'meas/static':>11}")
    for b in batches:
        ref = cpu[("untouched", b)]
        for name in VARIANTS:
            w, c = spread(wall[(name, b)]), spread(cpu[(name, b)])
            sp = paired_ratio(ref, cpu[(name, b)])
            ov = overhead.get(name, {}).get(b, 0.0)
            stat = static_cpu.get((name, b), cpu[(name, b)])
            st = paired_ratio(ref, stat) if (name, b) in static_cpu else 1.0
            # the fastest round of each: the least disturbed by other jobs
            sp_min, st_min = min(ref) / c["min"], min(ref) / min(stat)
            row = {"variant": name, "batch": b, "tokens_out": tokens_out[name], "wall": w,
                   "cpu": c, "speedup_cpu": sp, "ideal": ideal[name],
                   "measured_over_ideal": sp / ideal[name], "overhead_s": ov,
                   "overhead_share": ov / c["median"], "static_speedup": st,
                   "measured_over_static": sp / st, "static_cpu": spread(stat),
                   "speedup_min": sp_min, "static_speedup_min": st_min}
            rows.append(row)
            print(f"{name:<11} {b:>2} {tokens_out[name]:>10} "
                  f"{w['median']:>7.3f} [{w['q1']:.3f}-{w['q3']:.3f}] "
                  f"({w['min']:.2f}-{w['max']:.2f}) {c['median']:>6.3f} {sp:>8.2f} "
                  f"{ideal[name]:>6.2f} {sp / ideal[name]:>10.2f} "
                  f"{100 * ov / c['median']:>10.1f} {st:>6.2f} {sp / st:>11.2f}")
    print("\nfrom the fastest round of each (min CPU time): speed-up / ideal (ratio), "
          "static (measured / static)")
    for row in rows:
        if row["variant"] != "untouched":
            print(f"{row['variant']:<11} {row['batch']:>2} {row['speedup_min']:>6.2f} / "
                  f"{row['ideal']:.2f} ({row['speedup_min'] / row['ideal']:.2f})  "
                  f"{row['static_speedup_min']:>6.2f} "
                  f"({row['speedup_min'] / row['static_speedup_min']:.2f})")
    env = {"torch": torch.__version__, "threads": args.threads, "platform": platform.platform(),
           "repeats": args.repeats}
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
