"""Time every registered reduction method on random token sets (CPU by default).

Each cell runs ``ts.reduce`` with every signal a method may use (CLS attention over
3 layers, attention received, keys/values, 32 text tokens with a mask, the grid, and an
anyres layout for the methods that need one), once to warm up, then takes the median of
``--repeats`` calls. Per-sample targets: < 5 ms at N=576, k=64 and < 2 s at N=10,000,
k=1,000 (D=1,024).

    OMP_NUM_THREADS=2 python benchmarks/bench_methods.py
    python benchmarks/bench_methods.py --methods divprune,mmtok --sizes 576:64 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

import torch

import tokensieve as ts

TARGET_MS = {(576, 64): 5.0, (10_000, 1_000): 2_000.0}


def anyres_layout(n: int, b: int) -> tuple[ts.Partitions, tuple[int, int]] | None:
    """An overview image plus 3 crops (1 x 3 tiling) of ``side x side`` tokens holding
    exactly ``n`` tokens, when ``n / 4`` is a square (576 -> 12x12, 10,000 -> 50x50)."""
    per = n // 4
    side = math.isqrt(per)
    if side * side * 4 != n:
        return None
    ids = torch.arange(4).repeat_interleave(per)
    return ts.Partitions(ids=ids.unsqueeze(0).expand(b, -1).clone(), tiling=(1, 3),
                         grid=(side, side)), (side, side)


def make_inputs(b: int, n: int, d: int, seed: int = 0, m: int = 32, dk: int = 128,
                layers: int = 3) -> dict[str, Any]:
    """Random tokens ``[B, N, D]`` and every signal, on a square (or near-square) grid."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(b, layers, n, generator=g)
    side = math.isqrt(n)
    grid = (side, n // side) if side * (n // side) == n else None
    return {
        "tokens": torch.randn(b, n, d, generator=g),
        "cls_attn": attn / attn.sum(-1, keepdim=True),
        "attn_received": torch.rand(b, n, generator=g),
        "keys": torch.randn(b, n, dk, generator=g),
        "values": torch.randn(b, n, dk, generator=g),
        "text": torch.randn(b, m, d, generator=g),
        "text_mask": torch.ones(b, m, dtype=torch.bool),
        "grid": grid,
    }


def signals_for(method: str, inputs: dict[str, Any], n: int, b: int) -> dict[str, Any] | str:
    """The keyword signals for ``method`` (all it may use), or a reason it cannot run."""
    spec = ts.describe(method)
    wanted = set(spec.signals) | set(spec.optional_signals)
    out = {k: v for k, v in inputs.items() if k in wanted and v is not None}
    if "partitions" in spec.signals:
        layout = anyres_layout(n, b)
        if layout is None:
            return f"no anyres layout of {n} tokens"
        out["partitions"] = layout[0]
        out.pop("grid", None)
    return out


def time_cell(method: str, tokens: torch.Tensor, keep: int, signals: dict[str, Any],
              repeats: int, max_seconds: float, clock: str = "wall") -> tuple[float, int]:
    """Median seconds per call (after one warm-up call) and the number of timed calls.

    ``clock="cpu"`` measures this process's CPU time instead of wall time: on a shared
    machine with one torch thread it approximates the wall time of an idle one.
    """
    now = time.perf_counter if clock == "wall" else time.process_time
    sync = torch.cuda.synchronize if tokens.is_cuda else (lambda: None)
    start = now()
    ts.reduce(tokens, method, keep, **signals)
    sync()
    warm = now() - start
    runs = max(1, min(repeats, int(max_seconds / max(warm, 1e-9))))
    times = []
    for _ in range(runs):
        start = now()
        ts.reduce(tokens, method, keep, **signals)
        sync()
        times.append(now() - start)
    return statistics.median(times), runs


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        try:
            n, k = (int(v) for v in part.split(":"))
        except ValueError:
            raise SystemExit(f"--sizes: {part!r} is not N:K (e.g. 576:64)") from None
        if not 1 <= k <= n:
            raise SystemExit(f"--sizes: {part!r}: expected 1 <= K <= N")
        sizes.append((n, k))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all",
                        help="comma-separated method names (default: every registered one)")
    parser.add_argument("--sizes", default="576:64,10000:1000", help="N:K pairs, comma-separated")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=1024, help="token width D")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="fewer repeats (at least 1) when a cell would take longer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (for shared machines; "
                             "use with --threads 1)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = ts.list_methods() if args.methods == "all" else [
        ts.describe(m.strip()).name for m in args.methods.split(",") if m.strip()]
    sizes = parse_sizes(args.sizes)
    batches = [int(v) for v in args.batches.split(",")]
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"D={args.dim}, {args.clock} clock, median of up to {args.repeats} calls after "
          "1 warm-up")
    header = f"{'method':<12} {'N':>6} {'k':>5} {'B':>3} {'ms/call':>10} {'ms/sample':>10} " \
             f"{'target':>8}  met"
    print(header)
    print("-" * len(header))
    rows = []
    for n, k in sizes:
        for b in batches:
            inputs = make_inputs(b, n, args.dim)
            inputs = {key: (v.to(device) if isinstance(v, torch.Tensor) else v)
                      for key, v in inputs.items()}
            for method in methods:
                target = TARGET_MS.get((n, k))
                row: dict[str, Any] = {"method": method, "n": n, "k": k, "b": b,
                                       "target_ms_per_sample": target}
                signals = signals_for(method, inputs, n, b)
                if isinstance(signals, str):
                    row["error"] = signals
                else:
                    try:
                        sec, runs = time_cell(method, inputs["tokens"], k, signals,
                                              args.repeats, args.max_seconds, args.clock)
                        row.update(ms_per_call=sec * 1e3, ms_per_sample=sec * 1e3 / b,
                                   runs=runs)
                    except ValueError as err:
                        row["error"] = str(err)
                rows.append(row)
                tgt = "-" if target is None else f"{target:g}"
                if "error" in row:
                    print(f"{method:<12} {n:>6} {k:>5} {b:>3} {'n/a':>10} {'n/a':>10} "
                          f"{tgt:>8}  {row['error'][:60]}")
                else:
                    met = "-" if target is None else ("yes" if row["ms_per_sample"] < target
                                                      else "NO")
                    print(f"{method:<12} {n:>6} {k:>5} {b:>3} {row['ms_per_call']:>10.2f} "
                          f"{row['ms_per_sample']:>10.2f} {tgt:>8}  {met}")
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "dim": args.dim, "clock": args.clock,
                       "device": str(device), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
