"""Markdown tables from bench results (the README's numbers come from here, never by hand)."""

from __future__ import annotations

import math
from typing import Any

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def latency_cell(timing: dict[str, Any], name: str, scale: float = 1e3,
                 digits: int = 1) -> str:
    """``median ±IQR`` of latency ``name`` (scaled, ms by default), ``!`` appended when its
    spread is large; ``-`` when it was not measured."""
    value = timing.get(name)
    if value is None:
        return "-"
    cell = f"{scale * value:.{digits}f}"
    iqr = timing.get(f"{name}_iqr")
    if iqr is not None:
        cell += f" ±{scale * iqr:.{digits}f}"
    if name in (timing.get("large_spread") or []):
        cell += " !"
    return cell


def markdown_table(data: dict[str, Any]) -> str:
    """A markdown table of a ``results.json`` (rows in run order) and a provenance line."""
    rows = [r for r in data["rows"] if not r.get("error")]
    if not rows:
        raise ValueError("the results hold no successful rows")
    full = next((r for r in rows if r["method"] == "full"), rows[0])
    ref_macs = float(full["cost"]["prefill_macs"]) or 1.0
    head = ("| method | tokens | accuracy | retention | prefill GMACs | vs full | KV cache MiB "
            "| selection ms | prefill ms | decode ms/token | peak memory MiB (+ added) |")
    lines = [head, "|" + "|".join(["---"] + ["---:"] * 10) + "|"]
    for r in rows:
        c, t = r["cost"], r["timing"]
        lines.append(
            f"| {r['method']} | {r['keep']} | {_pct(r['accuracy']['overall'])} | "
            f"{_pct(r['retention'].get('overall'))} | {c['prefill_macs'] / 1e9:.3f} | "
            f"{_pct(c['prefill_macs'] / ref_macs)} | {c['kv_cache_bytes'] / 2**20:.2f} | "
            f"{latency_cell(t, 'selection_s', digits=2)} | {latency_cell(t, 'prefill_s')} | "
            f"{latency_cell(t, 'decode_s_per_token', digits=2)} | "
            f"{t['peak_memory_bytes'] / 2**20:.0f} (+{t['peak_memory_delta_bytes'] / 2**20:.1f}) |")
    env, model = data.get("environment", {}), data.get("model", {})
    failed = [f"{r['method']}@{r['keep']}" for r in data["rows"] if r.get("error")]
    note = (f"\n{model.get('name', 'model')}, {env.get('samples', '?')} samples, "
            f"{env.get('device', '?')} ({env.get('device_name', '?')}, "
            f"{env.get('torch_threads', '?')} threads), {env.get('dtype', '?')}, seed "
            f"{env.get('seed', '?')}, torch {env.get('torch', '?')}, transformers "
            f"{env.get('transformers', '?')}, tokensieve {env.get('tokensieve', '?')}, "
            f"{env.get('date', '?')}. MACs: multiply-adds counted once (FastV's 'FLOPs'); "
            "latencies are medians ±IQR over repeated runs of the timed batch, every row "
            "timed in alternation with the others; selection ms: the method's own reduce "
            "calls of one prefill, replayed on their real inputs; memory: one run.")
    noisy = [f"{r['method']}@{r['keep']}" for r in rows
             if (r.get("timing") or {}).get("large_spread")]
    if noisy:
        from tokensieve.bench.timing import LARGE_SPREAD

        note += (f" ! large spread (IQR / median > {100 * LARGE_SPREAD:.0f} %): "
                 f"{', '.join(noisy)}; compare those latencies with care.")
    if failed:
        note += f" Failed: {', '.join(failed)}."
    return "\n".join(lines) + "\n" + note + "\n"


def analytic_table(size: str = "7b", text_tokens: int = 0) -> str:
    """Analytic cost of LLaVA-1.5 under typical budgets (computed, never typed): the
    PyramidDrop / FastV convention (multiply-adds once, image tokens only when
    ``text_tokens=0``)."""
    from tokensieve.bench.flops import Plan, account, llava15_dims

    dims = llava15_dims(size)
    plans = [("full", Plan.full()),
             *[(f"pre-LLM, {k} tokens", Plan.pre_llm(k)) for k in (192, 128, 64)],
             ("FastV K=2, R=50% (288)", Plan.in_llm(2, 288)),
             ("FastV K=2, R=75% (144)", Plan.in_llm(2, 144)),
             ("PyramidDrop 576/288/144/72 at 0/8/16/24",
              Plan.llm_schedule([(8, 288), (16, 144), (24, 72)]))]
    full = account(dims, text_tokens=text_tokens)
    lines = ["| LLaVA-1.5-" + size.upper() + " | LLM prefill TMACs | vs full | + vision tower "
             "TMACs | KV cache MiB (fp16) | decode GMACs/token |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, plan in plans:
        c = account(dims, plan, text_tokens=text_tokens)
        lines.append(f"| {name} | {c.llm_prefill / 1e12:.2f} | "
                     f"{_pct(c.llm_prefill / full.llm_prefill)} | {c.vision / 1e12:.3f} | "
                     f"{c.kv_cache_bytes / 2**20:.0f} | {c.decode / 1e9:.2f} |")
    return "\n".join(lines) + (
        f"\n\n{text_tokens} text tokens; multiply-adds counted once (FastV Eq. 5 with "
        "Vicuna's three-matrix MLP), the convention of PyramidDrop's 3.82 T for the full "
        "model; hardware FLOPs are twice these.\n")


def family_table(data: dict[str, Any]) -> str:
    """Accuracy per question family, one row per (method, tokens)."""
    rows = [r for r in data["rows"] if not r.get("error")]
    fams = sorted({f for r in rows for f in r["accuracy"] if f != "overall"})
    lines = ["| method | tokens | " + " | ".join(fams) + " |",
             "|---|---:|" + "---:|" * len(fams)]
    for r in rows:
        cells = " | ".join(_pct(r["accuracy"].get(f)) for f in fams)
        lines.append(f"| {r['method']} | {r['keep']} | {cells} |")
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, block: str, name: str = "bench-table") -> str:
    """Replace what lies between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` in
    ``text`` with ``block`` (default: ``START`` and ``END``, the image benchmark's table)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise ValueError(f"expected the markers {start!r} and {end!r} (in that order)")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{block.rstrip()}\n{end}{after}"
