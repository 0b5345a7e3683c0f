"""A sweep's table: summary.csv (every override, status, scalar metric and run dir) and
summary.md (the swept parameters, the status, the headline metrics), best point first.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from lmstack.tracking.sweep_points import (
    HEADLINE,
    MAX_MARKDOWN_METRICS,
    OPTUNA_RESULTS,
    Point,
    Summary,
)
from lmstack.util import tables

# ---- the table ---------------------------------------------------------------------------------


def table_rows(points: list[Point], sweep_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """summary.csv's columns and rows: every override, status, every scalar metric, run dir."""
    override_keys: list[str] = []
    metric_keys: list[str] = []
    for point in points:
        override_keys += [k for k in point.overrides if k not in override_keys]
        metric_keys += [k for k in point.metrics if k not in metric_keys]
    metric_keys.sort()
    columns = [*override_keys, "status", "sweep_metric", "sweep_value", *metric_keys, "run_dir"]
    rows = [
        [
            *(p.overrides.get(k, "") for k in override_keys),
            p.status,
            p.metric_key or "",
            _raw(p.metric),
            *(_raw(p.metrics.get(k)) for k in metric_keys),
            str(p.run_dir),
        ]
        for p in points
    ]
    return columns, rows


def write_csv(path: Path, columns: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def headline_metrics(points: list[Point], metric_key: str | None) -> list[str]:
    """The table's metric columns: the sweep file's `sweep.columns`, else the sweep metric and
    the headline figures the points recorded."""
    for point in points:
        if columns := (point.config.get("sweep") or {}).get("columns"):
            return list(columns)
    keys = [metric_key] if metric_key else []
    for point in points:
        keys += [k for k in point.metrics if HEADLINE.search(k) and k not in keys]
    return keys[:MAX_MARKDOWN_METRICS]


def markdown_table(summary_points: list[Point], swept: list[str], metric_key: str | None) -> str:
    metrics = headline_metrics(summary_points, metric_key)
    show_overrides = not swept
    header = [*swept, *(["overrides"] if show_overrides else []), "status", *metrics, "run"]
    rows = []
    for point in summary_points:
        cells = [point.overrides.get(k, "") for k in swept]
        if show_overrides:
            cells.append(" ".join(f"{k}={v}" for k, v in point.overrides.items()))
        cells += [point.status, *(_fmt(point.metrics.get(k)) for k in metrics), point.run_dir.name]
        rows.append(cells)
    return tables.markdown_table(header, rows)


def markdown_report(summary: Summary, optuna: dict[str, Any] | None) -> str:
    counts: dict[str, int] = {}
    for point in summary.points:
        counts[point.status] = counts.get(point.status, 0) + 1
    lines = [
        f"# Sweep {summary.sweep_dir.name}",
        "",
        f"{len(summary.points)} points: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())),
        f"sweep metric: {summary.metric_key or 'none'} ({summary.direction})",
    ]
    if best := summary.best:
        lines.append(f"best: {best.run_dir.name} ({summary.metric_key} = {_fmt(best.metric)})")
    if optuna:
        lines.append(
            f"Optuna best parameters ({OPTUNA_RESULTS}): {optuna.get('best_params')} "
            f"-> {optuna.get('best_value')}"
        )
    lines += ["", markdown_table(summary.points, summary.swept, summary.metric_key), ""]
    if failed := [p for p in summary.points if p.status == "failed" and p.failure]:
        lines += ["Failed points:", *(f"- {p.run_dir.name}: {p.failure}" for p in failed), ""]
    return "\n".join(lines)


def _raw(value: Any) -> str:
    """Full precision for the CSV (the Markdown table rounds)."""
    return "" if value is None else str(value)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)
