"""A sweep's plots: the sweep metric against each swept parameter, and quality against cost
(latency, memory; for serving grids, throughput against latency) with its Pareto front.

Deferred imports, for start-up time: matplotlib is imported inside the functions that need it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from lmstack.tracking.sweep_points import (
    LATENCY,
    MAX_SERIES,
    MEMORY,
    QUALITY,
    TASK_SCORE,
    THROUGHPUT,
    Point,
    Summary,
)

# ---- plots -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def label(point: Point, keys: list[str]) -> str:
    return ", ".join(f"{_short(k)}={point.overrides.get(k, '')}" for k in keys)


def plot_metric_vs_parameters(summary: Summary) -> list[Path]:
    """One PNG per swept parameter: the sweep metric against it, a line per other combination."""
    scored = [p for p in summary.points if p.status == "finished" and p.metric is not None]
    if not scored or not summary.metric_key:
        return []
    if not summary.swept:
        return [plot_metric_by_point(summary, scored)]
    return [plot_metric_vs(summary, scored, param) for param in summary.swept]


def plot_metric_vs(summary: Summary, scored: list[Point], param: str) -> Path:
    plt = _pyplot()
    others = [k for k in summary.swept if k != param]
    series: dict[str, list[Point]] = {}
    for point in scored:
        series.setdefault(label(point, others), []).append(point)
    grid = len(series) <= MAX_SERIES and all(len(members) > 1 for members in series.values())
    if not grid:
        series = {"": scored}  # an Optuna search: one cloud of points, no lines
    raw = sorted({p.overrides.get(param, "") for p in scored})
    numbers = _as_numbers(raw)
    position = dict(zip(raw, numbers or range(len(raw)), strict=True))
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, members in series.items():
        members = sorted(members, key=lambda p: position[p.overrides.get(param, "")])
        xs = [position[p.overrides.get(param, "")] for p in members]
        axes.plot(xs, [p.metric for p in members], "o-" if grid else "o", label=name or None)
    if numbers is None:
        axes.set_xticks(range(len(raw)), raw)
    elif _log_scale(numbers):
        axes.set_xscale("log")
    failed = sum(p.status == "failed" for p in summary.points)
    axes.set_xlabel(param)
    axes.set_ylabel(f"{summary.metric_key} ({summary.direction})")
    axes.set_title(f"{summary.sweep_dir.name}" + (f" ({failed} failed)" if failed else ""))
    if any(series):
        axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return _save(figure, summary.sweep_dir / f"metric_vs_{_slug(param)}.png")


def plot_metric_by_point(summary: Summary, scored: list[Point]) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.bar(range(len(scored)), [p.metric for p in scored])
    axes.set_xticks(range(len(scored)), [p.run_dir.name for p in scored], rotation=20)
    axes.set_ylabel(f"{summary.metric_key} ({summary.direction})")
    axes.set_title(summary.sweep_dir.name)
    return _save(figure, summary.sweep_dir / "metric_by_point.png")


def _log_scale(numbers: list[float]) -> bool:
    positive = [n for n in numbers if n > 0]
    return len(positive) == len(numbers) and len(numbers) > 2 and max(numbers) / min(numbers) > 50


def pareto_pairs(points: list[Point]) -> list[tuple[str, str]]:
    """(quality, cost) metric pairs present in some finished point: both kinds must exist."""
    keys = {k for p in points if p.status == "finished" for k in p.metrics}
    quality = sorted(k for k in keys if QUALITY.search(k))
    latency = [k for k in LATENCY if k in keys]
    memory = sorted(k for k in keys if MEMORY.search(k))
    pairs = []
    if quality and latency:
        pairs.append((quality[-1], latency[0]))
    if quality and memory:
        pairs.append((quality[-1], memory[0]))
    if THROUGHPUT in keys and latency:
        pairs.append((THROUGHPUT, latency[0]))
    return pairs


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower cost (x) and higher quality (y)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(summary: Summary, quality: str, cost: str) -> Path | None:
    members = [
        p
        for p in summary.points
        if p.status == "finished"
        and _finite(p.metrics.get(quality))
        and _finite(p.metrics.get(cost))
    ]
    if not members:
        return None
    plt = _pyplot()
    xy = [(p.metrics[cost], p.metrics[quality]) for p in members]
    front = pareto_front(xy)
    figure, axes = plt.subplots(figsize=(6.4, 4.6))
    axes.scatter([x for x, _ in xy], [y for _, y in xy], color="tab:gray", label="points")
    axes.plot(
        [xy[i][0] for i in front], [xy[i][1] for i in front], "o-", color="tab:red", label="Pareto"
    )
    for point, (x, y) in zip(members, xy, strict=True):
        text = label(point, summary.swept)
        if quality != TASK_SCORE and _finite(point.metrics.get(TASK_SCORE)):
            text += f" (score {point.metrics[TASK_SCORE]:.2f})"
        axes.annotate(text, (x, y), fontsize=7, alpha=0.8)
    axes.set_xlabel(f"{cost} (lower is better)")
    axes.set_ylabel(f"{quality} (higher is better)")
    axes.set_title(f"{summary.sweep_dir.name}: {_short_metric(quality)} vs {_short_metric(cost)}")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    name = f"pareto_{_slug(_short_metric(quality))}_vs_{_slug(_short_metric(cost))}.png"
    return _save(figure, summary.sweep_dir / name)


def _short_metric(key: str) -> str:
    return key.replace("/", "_")


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
