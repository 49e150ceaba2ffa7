"""Regenerate the README's benchmark table and plot from `tokensieve bench` output.

    tokensieve bench --out bench-results
    python scripts/make_readme_figures.py bench-results [--docs docs/bench] [--readme README.md]
    tokensieve bench --task video --limit 80 --out bench-video
    python scripts/make_readme_figures.py bench-video --docs docs/bench/video --readme README.md \
        --marker video-table --no-analytic

Writes ``<docs>/results.md`` (overall and per-family tables), ``<docs>/llava15-cost.md``
(the analytic cost of LLaVA-1.5-7B under the same budgets), ``<docs>/pareto.png`` and a
copy of ``results.json``; with ``--readme``, replaces the block between
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` in that file. Nothing is
typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokensieve.bench.plot import pareto_plot
from tokensieve.bench.protocol import load_results
from tokensieve.bench.report import (
    analytic_table,
    family_table,
    markdown_table,
    replace_between_markers,
)


def write_analytic(docs: Path) -> Path:
    """``<docs>/llava15-cost.md``: the analytic cost of LLaVA-1.5-7B under typical budgets."""
    path = docs / "llava15-cost.md"
    path.write_text("## Analytic cost at LLaVA-1.5-7B scale\n\n" + analytic_table("7b"))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="bench-results",
                        help="a results.json or the folder holding it")
    parser.add_argument("--docs", default="docs/bench", help="where to write the figures")
    parser.add_argument("--readme", default=None, help="README to update between markers")
    parser.add_argument("--marker", default="bench-table",
                        help="the README block to replace: <!-- MARKER:start/end --> "
                             "(video-table for `bench --task video`)")
    parser.add_argument("--no-analytic", action="store_true",
                        help="skip the LLaVA-1.5-7B analytic cost table (video results)")
    args = parser.parse_args(argv)
    try:
        data = load_results(args.results)
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        table = markdown_table(data)
        png = docs / "pareto.png"
        pareto_plot(data, png)
        (docs / "results.md").write_text(
            "## Accuracy and cost\n\n" + table + "\n## Accuracy per question family\n\n"
            + family_table(data))
        if not args.no_analytic:
            write_analytic(docs)
        (docs / "results.json").write_text(json.dumps(data, indent=2) + "\n")
        if args.readme:
            readme = Path(args.readme)
            block = f"{table}\n![accuracy vs cost]({png.as_posix()})\n"
            readme.write_text(replace_between_markers(readme.read_text(), block, args.marker))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {docs / 'results.md'}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
