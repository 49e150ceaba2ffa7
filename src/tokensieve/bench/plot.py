"""Trade-off plots of a bench run: accuracy against prefill compute and measured latency."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FULL = "full"


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
    """Write a two-panel PNG: overall accuracy against prefill MACs and against measured
    prefill latency, one colour per method, budgets annotated, Pareto front dashed."""
    rows = [r for r in data["rows"] if not r.get("error")]
    if not rows:
        raise ValueError("no successful rows to plot")
    macs = [float(r["cost"]["prefill_macs"]) for r in rows]
    lat = [1e3 * float(r["timing"]["prefill_s"]) for r in rows]
    acc = [100.0 * float(r["accuracy"]["overall"]) for r in rows]
    factor, unit = _scale(macs)
    env = data.get("environment", {})
    model = data.get("model", {}).get("name", "model")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    panels = ((axes[0], [m / factor for m in macs],
               f"prefill {unit}MACs (multiply-add = 1, as FastV 'FLOPs'; dodged for visibility)"),
              (axes[1], lat, f"measured prefill latency, ms ({env.get('device', '?')})"))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab10")
    colors = {m: ("black" if m == FULL else cmap(i % 10)) for i, m in enumerate(methods)}
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
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{model}: accuracy vs cost ({env.get('samples', '?')} samples, "
                 f"{env.get('dtype', '?')}, numbers at points = visual tokens kept)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
