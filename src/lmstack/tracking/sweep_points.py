"""A sweep's points, read from its directory: each run directory's overrides, status, metrics and
config, the swept parameters, the metric the points are ranked by and which way is better
(tracking/summary.py writes the summary from them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmstack.tracking.headline import direction_of, sweep_metric_key, wanted_metric
from lmstack.tracking.run_dir import read_json

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
