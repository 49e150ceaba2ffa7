"""Time every registered reduction method on random token sets (CPU by default).

Each cell runs ``ts.reduce`` with every signal a method may use (CLS attention over
3 layers, attention received, keys/values, 32 text tokens with a mask, the grid, and an
anyres layout for the methods that need one), once to warm up, then takes the median of
``--repeats`` calls. Per-sample targets: < 5 ms at N=576, k=64 and < 2 s at N=10,000,
k=1,000 (D=1,024).

Next to each method with a re-statement of its official code (``_official.py``: divprune,
todre, cdpruner, mmtok, visionzip, fastervlm) the same repeats time that re-statement on the
same inputs, interleaved with the method's calls (``official`` and ``x off``: tokensieve's
time over the official one; ``same``: whether both give the same selection); for the greedy
selections also the similarity matmul they cannot avoid (``matmul``: L2-normalise and
``X X^T``, ``x mm``: tokensieve over it). Medians; ``spread`` is tokensieve's
``(max - min) / median`` over the repeats (``!`` above 25 %: a noisy cell). On a shared
machine use one thread and the CPU clock:

    python benchmarks/bench_methods.py --threads 1 --clock cpu --sizes 576:64,2880:320
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
from _official import OFFICIAL, similarity_matmul

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


def _agree(ours: ts.Reduction, official: torch.Tensor) -> bool:
    """Whether a re-statement's output (sorted indices, or output tokens) matches ours."""
    if official.dtype == torch.long:
        return torch.equal(ours.indices.sort(dim=1).values.cpu(), official.cpu())
    return ours.tokens.shape == official.shape and bool(
        torch.allclose(ours.tokens.float().cpu(), official.float().cpu(), atol=1e-5))


def time_cell(method: str, tokens: torch.Tensor, keep: int, signals: dict[str, Any],
              repeats: int, max_seconds: float, clock: str = "wall",
              compare: bool = True) -> dict[str, Any]:
    """Time ``method`` (after one warm-up call), interleaved with its official re-statement
    and, for greedy selections, the similarity matmul (when ``compare`` and one exists).

    Returns ``ms`` (median per call), ``spread`` ((max - min) / median), ``runs``, and where
    measured ``official_ms``, ``same`` and ``matmul_ms``. ``clock="cpu"`` measures this
    process's CPU time instead of wall time: on a shared machine with one torch thread it
    approximates the wall time of an idle one.
    """
    now = time.perf_counter if clock == "wall" else time.process_time
    sync = torch.cuda.synchronize if tokens.is_cuda else (lambda: None)
    calls: dict[str, Any] = {"ours": lambda: ts.reduce(tokens, method, keep, **signals)}
    if compare and method in OFFICIAL and not tokens.is_cuda:
        official, greedy = OFFICIAL[method]
        calls["official"] = lambda: official(tokens, keep, signals)
        if greedy:
            calls["matmul"] = lambda: similarity_matmul(tokens)
    start = now()
    first = {name: fn() for name, fn in calls.items()}   # warm-up (and the outputs to compare)
    sync()
    warm = now() - start
    runs = max(1, min(repeats, int(max_seconds / max(warm, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            start = now()
            fn()
            sync()
            times[name].append(now() - start)
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    ours = times["ours"]
    out: dict[str, Any] = {"ms": med["ours"], "runs": runs,
                           "spread": (max(ours) - min(ours)) / max(statistics.median(ours), 1e-12)}
    if "official" in calls:
        out.update(official_ms=med["official"], same=_agree(first["ours"], first["official"]))
    if "matmul" in calls:
        out["matmul_ms"] = med["matmul"]
    return out


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


def format_row(row: dict[str, Any], tgt: str) -> str:
    """One table line of a timed cell (``-`` where nothing was compared)."""
    target = row["target_ms_per_sample"]
    met = "-" if target is None else ("yes" if row["ms_per_sample"] < target else "NO")
    spread = f"{row['spread']:.0%}" + ("!" if row["spread"] > 0.25 else " ")
    ms = row["ms_per_call"]
    off = row.get("official_ms")
    mm = row.get("matmul_ms")
    same = "-" if "same" not in row else ("yes" if row["same"] else "NO")
    return (f"{row['method']:<12} {row['n']:>6} {row['k']:>5} {row['b']:>3} {ms:>10.2f} "
            f"{spread:>7} {row['ms_per_sample']:>10.2f} {tgt:>7} {met:>3} "
            + (f"{off:>9.2f} {ms / off:>6.2f} " if off else f"{'-':>9} {'-':>6} ")
            + f"{same:>4} "
            + (f"{mm:>8.2f} {ms / mm:>5.2f}" if mm else f"{'-':>8} {'-':>5}"))


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
    parser.add_argument("--no-official", action="store_true",
                        help="skip the official re-statements and the similarity matmul")
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
    header = f"{'method':<12} {'N':>6} {'k':>5} {'B':>3} {'ms/call':>10} {'spread':>7} " \
             f"{'ms/sample':>10} {'target':>7} {'met':>3} {'official':>9} {'x off':>6} " \
             f"{'same':>4} {'matmul':>8} {'x mm':>5}"
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
                        cell = time_cell(method, inputs["tokens"], k, signals, args.repeats,
                                         args.max_seconds, args.clock,
                                         compare=not args.no_official)
                        row.update(ms_per_call=cell["ms"], ms_per_sample=cell["ms"] / b,
                                   runs=cell["runs"], spread=cell["spread"])
                        for key in ("official_ms", "same", "matmul_ms"):
                            if key in cell:
                                row[key] = cell[key]
                    except ValueError as err:
                        row["error"] = str(err)
                rows.append(row)
                tgt = "-" if target is None else f"{target:g}"
                if "error" in row:
                    print(f"{method:<12} {n:>6} {k:>5} {b:>3} {'n/a':>10} {'':>7} {'n/a':>10} "
                          f"{tgt:>7}  {row['error'][:60]}")
                else:
                    print(format_row(row, tgt))
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "dim": args.dim, "clock": args.clock,
                       "device": str(device), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
