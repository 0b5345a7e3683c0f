"""phase=pipeline: run stages in order, each a `run.py` invocation, chaining run directories.

A stage is composed from scratch like any command (same recipe, the pipeline's
command-line overrides, then the stage's own), so each stage has its own run
identity: re-running a pipeline skips finished stages and resumes a killed one.
`{name}` in a stage's overrides stands for the run directory of stage `name`.
"""

from __future__ import annotations

import contextlib
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
from lmstack.phases.context import PIPELINE_GROUP, RUN_DIR_REPORT, RunContext
from lmstack.phases.eval import comparison_markdown
from lmstack.tracking.loggers import log_results
from lmstack.tracking.run_dir import read_json, record_end, set_status, write_json
from lmstack.util.signals import how_it_ended

PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w-]*)\}")


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
        run_dir = run_stage(stage.name, [*inherited, *overrides], group=ctx.group)
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
    # the pipeline's own tracker run, in the group its stages joined: every stage's figures
    log_results(ctx, {k: v for k, v in metrics.items() if isinstance(v, int | float)})
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


def run_stage(name: str, overrides: list[str], group: str = "") -> str:
    """Runs one stage in a child process (its output streams through) and returns its run dir;
    the stage's tracker run joins `group` (the pipeline's)."""
    command = [sys.executable, "-m", "lmstack", *overrides]
    return run_stage_command(name, command, group)


def run_stage_command(name: str, command: list[str], group: str = "") -> str:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "run_dir"
        env = {**os.environ, RUN_DIR_REPORT: str(report)}
        if group:
            env[PIPELINE_GROUP] = group
        process = subprocess.Popen(command, env=env)
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            try:
                stop_stage(process)
            finally:
                close_stage_record(reported_dir(report), process.returncode, stopped=True)
            raise
        run_dir = reported_dir(report)
    if returncode != 0 or run_dir is None:
        close_stage_record(run_dir, returncode, stopped=False)
        where = f"; see {run_dir}/error.log" if run_dir else ""
        raise LmstackError(f"pipeline stage '{name}' failed ({how_it_ended(returncode)}){where}")
    return str(run_dir)


def reported_dir(report: Path) -> Path | None:
    """The run dir the stage reported, once it had one."""
    return Path(report.read_text()) if report.exists() else None


STAGE_STOP_GRACE_S = 60.0
# past the usual length of a stage's unwinding: a stage still running then may have had its
# KeyboardInterrupt swallowed by library code, and a repeated SIGTERM interrupts it again
STAGE_SIGTERM_REPEAT_S = 20.0


def stop_stage(process: subprocess.Popen) -> None:
    """When the pipeline is stopped (SIGTERM, Ctrl-C) the stage is told with SIGTERM and
    waited for, so it records itself as interrupted; told again, then killed, if it goes on.
    Stopping the pipeline again while it waits (Ctrl-C pressed twice) kills the stage."""
    try:
        for wait_s in (STAGE_SIGTERM_REPEAT_S, STAGE_STOP_GRACE_S - STAGE_SIGTERM_REPEAT_S):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=wait_s)
            if process.returncode is not None:
                return
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def close_stage_record(stage_dir: Path | None, returncode: int | None, stopped: bool) -> None:
    """A stage that ended without recording its end (killed, or crashed in native code on
    the signal) would say "running" forever: the pipeline records it for the stage."""
    if stage_dir is None or (read_json(stage_dir / "status.json") or {}).get("status") != "running":
        return
    ended = f"the stage's process ended ({how_it_ended(returncode)}) before recording its end"
    detail = (
        f"{ended}\nstopped by SIGTERM from its pipeline; re-run the command to resume"
        if stopped
        else ended
    )
    status = "interrupted" if stopped else "failed"
    record_end(stage_dir, status, detail + "\n")
    print(f"lmstack: {ended}; the pipeline recorded it as {status} in {stage_dir}", flush=True)
