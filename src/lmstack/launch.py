"""The task wrapper between Hydra and a phase entry point.

It validates the composed config, names the run, records its status, and turns
errors into what users expect: a one-paragraph message and a non-zero exit for
a single run; a point marked failed (and the sweep going on) in a multirun.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmstack.errors import ConfigError, LmstackError
from lmstack.phases.context import RunContext

log = logging.getLogger("lmstack")
EXIT_BAD_INPUT = 2
RUN_DIR_REPORT = "LMSTACK_RUN_DIR_REPORT"


# Known-harmless library warnings that would bury lmstack's own output.
QUIET_WARNINGS = (
    r".*defined a `validation_step` but have no `val_dataloader`.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*`is_gradient_checkpointing` is deprecated.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*'set_vital' is deprecated.*",
)


def quiet_library_warnings() -> None:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def run_task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    quiet_library_warnings()
    try:
        ctx = build_context(cfg, run_dir, multirun)
        metrics = dispatch(ctx)
        return sweep_metric(metrics)
    except LmstackError as error:
        return _fail(run_dir, multirun, f"lmstack: error: {error}", exit_code=EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _record(run_dir, "interrupted", "interrupted by the user; re-run the command to resume")
        raise
    except Exception:
        if not multirun:
            _record(run_dir, "failed", traceback.format_exc())
            raise
        return _fail(run_dir, multirun, traceback.format_exc(), exit_code=1)


def validate(cfg: DictConfig) -> Any:
    """The composed config as schema objects; runs each dataclass's cross-field checks."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, LmstackError):
            raise cause from None
        raise ConfigError(str(error)) from None


def build_context(cfg: DictConfig, run_dir: Path, multirun: bool) -> RunContext:
    from lmstack.tracking.identity import data_fingerprint, run_id
    from lmstack.tracking.run_dir import (
        finished_metrics,
        resolved_config,
        set_status,
        write_run_records,
    )

    config = validate(cfg)
    identity = run_id(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolved_config(cfg)
    if config.run.rerun or not finished_metrics(run_dir):
        write_run_records(cfg, run_dir, identity, data_fingerprint(resolved["data"]))
        set_status(run_dir, "running", run_id=identity)
    if report := os.environ.get(RUN_DIR_REPORT):
        # a pipeline stage tells the pipeline where it ran
        Path(report).write_text(str(run_dir.resolve()))
    return RunContext(
        cfg=cfg,
        config=config,
        run_dir=run_dir,
        run_id=identity,
        group=run_dir.parent.name if multirun else identity,
        cache_dir=str(Path(config.paths.cache_dir).expanduser().resolve()),
        resolved=resolved,
        multirun=multirun,
    )


# phase name -> the module whose `run(ctx)` is its single entry point (imported lazily)
PHASE_MODULES = {
    "train": "lmstack.phases.train",
    "pipeline": "lmstack.phases.pipeline",
    "serve": "lmstack.phases.serve",
    "bench": "lmstack.phases.bench",
    "eval": "lmstack.phases.eval",
    "report": "lmstack.phases.report",
}


def dispatch(ctx: RunContext) -> dict[str, Any]:
    import importlib

    phase = ctx.config.phase.name
    if phase not in PHASE_MODULES:
        raise ConfigError(
            f"phase.name: unknown phase '{phase}' (available: {', '.join(PHASE_MODULES)})"
        )
    return importlib.import_module(PHASE_MODULES[phase]).run(ctx)


def sweep_metric(metrics: dict[str, Any]) -> float | None:
    """What a sweeper optimizes: the verifier score if there is one, else validation loss."""
    for key in ("verify/score_after", "val/loss", "train/loss"):
        if isinstance(metrics.get(key), int | float):
            return float(metrics[key])
    return None


def _record(run_dir: Path, status: str, detail: str) -> None:
    from lmstack.tracking.run_dir import set_status

    if run_dir.exists():
        (run_dir / "error.log").write_text(detail)
        set_status(run_dir, status, error=detail.strip().splitlines()[-1] if detail else "")


def _fail(run_dir: Path, multirun: bool, message: str, exit_code: int) -> float:
    _record(run_dir, "failed", message)
    print(message, file=sys.stderr, flush=True)
    if not multirun:
        sys.exit(exit_code)
    log.error("sweep point %s failed; the other points go on", run_dir.name)
    return math.nan
