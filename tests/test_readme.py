"""The README's method table is what the registry says (name, stage, kind, signals)."""

from __future__ import annotations

from pathlib import Path

import tokensieve as ts

README = Path(__file__).resolve().parents[1] / "README.md"


def test_method_table_matches_registry():
    rows = {}
    for line in README.read_text().splitlines():
        if line.startswith("| `") and line.count("|") >= 6:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 5 and cells[1] in ("pre-llm", "encoder", "llm"):
                rows[cells[0].strip("`")] = cells[1:4]
    expected = {m: [ts.describe(m).stage, ts.describe(m).kind,
                    ", ".join(ts.describe(m).signals) or "-"] for m in ts.list_methods()}
    assert rows == expected
