"""Markdown tables: the one writer behind every table memlm and its benchmark harness print
(the recall task's, `memlm bench`'s and `memlm race`'s).

    markdown_table(["distance", "accuracy"], [["64", "1.000"]], right=True)
    -> ["| distance | accuracy |", "|---:|---:|", "| 64 | 1.000 |"]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: bool = False) -> list[str]:
    """The lines of a markdown table: the header, the rule (right-aligned columns when `right`),
    then one line per row. A '|' inside a cell becomes '/' so that it cannot split the cell."""
    rule = "---:" if right else "---"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule for _ in header) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells for {len(header)} columns: {list(row)}")
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |")
    return lines
