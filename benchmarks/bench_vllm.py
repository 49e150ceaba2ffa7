"""Throughput and time to first token of vLLM with and without the tokensieve plugin.

vLLM (its CPU build here, ``scripts/setup_vllm_env.sh``) serves the embedded tiny LLaVA
(``tokensieve.zoo``: CLIP-like tower of 576 tokens per 192 px image, 3-layer LLM of width
128) unreduced and through ``TokensieveLlavaForConditionalGeneration`` with each method at
each budget (192 / 128 / 64 tokens per image; default ``fastervlm``, whose selection is a
top-k of CLS attention, and ``divprune``, a greedy max-min selection of ``K`` steps over
the 576 tokens). The LLM of this model is tiny, so its saving is small next to the tower
and the selection; on a 7B LLM the prefill dominates (see ``bench_llava_prefill.py``).

Each setting gets its own engine (in this process, one worker), a warm-up batch, then
``--repeats`` batches of ``--requests`` requests submitted at once (distinct scene images
and questions; prefix caching and the multimodal processor cache off, so every batch
encodes every image and prefills every prompt), ``--max-tokens`` generated tokens each
(``ignore_eos``). Reported, median over the batches: requests/s and generated tokens/s
(batch wall time), and the median time to first token over the batch's requests (vLLM's
``first_token_latency``: from arrival, so it includes queueing behind the batch).

Run with the vLLM environment's python::

    PY=$(bash scripts/setup_vllm_env.sh)
    "$PY" benchmarks/bench_vllm.py --requests 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokensieve.integrations.vllm._common import shutdown_llm  # noqa: E402

BUDGETS = (192, 128, 64)
IMAGE_TOKENS = 576


def make_llm(overrides: dict[str, Any], max_num_seqs: int) -> Any:
    """An engine on the embedded tiny LLaVA (float32, eager, no prefix / mm caching)."""
    from vllm import LLM

    from tokensieve.zoo import CHECKPOINT_DIR

    return LLM(model=str(CHECKPOINT_DIR), dtype="float32", hf_overrides=overrides,
               max_model_len=1024, enforce_eager=True, limit_mm_per_prompt={"image": 1},
               max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
               enable_prefix_caching=False, mm_processor_cache_gb=0,
               distributed_executor_backend="uni", seed=0, disable_log_stats=False)


def run_batch(llm: Any, requests: list[dict[str, Any]], max_tokens: int,
              ) -> dict[str, float]:
    """One batch submitted at once: wall seconds, generated tokens, median TTFT, prompt
    tokens of the first request."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.first_token_latency for o in outs
            if getattr(o, "metrics", None) is not None and o.metrics.first_token_latency > 0]
    return {"wall": wall, "generated": generated,
            "ttft": statistics.median(ttft) if ttft else float("nan"),
            "prompt_tokens": len(outs[0].prompt_token_ids)}


def bench(setting: str, overrides: dict[str, Any], batches: list[list[dict[str, Any]]],
          max_tokens: int, max_num_seqs: int) -> dict[str, Any]:
    """Engine start, one warm-up batch, then the timed batches (medians)."""
    t0 = time.perf_counter()
    llm = make_llm(overrides, max_num_seqs)
    start = time.perf_counter() - t0
    try:
        run_batch(llm, batches[0][:max(4, len(batches[0]) // 8)], max_tokens)  # warm-up
        runs = [run_batch(llm, b, max_tokens) for b in batches]
    finally:
        shutdown_llm(llm)
    n = len(batches[0])
    walls = [r["wall"] for r in runs]
    return {"setting": setting, "engine_start_s": start,
            "prompt_tokens": runs[0]["prompt_tokens"],
            "requests_per_s": statistics.median(n / w for w in walls),
            "gen_tokens_per_s": statistics.median(r["generated"] / r["wall"] for r in runs),
            "ttft_ms": 1000 * statistics.median(r["ttft"] for r in runs),
            "batch_s": walls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="fastervlm,divprune",
                   help="comma-separated methods, each at every budget")
    p.add_argument("--requests", type=int, default=64, help="requests per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per setting")
    p.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    from tokensieve.integrations.vllm import hf_overrides
    from tokensieve.zoo import scene_qa
    from tokensieve.zoo.build import PROMPT

    samples = scene_qa("test", args.requests * args.repeats)
    batches = [[{"prompt": PROMPT.format(question=s.question),
                 "multi_modal_data": {"image": s.image}}
                for s in samples[i * args.requests:(i + 1) * args.requests]]
               for i in range(args.repeats)]
    settings: list[tuple[str, dict[str, Any]]] = [
        ("unreduced (576)", {"architectures": ["TokensieveLlavaForConditionalGeneration"]})]
    settings += [(f"{m} {k}", hf_overrides(m, k)) for m in args.methods.split(",")
                 for k in BUDGETS]
    results = []
    for name, overrides in settings:
        r = bench(name, overrides, batches, args.max_tokens, args.max_num_seqs)
        results.append(r)
        print(f"  {name}: {r['requests_per_s']:.2f} req/s", flush=True)

    import torch
    import vllm

    base = results[0]
    print(f"\nvLLM {vllm.__version__} (CPU build), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.requests} requests per batch, {args.max_tokens} generated tokens each, "
          f"median of {args.repeats} batches\n")
    print("| setting | prompt tokens | requests/s | generated tokens/s | median TTFT (ms) "
          "| speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['setting']} | {r['prompt_tokens']} | {r['requests_per_s']:.2f} | "
              f"{r['gen_tokens_per_s']:.1f} | {r['ttft_ms']:.0f} | "
              f"{r['requests_per_s'] / base['requests_per_s']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
