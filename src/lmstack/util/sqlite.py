"""Reading an SQLite store that another process may be writing (votes, traces)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def read_rows(
    path: str | Path, query: str, parameters: tuple = (), timeout: float = 5.0
) -> list[dict[str, Any]]:
    """The rows of ``query`` as dicts, from the store opened read-only (a live writer's file
    is never changed or created). sqlite3's errors reach the caller, which names the store."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
    connection.row_factory = sqlite3.Row
    try:
        with connection:
            return [dict(row) for row in connection.execute(query, parameters)]
    finally:
        connection.close()
