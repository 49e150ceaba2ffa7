"""Prefill time of LLaVA-1.5-7B geometry, untouched vs ``tokensieve.apply``-patched.

A ``LlavaForConditionalGeneration`` with the LLaVA-1.5-7B sizes (CLIP-L/336 tower: 24
layers, width 1024, 577 tokens; two-layer GELU projector; Llama-7B decoder: width 4096,
32 heads, MLP 11008, vocab 32064) and random weights, in bf16 on CPU, SDPA everywhere.
The decoder depth can be truncated (``--llm-layers``; the full model has 32) to fit the
time and memory at hand; the FLOPs-ideal speed-up is computed for the depth that runs.

Measured, interleaved over repeats (medians, and minima: the least disturbed runs on a
shared machine):
- prefill: ``model(input_ids, pixel_values, logits_to_keep=1)`` (what ``generate`` runs
  before the first token), untouched and patched at each budget;
- the FLOPs-ideal speed-up ``MACs(untouched) / MACs(patched)`` (``tokensieve.bench.flops``);
- the LLM alone on the prompt lengths of each budget (its own measured vs ideal speed-up)
  and the vision tower alone (CPU time);
- the cost of signal capture + selection: the patched call at keep=576 (identity
  reduction, every step runs) minus the untouched call, and, timed alone, the pieces
  tokensieve adds (CLS attention from q/k, the method's ``reduce``, the sequence surgery).

Run: ``python benchmarks/bench_llava_prefill.py --llm-layers 4 --repeats 3``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Any

import torch
from _common import CPU_TIMES, IMAGE_TOKEN, build, inputs, timed

import tokensieve as ts
from tokensieve.bench.flops import Plan, VLMDims, account
from tokensieve.models._signals import cls_attention
from tokensieve.models._surgery import plan_surgery

PREFIX, SUFFIX = 35, 30  # LLaVA-1.5: the image starts at position 35; a short question


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keeps", default="576,192,128,64")
    ap.add_argument("--method", default="fastervlm")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--identity-ab", type=int, default=0, metavar="N",
                    help="only measure the identity patch (keep=576) against the untouched "
                         "model, alternating N times (CPU time), and exit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16
    keeps = [int(k) for k in args.keeps.split(",")]

    t0 = time.perf_counter()
    model = build(args.llm_layers, dtype)
    batch = inputs(dtype, PREFIX, SUFFIX)
    print(f"built in {time.perf_counter() - t0:.0f}s; attention: "
          f"{model.config.text_config._attn_implementation}, threads {torch.get_num_threads()}")

    def untouched() -> None:
        model(**batch, logits_to_keep=1)

    if args.identity_ab:
        with torch.inference_mode():
            untouched()
            ab: dict[str, list[float]] = {"untouched": [], "identity": []}
            for _ in range(args.identity_ab):
                timed(untouched)
                ab["untouched"].append(CPU_TIMES[-1])
                with ts.applied(model, args.method, 576):
                    timed(untouched)
                ab["identity"].append(CPU_TIMES[-1])
        u, i = statistics.median(ab["untouched"]), statistics.median(ab["identity"])
        diffs = [b - a for a, b in zip(ab["untouched"], ab["identity"], strict=True)]
        print(f"identity patch vs untouched, CPU s (median of {args.identity_ab}): {u:.3f} vs "
              f"{i:.3f}: {100 * (i - u) / u:+.2f} %; paired differences median "
              f"{100 * statistics.median(diffs) / u:+.2f} % (min {100 * min(diffs) / u:+.2f}, "
              f"max {100 * max(diffs) / u:+.2f})")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"llm_layers": args.llm_layers, "cpu_times": ab}, f, indent=1)
        return

    def patched(k: int) -> Any:
        def run() -> None:
            with ts.applied(model, args.method, k):
                model(**batch, logits_to_keep=1)
        return run

    with torch.inference_mode():
        untouched()  # warm-up
        patched(keeps[-1])()
        times: dict[str, list[float]] = {"untouched": []}
        cpu: dict[str, list[float]] = {"untouched": []}
        for k in keeps:
            times[f"keep{k}"] = []
            cpu[f"keep{k}"] = []
        for rep in range(args.repeats):
            times["untouched"].append(timed(untouched))
            cpu["untouched"].append(CPU_TIMES[-1])
            for k in keeps:
                times[f"keep{k}"].append(timed(patched(k)))
                cpu[f"keep{k}"].append(CPU_TIMES[-1])
            print(f"repeat {rep}: " + ", ".join(
                f"{n} {v[-1]:.2f}s (cpu {cpu[n][-1]:.2f}s)" for n, v in times.items()),
                flush=True)

        # Pieces tokensieve adds, timed alone on tensors of the real sizes.
        attn = model.model.vision_tower.encoder.layers[22].self_attn
        captured: dict[str, torch.Tensor] = {}
        hooks = [getattr(attn, n).register_forward_hook(
            lambda _m, _i, o, n=n: captured.__setitem__(n, o)) for n in ("q_proj", "k_proj")]
        timed(lambda: model.model.vision_tower(batch["pixel_values"], output_hidden_states=True))
        vision_s = CPU_TIMES[-1]
        for h in hooks:
            h.remove()
        q, k_ = captured["q_proj"], captured["k_proj"]
        feats = torch.randn(1, 576, 4096, dtype=dtype)
        placeholder = batch["input_ids"] == IMAGE_TOKEN
        reps = 20
        signal_s = statistics.median(
            timed(lambda: cls_attention(q, k_, attn.num_heads, attn.scale)) for _ in range(reps))
        scores = cls_attention(q, k_, attn.num_heads, attn.scale)[:, 1:]
        select_s = {k: statistics.median(timed(lambda k=k: ts.reduce(
            feats, args.method, k, cls_attn=scores, grid=(24, 24))) for _ in range(reps))
            for k in keeps}
        surgery_s = statistics.median(timed(lambda: plan_surgery(
            placeholder, [576], [64], "right")) for _ in range(reps))

        # The LLM alone on the prompt lengths each budget gives (no vision tower).
        lm = model.model.language_model
        llm_s: dict[int, float] = {}
        for k in [576, *[k for k in keeps if k != 576]]:
            embeds = torch.randn(1, PREFIX + SUFFIX + k, 4096, dtype=dtype)
            lm(inputs_embeds=embeds)
            runs = []
            for _ in range(2):
                timed(lambda e=embeds: lm(inputs_embeds=e))
                runs.append(CPU_TIMES[-1])
            llm_s[k] = min(runs)

    dims = VLMDims.from_config(model.config)
    text_tokens = PREFIX + SUFFIX
    base_macs = account(dims, None, text_tokens=text_tokens).prefill
    med = {n: statistics.median(v) for n, v in times.items()}
    best = {n: min(v) for n, v in times.items()}
    cmed = {n: statistics.median(v) for n, v in cpu.items()}
    base_cost = account(dims, None, text_tokens=text_tokens)
    rows = []
    for k in keeps:
        cost = account(dims, Plan.pre_llm(k), text_tokens=text_tokens)
        macs = cost.prefill
        ideal = base_macs / macs
        measured = med["untouched"] / med[f"keep{k}"]
        measured_min = best["untouched"] / best[f"keep{k}"]
        llm_ideal = (base_cost.llm_prefill + base_cost.lm_head) / (cost.llm_prefill + cost.lm_head)
        measured_cpu = cmed["untouched"] / cmed[f"keep{k}"]
        rows.append({"keep": k, "prefill_s": med[f"keep{k}"], "speedup": measured,
                     "prefill_cpu_s": cmed[f"keep{k}"], "speedup_cpu": measured_cpu,
                     "of_ideal_cpu": measured_cpu / ideal,
                     "ideal_speedup": ideal, "of_ideal": measured / ideal,
                     "speedup_min": measured_min, "of_ideal_min": measured_min / ideal,
                     "prefill_gmacs": macs / 1e9, "llm_alone_s": llm_s.get(k),
                     "llm_alone_speedup": llm_s[576] / llm_s[k] if k in llm_s else None,
                     "llm_ideal_speedup": llm_ideal})
    overhead = med[f"keep{keeps[0]}"] - med["untouched"] if keeps[0] == 576 else math.nan
    added = signal_s + min(select_s.values()) + surgery_s
    result = {
        "model": "LLaVA-1.5-7B geometry, random weights", "llm_layers": args.llm_layers,
        "dtype": "bfloat16", "device": "cpu", "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "method": args.method,
        "repeats": args.repeats, "prompt_tokens": int(batch["input_ids"].shape[1]),
        "untouched_prefill_s": med["untouched"], "untouched_gmacs": base_macs / 1e9,
        "rows": rows, "vision_tower_s": vision_s,
        "signal_s": signal_s, "select_s": select_s, "surgery_s": surgery_s,
        "added_pieces_s": added, "added_pieces_of_prefill": added / med["untouched"],
        "identity_patch_overhead_s": overhead,
        "identity_patch_overhead_of_prefill": overhead / med["untouched"],
        "times": times, "cpu_times": cpu, "untouched_prefill_cpu_s": cmed["untouched"],
        "identity_patch_overhead_cpu_of_prefill": (cmed.get("keep576", math.nan)
                                                   - cmed["untouched"]) / cmed["untouched"],
    }
    print(f"\nuntouched prefill {med['untouched']:.2f}s ({base_macs / 1e9:.0f} GMACs, "
          f"{args.llm_layers} of 32 LLM layers)")
    print(f"{'keep':>5} {'wall s':>7} {'cpu s':>7} {'speed-up':>9} {'(min)':>6} {'(cpu)':>6} "
          f"{'ideal':>6} {'of ideal':>9} {'(min)':>6} {'(cpu)':>6} | {'LLM alone':>9} "
          f"{'ideal':>6}")
    for r in rows:
        print(f"{r['keep']:>5} {r['prefill_s']:>7.2f} {r['prefill_cpu_s']:>7.2f} "
              f"{r['speedup']:>9.2f} {r['speedup_min']:>6.2f} {r['speedup_cpu']:>6.2f} "
              f"{r['ideal_speedup']:>6.2f} {r['of_ideal']:>9.2f} {r['of_ideal_min']:>6.2f} "
              f"{r['of_ideal_cpu']:>6.2f} | {r['llm_alone_speedup'] or 0:>9.2f} "
              f"{r['llm_ideal_speedup']:>6.2f}")
    print(f"vision tower alone {vision_s:.2f}s cpu; LLM alone (cpu s): "
          f"{ {k: round(v, 2) for k, v in llm_s.items()} }")
    print(f"signal capture (CLS row from q/k) {signal_s * 1e3:.2f} ms, selection "
          f"{ {k: round(v * 1e3, 2) for k, v in select_s.items()} } ms, surgery "
          f"{surgery_s * 1e3:.2f} ms: {100 * added / med['untouched']:.3f} % of the prefill")
    print(f"identity patch (keep=576) minus untouched: {overhead:+.3f}s "
          f"({100 * overhead / med['untouched']:+.2f} % wall, "
          f"{100 * result['identity_patch_overhead_cpu_of_prefill']:+.2f} % cpu)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
