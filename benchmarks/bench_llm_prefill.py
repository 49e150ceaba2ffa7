"""Prefill time of the in-LLM methods (fastv, pdrop) at LLaVA-1.5-7B geometry.

Untouched vs patched, against the FLOPs ideal and against FastV's official way of getting
its scores.

The model is ``_common.build``: a ``LlavaForConditionalGeneration`` with the LLaVA-1.5-7B
sizes (CLIP-L/336 tower; Llama-7B decoder: width 4096, 32 heads, MLP 11008) and random
weights, bf16 on CPU, SDPA. The decoder is truncated to ``--llm-layers`` of its 32 layers
(printed with the results); the FLOPs ideal is computed for the depth that runs. The prompt
is 576 image tokens between 35 and 5 text tokens (40 text tokens).

Measured, interleaved over ``--repeats`` (median, min and max of each variant):

1. prefill, ``model(input_ids, pixel_values, logits_to_keep=1)`` (what ``generate`` runs
   before the first token): untouched; ``fastv`` (K=``--layer``, keep 288 = R 50 % and
   144 = R 75 %); ``pdrop`` (its default schedule scaled to the depth: a quarter, half and
   three quarters, 288/144/72 tokens) and ``pdrop`` at ``keep=--pdrop-keep`` (average image
   tokens per layer). ``--no-vision`` feeds the tower's cached output instead of the pixels
   (``mm_encoder_outputs``), so only the LLM runs. Each repeat also times the tower alone,
   so the LLM part of every prefill (prefill minus tower) is reported too.
2. the FLOPs-ideal speed-up ``MACs(untouched) / MACs(patched)`` of each schedule
   (``tokensieve.bench.flops.account``; tower + projector + LLM + LM head, or LLM + head
   for the LLM part) and ``measured / ideal`` (target >= 0.95).
3. FastV's official score path, timed on the same inputs with the same cut (tokensieve's
   fastv, K and keep 288 as above): "eager LLM" runs every decoder layer with eager
   attention and ``output_attentions=True`` (the official code is a transformers 4.31
   fork where Llama attention is eager; it reads layer K-1's attention weights), "eager
   K-1" runs only layer K-1 in eager (the minimum a port to current transformers needs to
   get those weights); both are reported as prefill time and ratio to tokensieve's fastv.
   Both also run tokensieve's own q/k scores (item 4: a fraction of a percent). The top-k
   of the eager weights is compared with tokensieve's kept set (agreement).
4. the score overhead of tokensieve's stage: ``_llm_scores.attention_rows`` timed alone on
   layer K-1's real q/k projections and position embeddings, plus the method's ``reduce``
   (top-k), as a percentage of the fastv prefill (target <= 1 %); and, measured in situ
   during the timed runs, the stage's ``_scores`` and whole ``_cut`` (scores, reduce, the
   gathers onto the kept columns) per prefill.

Wall time is the headline (CPU seconds, the sum over torch's threads, are in the JSON). The
load average at start and end is printed: on a shared machine other jobs stretch the runs
they overlap (min and max show it), and the many small multi-threaded ops of the score
pieces suffer most from it; compare minima there.

Run (about 3 minutes on 2 otherwise idle CPU cores with the defaults, build included):
``python benchmarks/bench_llm_prefill.py --out bench_llm_prefill.json``;
``--llm-layers 32 --repeats 3`` for the whole decoder where time and memory allow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import CPU_TIMES, IMAGE_TOKEN, IMAGE_TOKENS, build, inputs, spread, timed

import tokensieve as ts
from tokensieve.bench.flops import Cost, Plan, VLMDims, account
from tokensieve.core.registry import get_method
from tokensieve.models import get_state
from tokensieve.models._llm_scores import attention_rows, visible_keys

PREFIX, SUFFIX = 35, 5  # LLaVA-1.5: the image starts at position 35; a short question


@dataclass
class Variant:
    """One timed configuration: a method with its keep and options (None: untouched), and
    how the LLM's attention runs (``eager``: None = SDPA, "llm" = every layer eager with
    output_attentions, "layer" = only the scoring layer K-1 eager)."""

    name: str
    method: str | None = None
    keep: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    eager: str | None = None
    schedule: list[tuple[int, int]] = field(default_factory=list)  # filled from the run


def planned(method: str, keep: int | None, options: dict[str, Any],
            depth: int) -> list[tuple[int, int]]:
    """The method's own schedule: (cut layer, image tokens kept from it on)."""
    sched = get_method(method).make_config(options)
    counts = sched.counts(IMAGE_TOKENS, keep, depth)
    return list(zip(sched.cut_layers(depth), counts, strict=True))


@contextmanager
def eager_layer(text: torch.nn.Module, layer: int, store: dict[str, Any]) -> Iterator[None]:
    """Run decoder layer ``layer``'s attention with eager attention (an additive causal
    mask), keeping its attention weights in ``store["weights"]``; the others stay SDPA."""
    attn = text.layers[layer].self_attn
    cfg = attn.config

    def pre(_m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        t = hidden.shape[1]
        mask = kwargs.get("attention_mask")
        low = torch.finfo(hidden.dtype).min
        if mask is None:
            mask = torch.full((t, t), low, dtype=hidden.dtype).triu(1)[None, None]
        elif mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(~mask, low)
        cfg._attn_implementation = "eager"
        return args, {**kwargs, "attention_mask": mask}

    def post(_m: torch.nn.Module, _args: tuple, output: Any) -> None:
        cfg._attn_implementation = "sdpa"
        store["weights"] = output[1]

    handles = [attn.register_forward_pre_hook(pre, with_kwargs=True),
               attn.register_forward_hook(post, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        cfg._attn_implementation = "sdpa"


class StageClock:
    """Wraps the in-LLM stage's ``_scores`` and ``_cut`` on the instance to sum their wall
    seconds during one call (the instance attribute shadows the method; removed with the
    patch)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.scores = 0.0
        self.cut = 0.0
        stage = get_state(model).llm
        for name in ("_scores", "_cut"):
            setattr(stage, name, self._wrap(name, getattr(stage, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                if name == "_scores":
                    self.scores += dt
                else:
                    self.cut += dt
        return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm-layers", type=int, default=8,
                    help="decoder layers kept of LLaVA-1.5-7B's 32 (default 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", type=int, default=2, help="fastv's K (default 2)")
    ap.add_argument("--fastv-keeps", default="288,144", help="fastv budgets (R 50 %%, 75 %%)")
    ap.add_argument("--pdrop-keep", type=int, default=192,
                    help="pdrop's budget: average image tokens per LLM layer")
    ap.add_argument("--no-vision", action="store_true",
                    help="leave the vision tower out of the timed calls (its cached output)")
    ap.add_argument("--no-eager", action="store_true", help="skip the official score path")
    ap.add_argument("--score-reps", type=int, default=30,
                    help="repeats of the stand-alone score timings")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16
    depth, k_layer = args.llm_layers, args.layer
    fastv_keeps = [int(k) for k in args.fastv_keeps.split(",")]

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    model = build(depth, dtype)
    batch = inputs(dtype, PREFIX, SUFFIX)
    text = model.model.language_model
    n_text = PREFIX + SUFFIX
    print(f"built in {time.perf_counter() - t0:.0f}s; LLaVA-1.5-7B geometry, random weights, "
          f"bf16, CPU, {torch.get_num_threads()} threads; LLM truncated to {depth} of 32 decoder "
          f"layers; {IMAGE_TOKENS} image + {n_text} text tokens; attention "
          f"{model.config.text_config._attn_implementation}; vision tower "
          f"{'excluded' if args.no_vision else 'included'}", flush=True)

    fastv_opts = {"layer": k_layer}
    variants = [Variant("untouched")]
    variants += [Variant(f"fastv K={k_layer} keep={k} (R {100 * (1 - k / IMAGE_TOKENS):.0f} %)",
                         "fastv", k, fastv_opts) for k in fastv_keeps]
    variants += [Variant("pdrop default", "pdrop"),
                 Variant(f"pdrop keep={args.pdrop_keep}", "pdrop", args.pdrop_keep)]
    reference = variants[1]
    if not args.no_eager:
        variants += [Variant(f"fastv keep={reference.keep}, eager LLM", "fastv",
                             reference.keep, fastv_opts, eager="llm"),
                     Variant(f"fastv keep={reference.keep}, eager K-1", "fastv",
                             reference.keep, fastv_opts, eager="layer")]
    for v in variants:
        if v.method is not None:
            v.schedule = planned(v.method, v.keep, v.options, depth)

    with torch.inference_mode():
        pixel_values = batch["pixel_values"]
        features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        call = ({"input_ids": batch["input_ids"], "mm_encoder_outputs": {"image": features}}
                if args.no_vision else batch)

        def tower() -> None:
            model.model.get_image_features(pixel_values=pixel_values, return_dict=True)

        eager_store: dict[str, Any] = {}
        found: dict[str, Any] = {}
        clocks: dict[str, list[tuple[float, float]]] = {v.name: [] for v in variants}

        def run(v: Variant) -> None:
            kwargs: dict[str, Any] = {"logits_to_keep": 1}
            if v.eager == "llm":
                kwargs["output_attentions"] = True
            if v.method is None:
                model(**call, **kwargs)
                return
            with ts.applied(model, v.method, v.keep, **v.options):
                clock = StageClock(model)
                if v.eager == "layer":
                    with eager_layer(text, k_layer - 1, eager_store):
                        out = model(**call, **kwargs)
                else:
                    out = model(**call, **kwargs)
                cuts = get_state(model).llm.last
                found[v.name] = ([(c.layer, int(c.kept[0].numel())) for c in cuts],
                                 cuts[0].kept[0].clone())
                if v.eager == "llm":
                    eager_store["weights_llm"] = out.attentions[k_layer - 1]
            clocks[v.name].append((clock.scores, clock.cut))

        def timed_run(v: Variant) -> float:
            if v.eager == "llm":
                text.set_attn_implementation("eager")
            try:
                return timed(lambda: run(v))
            finally:
                if v.eager == "llm":
                    text.set_attn_implementation("sdpa")

        for v in variants[:2]:  # warm-up (the first calls allocate)
            timed_run(v)
        for c in clocks.values():
            c.clear()
        wall: dict[str, list[float]] = {v.name: [] for v in variants}
        cpu: dict[str, list[float]] = {v.name: [] for v in variants}
        wall["vision tower"], cpu["vision tower"] = [], []
        t_loop = time.perf_counter()
        for rep in range(args.repeats):
            order = variants if rep % 2 == 0 else variants[::-1]
            for v in order:
                wall[v.name].append(timed_run(v))
                cpu[v.name].append(CPU_TIMES[-1])
            if not args.no_vision:
                wall["vision tower"].append(timed(tower))
                cpu["vision tower"].append(CPU_TIMES[-1])
            print(f"repeat {rep}: " + ", ".join(f"{n} {w[-1]:.2f}s" for n, w in wall.items()
                                                if w), flush=True)
        loop_s = time.perf_counter() - t_loop
        for v in variants:
            if v.method is not None and found[v.name][0] != v.schedule:
                raise RuntimeError(f"{v.name}: the stage cut {found[v.name][0]}, the method's "
                                   f"schedule says {v.schedule}")

        # 4. the score pieces alone, on layer K-1's real projections and positions.
        captured: dict[str, Any] = {}
        attn = text.layers[k_layer - 1].self_attn
        hooks = [
            attn.register_forward_pre_hook(lambda _m, _a, kw: captured.__setitem__(
                "pos", kw["position_embeddings"]), with_kwargs=True),
            attn.q_proj.register_forward_hook(lambda _m, _i, o: captured.__setitem__("q", o)),
            attn.k_proj.register_forward_hook(lambda _m, _i, o: captured.__setitem__("k", o)),
            text.layers[k_layer].register_forward_pre_hook(lambda _m, a, kw: captured.__setitem__(
                "hidden", kw["hidden_states"] if "hidden_states" in kw else a[0]),
                with_kwargs=True),
        ]
        model(**call, logits_to_keep=1)
        for h in hooks:
            h.remove()
        t_all = captured["k"].shape[1]
        cols = torch.tensor([[t_all - 1]])
        q_last = captured["q"][:, -1:]
        cos, sin = captured["pos"]
        valid = torch.ones(1, t_all, dtype=torch.bool)
        img_cols = (batch["input_ids"][0] == IMAGE_TOKEN).nonzero()[:, 0]
        image_hidden = captured["hidden"][:, img_cols]

        def rows() -> torch.Tensor:
            return attention_rows(attn, q_last, captured["k"], cos, sin, cols,
                                  visible_keys(cols, valid, None))

        query_attn = rows()[:, 0, img_cols]
        piece_s: dict[str, float] = {}
        piece_min_s: dict[str, float] = {}
        for name, fn in [("attention_rows", rows)] + [
                (f"reduce keep={k}", lambda k=k: ts.reduce(
                    image_hidden, "fastv", k, query_attn=query_attn, **fastv_opts))
                for k in fastv_keeps]:
            fn()
            runs = [timed(fn) for _ in range(args.score_reps)]
            piece_s[name], piece_min_s[name] = statistics.median(runs), min(runs)

        # official-path scores vs tokensieve's kept set (same cut, keep of the reference)
        agreement: dict[str, float] = {}
        kept = set(found[reference.name][1].tolist())
        for key, label in (("weights_llm", "eager LLM"), ("weights", "eager K-1")):
            if key in eager_store:
                w = eager_store[key][0, :, -1].float().mean(0)[img_cols]
                top = set(torch.topk(w, reference.keep).indices.tolist())
                agreement[label] = len(top & kept) / reference.keep

    # -- FLOPs ideal and the table -----------------------------------------------------------
    dims = VLMDims.from_config(model.config)

    def macs(cost: Cost, llm_only: bool) -> int:
        return cost.llm_prefill + cost.lm_head if llm_only else cost.prefill

    base = account(dims, None, text_tokens=n_text)
    stats = {n: spread(w) for n, w in wall.items() if w}
    u = stats["untouched"]
    tower_med = stats["vision tower"]["median"] if "vision tower" in stats else 0.0
    rows_out = []
    for v in variants:
        cost = account(dims, Plan.llm_schedule(v.schedule) if v.schedule else None,
                       text_tokens=n_text)
        ideal = macs(base, args.no_vision) / macs(cost, args.no_vision)
        llm_ideal = macs(base, True) / macs(cost, True)
        s = stats[v.name]
        speedup = u["median"] / s["median"]
        row = {"variant": v.name, "method": v.method, "keep": v.keep, "options": v.options,
               "eager": v.eager, "schedule": v.schedule, "wall_s": s,
               "cpu_s_median": statistics.median(cpu[v.name]),
               "gmacs": macs(cost, args.no_vision) / 1e9,
               "speedup": speedup, "speedup_min": u["min"] / s["min"],
               "ideal": ideal, "of_ideal": speedup / ideal,
               "of_ideal_min": u["min"] / s["min"] / ideal, "llm_ideal": llm_ideal}
        if not args.no_vision:
            llm_speedup = (u["median"] - tower_med) / (s["median"] - tower_med)
            row.update(llm_part_s=s["median"] - tower_med, llm_speedup=llm_speedup,
                       llm_of_ideal=llm_speedup / llm_ideal)
        if clocks[v.name]:
            row["in_situ_scores_s"] = statistics.median(c[0] for c in clocks[v.name])
            row["in_situ_cut_s"] = statistics.median(c[1] for c in clocks[v.name])
        rows_out.append(row)

    by_name = {r["variant"]: r for r in rows_out}
    ref = by_name[reference.name]
    ref_s = ref["wall_s"]["median"]
    score_s = {k: piece_s["attention_rows"] + piece_s[f"reduce keep={k}"] for k in fastv_keeps}
    score_min_s = {k: piece_min_s["attention_rows"] + piece_min_s[f"reduce keep={k}"]
                   for k in fastv_keeps}
    result: dict[str, Any] = {
        "model": "LLaVA-1.5-7B geometry, random weights", "llm_layers": depth,
        "llm_layers_full": 32, "dtype": "bfloat16", "device": "cpu",
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "image_tokens": IMAGE_TOKENS, "text_tokens": n_text,
        "vision_tower": not args.no_vision, "repeats": args.repeats, "timed_loop_s": loop_s,
        "untouched_gmacs": macs(base, args.no_vision) / 1e9, "rows": rows_out,
        "vision_tower_s": stats.get("vision tower"),
        "load_average_start_end": [load_start, os.getloadavg()],
        "score_pieces_s": piece_s, "score_pieces_min_s": piece_min_s,
        "score_overhead_s": score_s, "score_overhead_min_s": score_min_s,
        "score_overhead_of_fastv_prefill": {
            k: score_s[k] / by_name[variants[1 + i].name]["wall_s"]["median"]
            for i, k in enumerate(fastv_keeps)},
        "eager_vs_fastv": {r["variant"]: r["wall_s"]["median"] / ref_s
                           for r in rows_out if r["eager"]},
        "eager_topk_agreement": agreement, "wall_s": wall, "cpu_s": cpu,
    }

    print(f"\nLLaVA-1.5-7B geometry (random weights, bf16, CPU, {result['threads']} threads), "
          f"LLM truncated to {depth} of 32 decoder layers, {IMAGE_TOKENS} image + {n_text} text "
          f"tokens, vision tower {'excluded' if args.no_vision else 'included'}; "
          f"{args.repeats} interleaved repeats, wall s")
    head = (f"{'variant':<30} {'schedule (layer, kept)':<26} {'median':>7} {'min':>6} "
            f"{'max':>6} {'speed-up':>8} {'ideal':>6} {'meas/ideal':>10} {'(min)':>6}")
    if not args.no_vision:
        head += f" | {'LLM part':>8} {'ideal':>6} {'of ideal':>8}"
    print(head)
    for r in rows_out:
        s = r["wall_s"]
        sched = " ".join(f"({a},{b})" for a, b in r["schedule"]) or "-"
        line = (f"{r['variant']:<30} {sched:<26} {s['median']:>7.2f} {s['min']:>6.2f} "
                f"{s['max']:>6.2f} {r['speedup']:>8.2f} {r['ideal']:>6.2f} "
                f"{r['of_ideal']:>10.3f} {r['of_ideal_min']:>6.3f}")
        if not args.no_vision:
            line += (f" | {r['llm_speedup']:>8.2f} {r['llm_ideal']:>6.2f} "
                     f"{r['llm_of_ideal']:>8.3f}")
        print(line)
    if "vision tower" in stats:
        vt = stats["vision tower"]
        print(f"vision tower + projector alone: {vt['median']:.2f}s "
              f"[{vt['min']:.2f}, {vt['max']:.2f}] (subtracted for the LLM part)")
    for r in rows_out:
        if r["eager"]:
            agree = agreement.get("eager LLM" if r["eager"] == "llm" else "eager K-1")
            print(f"official score path, {r['variant']}: {r['wall_s']['median']:.2f}s = "
                  f"{r['wall_s']['median'] / ref_s:.3f} x tokensieve's fastv "
                  f"({ref_s:.2f}s); its top-{reference.keep} agrees with tokensieve's kept set "
                  f"on {100 * (agree or 0):.1f} %")
    for i, k in enumerate(fastv_keeps):
        fv = by_name[variants[1 + i].name]
        print(f"score overhead, fastv keep={k}: attention_rows "
              f"{piece_s['attention_rows'] * 1e3:.2f} ms + reduce "
              f"{piece_s[f'reduce keep={k}'] * 1e3:.2f} ms = {score_s[k] * 1e3:.2f} ms, "
              f"{100 * score_s[k] / fv['wall_s']['median']:.3f} % of its prefill "
              f"(target <= 1 %; minima {score_min_s[k] * 1e3:.2f} ms, "
              f"{100 * score_min_s[k] / fv['wall_s']['min']:.3f} %); in situ: _scores "
              f"{fv['in_situ_scores_s'] * 1e3:.2f} ms, whole "
              f"_cut {fv['in_situ_cut_s'] * 1e3:.2f} ms "
              f"({100 * fv['in_situ_cut_s'] / fv['wall_s']['median']:.3f} %)")
    for r in rows_out:
        if r["method"] == "pdrop":
            print(f"in situ, {r['variant']}: _scores {r['in_situ_scores_s'] * 1e3:.1f} ms, "
                  f"whole _cut {r['in_situ_cut_s'] * 1e3:.1f} ms "
                  f"({100 * r['in_situ_cut_s'] / r['wall_s']['median']:.2f} % of its prefill)")
    print("load average (1, 5, 15 min) at start {} and end {} on {} CPUs: other jobs slow "
          "the runs they overlap".format(*(tuple(round(x, 2) for x in la) for la in
                                           result["load_average_start_end"]), os.cpu_count()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
