"""Sweep results: one table and a few plots for a sweep directory (its points are read by
sweep_points.py, its table written by sweep_table.py, its plots drawn by sweep_plots.py; this
module puts them together, logs them, and runs as Hydra's callback and as a command).

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
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from lmstack.errors import LmstackError
from lmstack.tracking.loggers import log_sweep_summary
from lmstack.tracking.sweep_plots import pareto_pairs, plot_metric_vs_parameters, plot_pareto
from lmstack.tracking.sweep_points import (
    OPTUNA_RESULTS,
    Point,
    Summary,
    _read_yaml,
    collect_points,
    metric_direction,
    point_metric_key,
    rank,
    swept_parameters,
)
from lmstack.tracking.sweep_table import markdown_report, table_rows, write_csv

log = logging.getLogger("lmstack")

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
