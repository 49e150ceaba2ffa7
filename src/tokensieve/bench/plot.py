"""Trade-off plots of a bench run: accuracy against prefill compute and measured latency."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tokensieve.bench.timing import LARGE_SPREAD  # noqa: E402

FULL = "full"
#: Qualitative palettes whose colours are used in turn (60 distinct colours); beyond them,
#: evenly spaced hues.
PALETTES = ("tab10", "tab20", "tab20b", "tab20c")


def method_colors(methods: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One colour per method, no two alike (``full``: black): the qualitative palettes'
    distinct colours in order, then evenly spaced hues for any further methods."""
    pool: list[tuple[float, float, float, float]] = []
    for name in PALETTES:
        for c in plt.get_cmap(name).colors:
            rgba = (*(round(float(x), 4) for x in c[:3]), 1.0)
            if rgba not in pool:
                pool.append(rgba)
    others = [m for m in dict.fromkeys(methods) if m != FULL]
    if len(others) > len(pool):
        extra = len(others) - len(pool)
        hsv = plt.get_cmap("hsv")
        pool += [tuple(round(float(x), 4) for x in hsv((i + 0.5) / extra)) for i in range(extra)]
    colors = {m: pool[i] for i, m in enumerate(others)}
    if FULL in methods:
        colors[FULL] = (0.0, 0.0, 0.0, 1.0)
    return colors


def noisy_rows(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``method@keep: latency, ...`` of every row with a large latency spread."""
    out = []
    for r in rows:
        names = (r.get("timing") or {}).get("large_spread") or []
        if names:
            out.append(f"{r['method']}@{r['keep']}: {', '.join(names)}")
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (lower cost ``x``, higher accuracy ``y``), sorted
    by cost: a point is on the front if no other point is at most as costly and strictly
    more accurate, or strictly cheaper and at least as accurate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _scale(values: Sequence[float]) -> tuple[float, str]:
    top = max(values) if values else 1.0
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if top >= factor:
            return factor, unit
    return 1.0, ""


def pareto_plot(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a three-panel PNG: overall accuracy against prefill MACs, against measured
    prefill latency (whiskers: interquartile range) and against the method's own selection
    time; one colour per method, budgets annotated, Pareto front dashed. Rows whose latency
    spread is large (IQR / median > ``LARGE_SPREAD``) are named in a red note."""
    rows = [r for r in data["rows"] if not r.get("error")]
    if not rows:
        raise ValueError("no successful rows to plot")
    macs = [float(r["cost"]["prefill_macs"]) for r in rows]
    lat = [1e3 * float(r["timing"]["prefill_s"]) for r in rows]
    iqr = [1e3 * float(r["timing"].get("prefill_s_iqr") or 0.0) for r in rows]
    sel = [1e3 * float(r["timing"].get("selection_s") or 0.0) for r in rows]
    acc = [100.0 * float(r["accuracy"]["overall"]) for r in rows]
    factor, unit = _scale(macs)
    env = data.get("environment", {})
    model = data.get("model", {}).get("name", "model")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=110)
    panels = ((axes[0], [m / factor for m in macs],
               f"prefill {unit}MACs (multiply-add = 1, as FastV 'FLOPs'; dodged for visibility)"),
              (axes[1], lat, f"measured prefill latency, ms ({env.get('device', '?')}; "
                             "median, whiskers IQR)"),
              (axes[2], sel, "method's own selection time, ms (its reduce calls, replayed)"))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = method_colors(methods)
    # Methods acting at the same place with the same budget cost the same MACs: dodge their
    # markers a little (x 1.012 per method) so that none hides another.
    dodge = {m: 1.0 + 0.012 * (i - (len(methods) - 1) / 2) for i, m in enumerate(methods)}
    panels[0][1][:] = [x * dodge[r["method"]] for x, r in zip(panels[0][1], rows, strict=True)]
    for ax, xs, label in panels:
        for m in methods:
            idx = [i for i, r in enumerate(rows) if r["method"] == m]
            idx.sort(key=lambda i: xs[i])
            ax.plot([xs[i] for i in idx], [acc[i] for i in idx],
                    marker="*" if m == FULL else "o", ms=12 if m == FULL else 6,
                    color=colors[m], label=m, lw=1, alpha=0.9)
            if ax is axes[1]:
                ax.errorbar([xs[i] for i in idx], [acc[i] for i in idx],
                            xerr=[[iqr[i] / 2 for i in idx], [iqr[i] / 2 for i in idx]],
                            fmt="none", ecolor=colors[m], elinewidth=0.8, alpha=0.6)
            for i in idx:
                if m != FULL:
                    ax.annotate(str(rows[i]["keep"]), (xs[i], acc[i]), fontsize=6,
                                xytext=(3, 3), textcoords="offset points", color=colors[m])
        front = pareto_front(list(zip(xs, acc, strict=True)))
        ax.plot([xs[i] for i in front], [acc[i] for i in front], ls="--", color="grey",
                lw=1, zorder=0, label="Pareto front")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("accuracy, %")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="lower right", ncol=2 if len(methods) > 8 else 1)
    fig.suptitle(f"{model}: accuracy vs cost ({env.get('samples', '?')} samples, "
                 f"{env.get('dtype', '?')}, numbers at points = visual tokens kept)",
                 fontsize=9)
    noisy = noisy_rows(rows)
    if noisy:
        shown = "; ".join(noisy[:6]) + (f"; +{len(noisy) - 6} more" if len(noisy) > 6 else "")
        fig.text(0.5, 0.005, f"warning: large latency spread (IQR / median > "
                 f"{100 * LARGE_SPREAD:.0f} %), compare with care: {shown}", ha="center",
                 va="bottom", fontsize=7, color="red")
    fig.tight_layout(rect=(0, 0.04 if noisy else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
