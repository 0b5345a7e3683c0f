"""The task wrapper between Hydra and a phase entry point.

It validates the composed config, names the run, records its status, and turns
errors into what users expect: a one-paragraph message and a non-zero exit for
a single run; a point marked failed (and the sweep going on) in a multirun.

lmstack.phases.plan is imported where used: run.py's config refusals import this module, and
they answer in about a second.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmstack.config.keys import check_known_keys
from lmstack.config.phases import PHASES
from lmstack.config.plugins import load_plugins
from lmstack.distributed import is_rank_zero, process_rank
from lmstack.errors import ConfigError, LmstackError
from lmstack.phases.context import PIPELINE_GROUP, RUN_DIR_REPORT, RunContext
from lmstack.tracking.headline import sweep_metric_key, wanted_metric
from lmstack.tracking.identity import data_fingerprint, run_id
from lmstack.tracking.run_dir import (
    finished_metrics,
    provenance,
    read_json,
    record_end,
    resolved_config,
    set_status,
    write_run_records,
)
from lmstack.util.signals import resent_from_finalizer

log = logging.getLogger("lmstack")
EXIT_BAD_INPUT = 2


# Known-harmless library warnings that would bury lmstack's own output.
QUIET_WARNINGS = (
    r".*defined a `validation_step` but have no `val_dataloader`.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*`is_gradient_checkpointing` is deprecated.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*'set_vital' is deprecated.*",
    # any run on a machine with Slurm installed; lmstack's Slurm launcher does use srun
    r".*The `srun` command is available on your system but is not used.*",
    # every rank of a multi-process run validates on the whole held-out set: same figure
    r".*when logging on epoch level in distributed setting.*",
)


def quiet_library_warnings() -> None:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def run_task(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    quiet_library_warnings()
    identity = ""
    with stop_signals() as stops:
        try:
            load_plugins()  # a Slurm job or a rank has not composed: its plug-ins load here
            ctx = build_context(cfg, run_dir, multirun)
            identity = ctx.run_id
            announce(ctx.run_id, run_dir, "starts in")
            metrics = dispatch(ctx)
            announce(ctx.run_id, run_dir, "finished; results in")
            return sweep_metric(metrics, ctx.config)
        except LmstackError as error:
            stops.recording = True
            # bad input exits 2; an error class may name its own code (a run with no score: 1)
            code = getattr(error, "exit_code", EXIT_BAD_INPUT)
            return _fail(run_dir, multirun, f"lmstack: error: {error}", code, identity)
        except (KeyboardInterrupt, SystemExit) as stop:
            stops.recording = True
            # Lightning turns Ctrl-C during fit into sys.exit(1), and the serving code SIGTERM
            # into SystemExit(143): which signal stopped the run is what `stops` noted
            signum = stops.received[0] if stops.received else _signal_of(stop)
            if signum is None:
                raise
            _interrupted(run_dir, identity, signum, multirun)
        except Exception:
            stops.recording = True
            if stops.received:
                # the signal's KeyboardInterrupt, raised in library code (an import, a C
                # extension), can be swallowed there and surface as another error later on:
                # the signal is what ended the run
                _interrupted(run_dir, identity, stops.received[0], multirun, traceback.format_exc())
            if not multirun:
                _record(run_dir, "failed", traceback.format_exc())
                announce(identity, run_dir, "failed; see error.log in")
                raise
            return _fail(run_dir, multirun, traceback.format_exc(), 1, identity)


def announce(identity: str, run_dir: Path, what: str) -> None:
    """Where the run is, at its start and its end, so nobody has to list outputs/ for it."""
    if identity and is_rank_zero():
        print(f"lmstack: run {identity} {what} {run_dir.resolve()}", flush=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A stop signal repeated this long after the one that last interrupted the run interrupts it
# again: that one's KeyboardInterrupt may have been swallowed by library code that catches it and
# goes on (one raised in a finalizer is sent again: util/signals.py). A burst of signals must not:
# Ctrl-C reaches a pipeline's stage beside the pipeline's own SIGTERM, and the second one would
# cut short the unwinding (Lightning's teardown, the loggers' last writes) the first one began.
REPEAT_INTERRUPTS_AFTER_S = 2.0


@dataclass
class StopSignals:
    """The stop signals a run received; `recording` once the run is recording how it ended,
    which no signal interrupts."""

    received: list[int] = field(default_factory=list)
    recording: bool = False
    last_interrupt: float = -math.inf

    def interrupt(self, signum: int, frame: FrameType | None) -> None:
        if resent_from_finalizer(signum, frame):
            return
        self.received.append(signum)
        now = time.monotonic()
        if self.recording or now - self.last_interrupt < REPEAT_INTERRUPTS_AFTER_S:
            return
        self.last_interrupt = now
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGINT unwind the run like Ctrl-C (so engines stop and the status is
    recorded); yields the StopSignals. Under Slurm SIGTERM is left to the requeue machinery
    (lmstack/slurm.py), which checkpoints and records it itself."""

    stops = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stops
        return
    caught = [s for s in STOP_SIGNALS if not (s == signal.SIGTERM and _slurm_job_step())]
    previous = {s: signal.signal(s, stops.interrupt) for s in caught}
    try:
        yield stops
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _slurm_job_step() -> bool:
    """What lmstack.slurm.under_slurm() says, without importing Lightning to ask."""
    return bool(os.environ.get("SLURM_NTASKS")) and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


def _signal_of(stop: BaseException) -> int | None:
    """The signal behind an exit: Ctrl-C itself, or an exit status of 128 + signal."""
    if isinstance(stop, KeyboardInterrupt):
        return signal.SIGINT
    code = stop.code if isinstance(stop.code, int) else None
    if code is not None and code - 128 in STOP_SIGNALS:
        return code - 128
    return None


def _interrupted(
    run_dir: Path, identity: str, signum: int, multirun: bool, cut_short: str = ""
) -> None:
    """Records the run as interrupted and exits 128 + signal; `cut_short` is the trace of what
    the signal broke off, kept in error.log above the status line."""
    name = signal.Signals(signum).name
    # a signal between status.json's "running" and the context's return: the id is recorded
    identity = identity or (read_json(run_dir / "status.json") or {}).get("run_id", "")
    stopped = f"stopped by {name}; re-run the command to resume"
    _record(run_dir, "interrupted", f"{cut_short}\n{stopped}" if cut_short else stopped)
    announce(identity, run_dir, f"interrupted by {name}; its records are in")
    if multirun and signum == signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C stops the whole sweep
    sys.exit(128 + signum)


def validate(cfg: DictConfig) -> Any:
    """The composed config as schema objects; runs each dataclass's cross-field checks."""
    check_known_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, LmstackError):
            raise cause from None
        raise ConfigError(str(error)) from None


def build_context(cfg: DictConfig, run_dir: Path, multirun: bool) -> RunContext:
    config = validate(cfg)
    identity = run_id(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolved_config(cfg)
    fingerprint = data_fingerprint(resolved["data"])
    rank_zero = is_rank_zero()  # the other ranks of a multi-process run write no records
    if rank_zero and (config.run.rerun or not finished_metrics(run_dir)):
        write_run_records(cfg, run_dir, identity, fingerprint)
        # a new attempt: an earlier one's error no longer describes this run
        (run_dir / "error.log").unlink(missing_ok=True)
        set_status(run_dir, "running", run_id=identity, **slurm_job())
    if rank_zero and (report := os.environ.get(RUN_DIR_REPORT)):
        # a pipeline stage tells the pipeline where it ran
        Path(report).write_text(str(run_dir.resolve()))
    # what trackers record as the run's config: its provenance filled in, as in its lock file
    resolved["lock"] = provenance(identity, fingerprint)
    return RunContext(
        cfg=cfg,
        config=config,
        run_dir=run_dir,
        run_id=identity,
        group=tracker_group(run_dir, identity, multirun),
        cache_dir=str(Path(config.paths.cache_dir).expanduser().resolve()),
        resolved=resolved,
        multirun=multirun,
    )


def tracker_group(run_dir: Path, identity: str, multirun: bool) -> str:
    """A sweep point's group is its sweep; a pipeline stage's, its pipeline; else its own id."""
    if multirun:
        return run_dir.parent.name
    return os.environ.get(PIPELINE_GROUP) or identity


def dispatch(ctx: RunContext) -> dict[str, Any]:
    phase = ctx.config.phase.name
    if phase not in PHASES:
        raise ConfigError(f"phase.name: unknown phase '{phase}' (available: {', '.join(PHASES)})")
    if phase == "train":
        # data, devices and the memory plan, before the train phase imports torch and
        # Lightning: a run that cannot work is refused in about a second
        from lmstack.phases.plan import preflight

        ctx.rows = preflight(ctx)
    return importlib.import_module(PHASES[phase].module).run(ctx)


def sweep_metric(metrics: dict[str, Any], config: Any = None) -> float | None:
    """What a sweeper optimizes (None when absent, which Optuna records as a failed trial)."""
    wanted = ""
    if config is not None:
        wanted = wanted_metric(config.sweep.metric, config.phase.name, config.bench.metric)
    phase = config.phase.name if config is not None else None
    key = sweep_metric_key(metrics, wanted, phase)
    return float(metrics[key]) if key else None


def slurm_job() -> dict[str, str]:
    """Under Slurm, the job id: its stdout/stderr lie in the sweep dir's slurm/<job id>/."""
    job = os.environ.get("SLURM_JOB_ID")
    if array_job := os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return {"slurm_job": job} if job else {}


def _record(run_dir: Path, status: str, detail: str) -> None:
    if run_dir.exists():
        record_end(run_dir, status, detail)


def _fail(run_dir: Path, multirun: bool, message: str, exit_code: int, identity: str = "") -> None:
    if not is_rank_zero():  # one rank of a multi-process run: say which
        message = f"rank {process_rank()}: {message}"
    _record(run_dir, "failed", message)
    print(message, file=sys.stderr, flush=True)
    announce(identity, run_dir, "failed; see error.log in")
    if not multirun:
        sys.exit(exit_code)
    log.error("sweep point %s failed; the other points go on", run_dir.name)
    # None, not nan: Hydra's Optuna sweeper (Optuna 2.10) crashes the study on a nan value,
    # while a value that is not a number marks the trial failed and the study goes on
    return None
