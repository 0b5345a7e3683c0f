"""Sweep results: one table and a few plots for a sweep directory.

Every point of a sweep is a run directory under the sweep dir holding
`.hydra/overrides.yaml` (what the command and the sweeper set), `status.json`
(finished, failed, running, interrupted) and, once finished, `metrics.json`.
From these this module writes, into the sweep dir:

- `summary.csv` (every override, the status, every scalar metric, the run dir)
  and `summary.md` (the swept parameters, the status, the headline metrics), best
  point first;
- `metric_vs_<param>.png`: the sweep metric against each swept parameter (one
  line per combination of the other swept parameters);
- `pareto_<quality>_vs_<cost>.png`: quality against latency or memory where both
  kinds of metric exist (and, for serving grids, throughput against latency);

and logs the table and plots to the run's tracker (tracking/loggers.py): W&B as a
run of job_type "summary" in the sweep's group, MLflow into the sweep's parent run.
It runs at the end of every multirun (SweepSummaryCallback, registered under
hydra.callbacks in conf/config.yaml; with the Slurm launcher it runs in the
launching process once every job is done) and on demand:

    python -m lmstack.tracking.summary outputs/sweeps/sweep-<hash> [--no-wandb]

Deferred imports, for start-up time: matplotlib (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from lmstack.errors import LmstackError
from lmstack.tracking.headline import direction_of, sweep_metric_key, wanted_metric
from lmstack.tracking.loggers import log_sweep_summary
from lmstack.tracking.run_dir import read_json
from lmstack.util import tables

log = logging.getLogger("lmstack")

OPTUNA_RESULTS = "optimization_results.yaml"
# which metrics the plots pair (quality against cost) and the markdown table shows; which way
# is better comes from the phases' declarations (tracking/headline.py), not from these names
QUALITY = re.compile(
    r"(^|/)verify/score_after$|(^|/)eval/.*(acc|score|exact_match|win_rate)|^bench/task_score$"
    r"|(^|/)val/reward_accuracy$"
)
# phase=bench's task score (bench.score_prompts), written beside each point of its plots
TASK_SCORE = "bench/task_score"
LATENCY = ("bench/e2el_ms_p50", "bench/ttft_ms_p50", "bench/tpot_ms_p50")
MEMORY = re.compile(r"memory|peak_mem")
THROUGHPUT = "bench/output_throughput"
HEADLINE = re.compile(
    r"(^|/)(verify/score_after|val/reward_accuracy|val/loss|train/loss)$|^bench/(output_throughput|"
    r"ttft_ms_p50|tpot_ms_p50|e2el_ms_p50|failed|task_score)$|memory|tokens_per_s$|^eval/"
)
MAX_MARKDOWN_METRICS = 8
MAX_SERIES = 8


@dataclass
class Point:
    """One sweep point: its run directory and what it recorded."""

    run_dir: Path
    overrides: dict[str, str]
    status: str
    metrics: dict[str, float]
    config: dict[str, Any]
    metric_key: str | None = None
    error: str = ""  # status.json's error of a failed point: a message or a traceback

    @property
    def metric(self) -> float | None:
        return self.metrics.get(self.metric_key) if self.metric_key else None

    @property
    def failure(self) -> str:
        """Why the point failed, in one line: the error's last line (a traceback's exception)."""
        lines = [line.strip() for line in self.error.splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""


@dataclass
class Summary:
    sweep_dir: Path
    points: list[Point]
    swept: list[str]
    metric_key: str | None
    direction: str
    markdown: str
    files: list[Path] = field(default_factory=list)

    @property
    def best(self) -> Point | None:
        ranked = [p for p in self.points if p.status == "finished" and p.metric is not None]
        return ranked[0] if ranked else None


# ---- reading the sweep directory -------------------------------------------------------------


def collect_points(sweep_dir: Path) -> list[Point]:
    points = []
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        status = read_json(run_dir / "status.json")
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        if status is None and not overrides_file.is_file():
            continue  # not a sweep point (wandb/, a plot folder, ...)
        points.append(
            Point(
                run_dir=run_dir,
                overrides=read_overrides(run_dir),
                status=(status or {}).get("status", "unknown"),
                metrics=scalar_metrics(read_json(run_dir / "metrics.json") or {}),
                config=_read_yaml(run_dir / "config.yaml"),
                error=str((status or {}).get("error") or ""),
            )
        )
    return points


def read_overrides(run_dir: Path) -> dict[str, str]:
    """key -> value of the point's command-line and sweeper overrides (Hydra's own left out)."""
    overrides = {}
    for source in (run_dir / ".hydra" / "overrides.yaml", run_dir / "overrides.yaml"):
        if source.is_file():
            for item in yaml.safe_load(source.read_text()) or []:
                key, _, value = str(item).partition("=")
                key = key.lstrip("+~")
                if not key.startswith("hydra") and key != "paths.output_dir":
                    overrides[key] = value
            break
    return overrides


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def swept_parameters(points: list[Point]) -> list[str]:
    """Override keys whose value differs between points, in first-seen order."""
    keys: list[str] = []
    for point in points:
        keys += [key for key in point.overrides if key not in keys]
    return [key for key in keys if len({p.overrides.get(key, "") for p in points}) > 1]


def point_metric_key(point: Point) -> str | None:
    config = point.config
    phase = (config.get("phase") or {}).get("name", "")
    wanted = wanted_metric(
        (config.get("sweep") or {}).get("metric", ""),
        phase,
        (config.get("bench") or {}).get("metric", ""),
    )
    return sweep_metric_key(point.metrics, wanted, phase or None) or (wanted or None)


def metric_direction(points: list[Point], metric_key: str | None) -> str:
    for point in points:
        direction = (point.config.get("sweep") or {}).get("direction", "auto")
        if direction != "auto":
            return direction
    return direction_of(metric_key or "")


def rank(points: list[Point], direction: str) -> list[Point]:
    """Finished points with the metric, best first; then the others (failed, running...)."""
    sign = -1.0 if direction == "maximize" else 1.0
    scored = [p for p in points if p.status == "finished" and p.metric is not None]
    scored.sort(key=lambda p: sign * p.metric)
    return scored + [p for p in points if p not in scored]


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


# ---- the tracker -----------------------------------------------------------------------------


def log_summary(summary: Summary, logger_cfg: dict[str, Any]) -> None:
    """The table and every plot through the tracker facade: MLflow's sweep parent run, or a
    W&B run of job_type "summary" in the sweep's group."""
    columns, rows = table_rows(summary.points, summary.sweep_dir)
    best = summary.best
    log_sweep_summary(
        logger_cfg,
        summary.sweep_dir,
        config={"sweep_dir": str(summary.sweep_dir), "swept": summary.swept},
        metrics={f"best/{summary.metric_key}": best.metric} if best else {},
        table=[dict(zip(columns, row, strict=True)) for row in rows],
        images={f"sweep/{p.stem}": p for p in summary.files if p.suffix == ".png"},
        notes={"best/run_dir": str(best.run_dir)} if best else {},
    )


# ---- the whole summary -------------------------------------------------------------------------


def summarize(sweep_dir: Path, logger_cfg: dict[str, Any] | None = None) -> Summary:
    """Writes summary.csv, summary.md and the plots into the sweep dir (and the tracker
    unless logger_cfg is None)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise LmstackError(f"sweep summary: no such sweep directory: {sweep_dir}")
    points = collect_points(sweep_dir)
    if not points:
        raise LmstackError(f"sweep summary: {sweep_dir} holds no sweep points (run directories)")
    for point in points:
        point.metric_key = point_metric_key(point)
    metric_key = _most_common([p.metric_key for p in points if p.metric_key])
    direction = metric_direction(points, metric_key)
    points = rank(points, direction)
    swept = swept_parameters(points)
    summary = Summary(sweep_dir, points, swept, metric_key, direction, markdown="")
    optuna = _read_yaml(sweep_dir / OPTUNA_RESULTS) or None
    summary.markdown = markdown_report(summary, optuna)

    columns, rows = table_rows(points, sweep_dir)
    write_csv(sweep_dir / "summary.csv", columns, rows)
    (sweep_dir / "summary.md").write_text(summary.markdown)
    summary.files = [sweep_dir / "summary.csv", sweep_dir / "summary.md"]
    summary.files += plot_metric_vs_parameters(summary)
    summary.files += [
        path
        for quality, cost in pareto_pairs(points)
        if (path := plot_pareto(summary, quality, cost))
    ]
    if logger_cfg is not None:
        try:
            log_summary(summary, logger_cfg)
        except Exception as error:  # the table and plots are on disk; the tracker has a copy
            log.warning("sweep summary: logging to the tracker failed: %s", error)
    return summary


def _most_common(values: list[str]) -> str | None:
    return max(set(values), key=values.count) if values else None


def report(summary: Summary) -> str:
    """What the console shows at the end of a sweep."""
    files = ", ".join(p.name for p in summary.files)
    return f"{summary.markdown}\nwritten to {summary.sweep_dir}: {files}\n"


def logger_of(points: list[Point]) -> dict[str, Any]:
    """The logger settings the sweep's points ran with (the CLI has no composed config)."""
    for point in points:
        if logger := point.config.get("logger"):
            return logger
    return {"name": "wandb", "project": "lmstack", "mode": "auto"}


class SweepSummaryCallback(Callback):
    """Hydra callback: at the end of a multirun, the summary of its sweep dir.

    Also when the sweep itself stops early: a sweeper that raises (Optuna's, when every
    trial failed: "No trials are completed yet") never reaches `on_multirun_end`, so the
    summary of the points that ran, with their failure reasons, is written at exit.
    """

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        atexit.register(self._summarize_unfinished_sweep)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        self.sweep_dir = None  # finished: nothing left for the exit hook
        logger_cfg = (
            OmegaConf.to_container(config.logger, resolve=True) if "logger" in config else {}
        )
        _print_summary(Path(config.hydra.sweep.dir), logger_cfg)

    def _summarize_unfinished_sweep(self) -> None:
        if self.sweep_dir is None or not self.sweep_dir.is_dir():
            return
        if ran := len(collect_points(self.sweep_dir)):
            message = f"lmstack: the sweep stopped early (see above); the {ran} points that ran:"
            print(message, file=sys.stderr, flush=True)
            _print_summary(self.sweep_dir, None)  # no W&B: its own exit hooks may have run


def _print_summary(sweep_dir: Path, logger_cfg: dict[str, Any] | None) -> None:
    try:
        summary = summarize(sweep_dir, logger_cfg)
    except LmstackError as error:
        print(f"lmstack: {error}", file=sys.stderr, flush=True)
        return
    print(report(summary), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmstack.tracking.summary",
        description="Write a sweep directory's summary table and plots (and log them to the "
        "tracker).",
    )
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/sweeps/sweep-1a2b3c4d")
    parser.add_argument(
        "--no-wandb", "--no-tracker", action="store_true", help="do not log to the tracker"
    )
    args = parser.parse_args(argv)
    try:
        points = collect_points(args.sweep_dir) if args.sweep_dir.is_dir() else []
        logger_cfg = None if args.no_wandb else logger_of(points)
        summary = summarize(args.sweep_dir, logger_cfg)
    except LmstackError as error:
        print(f"lmstack: error: {error}", file=sys.stderr)
        return 2
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
