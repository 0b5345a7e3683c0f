"""phase=pipeline: run stages in order, each a `run.py` invocation, chaining run directories.

A stage is composed from scratch like any command (same recipe, the pipeline's
command-line overrides, then the stage's own), so each stage has its own run
identity: re-running a pipeline skips finished stages and resumes a killed one.
`{name}` in a stage's overrides stands for the run directory of stage `name`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lmstack.config.recipes import for_stage, inherited_overrides
from lmstack.errors import ConfigError, LmstackError
from lmstack.phases.context import RunContext
from lmstack.phases.eval import comparison_markdown
from lmstack.tracking.run_dir import set_status, write_json

PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w-]*)\}")
REPO_ROOT = Path(__file__).resolve().parents[3]


def run(ctx: RunContext) -> dict[str, Any]:
    stages = ctx.config.phase.stages
    common = inherited_overrides()
    stage_dirs: dict[str, str] = {}
    metrics: dict[str, Any] = {"run_id": ctx.run_id}
    evaluations: list[tuple[str, dict[str, Any]]] = []
    for index, stage in enumerate(stages, start=1):
        overrides = [substitute(o, stage_dirs, stage.name) for o in stage.overrides]
        print(
            f"lmstack: pipeline stage {index}/{len(stages)}: {stage.name} ({' '.join(overrides)})",
            flush=True,
        )
        inherited = for_stage(common, overrides, ctx.config.objective.name)
        run_dir = run_stage(stage.name, [*inherited, *overrides])
        stage_dirs[stage.name] = run_dir
        stage_metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        metrics |= {
            f"{stage.name}/{k}": v for k, v in stage_metrics.items() if isinstance(v, int | float)
        }
        metrics[f"{stage.name}/run_dir"] = run_dir
        if "eval/suites" in stage_metrics:
            evaluations.append((stage.name, stage_metrics))
    if evaluations:
        write_comparison(ctx.run_dir, evaluations)
    write_json(ctx.run_dir / "metrics.json", metrics)
    set_status(ctx.run_dir, "finished")
    for name, run_dir in stage_dirs.items():
        print(f"  {name}: {run_dir}")
    return metrics


def write_comparison(run_dir: Path, evaluations: list[tuple[str, dict[str, Any]]]) -> None:
    """comparison.md: the pipeline's evaluation stages side by side (a prompting baseline
    beside the fine-tuned runs, say), printed too."""

    table = comparison_markdown(evaluations)
    path = run_dir / "comparison.md"
    path.write_text(table)
    print(f"lmstack: the pipeline's evaluations ({path}):\n{table}", flush=True)


def substitute(override: str, stage_dirs: dict[str, str], stage: str) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in stage_dirs:
            raise ConfigError(
                f"phase.stages: stage '{stage}' refers to {{{name}}}, which is not an earlier "
                f"stage (earlier: {', '.join(stage_dirs) or 'none'})"
            )
        return stage_dirs[name]

    return PLACEHOLDER.sub(replace, override)


def run_stage(name: str, overrides: list[str]) -> str:
    """Runs one stage in a child process (its output streams through) and returns its run dir."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "run_dir"
        env = {**os.environ, "LMSTACK_RUN_DIR_REPORT": str(report)}
        command = [sys.executable, str(REPO_ROOT / "run.py"), *overrides]
        returncode = run_child(command, env)
        run_dir = report.read_text() if report.exists() else None
    if returncode != 0 or run_dir is None:
        where = f"; see {run_dir}/error.log" if run_dir else ""
        raise LmstackError(f"pipeline stage '{name}' failed (exit {returncode}){where}")
    return run_dir


STAGE_STOP_GRACE_S = 60.0


def run_child(command: list[str], env: dict[str, str]) -> int:
    """The stage's exit status. When the pipeline is stopped (SIGTERM, Ctrl-C) the stage is
    told with SIGTERM and waited for, so it records itself as interrupted (a kill would leave
    its status.json saying "running")."""
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=STAGE_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
