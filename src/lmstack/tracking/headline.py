"""Which metric judges a run, and which way is better.

A phase declares its headline metric and direction (config/phases.py); `sweep.metric` (or,
for bench, `bench.metric`) asks for another. Directions come from those declarations and the
bench catalogue (config/metrics.py), never from guessing at a metric's name; `sweep.direction`
settles any other metric. Used by the launcher (what a sweeper optimizes) and by the sweep
summary (what it ranks by).
"""

from __future__ import annotations

import math
from typing import Any

from lmstack.config.metrics import BENCH_FIGURES
from lmstack.config.phases import PHASES, Direction


def wanted_metric(sweep_metric_name: str, phase: str, bench_metric: str) -> str:
    """The metrics.json key asked for: `sweep.metric`, or bench/<bench.metric> for bench."""
    if sweep_metric_name:
        return sweep_metric_name
    if phase == "bench" and bench_metric:
        return bench_metric if bench_metric.startswith("bench/") else f"bench/{bench_metric}"
    return ""


def candidates(phase: str | None) -> list[str]:
    """The phase's headline metrics in order of preference (every phase's for phase None)."""
    specs = [PHASES[phase]] if phase in PHASES else list(PHASES.values())
    return list(dict.fromkeys(name for spec in specs for name, _ in spec.headline))


def sweep_metric_key(metrics: dict[str, Any], wanted: str = "", phase: str | None = None):
    """Which metric a sweeper gets: the one asked for, else the phase's first headline that the
    run recorded. A pipeline's metrics carry stage prefixes (sft/val/loss, dpo/val/loss): its
    last stage's figure counts."""
    if wanted:
        return wanted if is_number(metrics.get(wanted)) else None
    for name in candidates(phase):
        if is_number(metrics.get(name)):
            return name
        staged = [key for key in metrics if key.endswith(f"/{name}") and is_number(metrics[key])]
        if staged:
            return staged[-1]
    return None


def known_directions() -> dict[str, Direction]:
    directions: dict[str, Direction] = {f"bench/{k}": v for k, v in BENCH_FIGURES.items()}
    for spec in PHASES.values():
        directions |= dict(spec.headline)
    return directions


def direction_of(metric_key: str, requested: str = "auto") -> Direction:
    """`sweep.direction` when set; else the declared direction of the metric (or of the metric
    a pipeline stage's prefix carries); else maximize."""
    if requested in ("maximize", "minimize"):
        return requested  # type: ignore[return-value]
    directions = known_directions()
    for name, direction in directions.items():
        if metric_key == name or metric_key.endswith(f"/{name}"):
            return direction
    return "maximize"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
