"""Markdown tables for the reports that `explain`, `compare` and the demo write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def markdown_table(rows: Sequence[Mapping[str, Any]], fmt: Mapping[str, str] | None = None) -> str:
    """Rows (columns from the first row) as a Markdown table; `fmt` maps a column to a format spec for
    its numbers. Pipes and newlines in cells are escaped."""
    if not rows:
        return "(none)\n"
    fmt = fmt or {}
    cols = list(rows[0])
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if c in fmt and isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(format(v, fmt[c]))
            else:
                cells.append(str(v).replace("|", "\\|").replace("\n", "\\n"))
        out += "| " + " | ".join(cells) + " |\n"
    return out
