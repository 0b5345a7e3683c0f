"""The one markdown-table writer: sweep summaries, reports, eval comparisons, leaderboards."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (no final newline). Each cell is written as str(cell),
    a `|` in it escaped, so a value never splits its row; format numbers before."""
    lines = [_row(columns), "|" + "---|" * len(columns)]
    lines += [_row(row) for row in rows]
    return "\n".join(lines)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
