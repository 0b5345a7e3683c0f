"""One tracker facade over Lightning's loggers; every phase logs through it.

`logger=` wandb (offline unless a key is set), mlflow (a local SQLite store under the
output dir, or any tracking server), csv or none. Training hands `open_tracker`'s logger
to the Lightning Trainer; the other phases (eval, bench, report) and the sweep summary
log their results with `log_results` / `log_sweep_summary`: the resolved config, scalar
metrics, tables and plots, in the same shape for every tracker. In MLflow a sweep is a
parent run (holding the summary table and plots) with its points as nested child runs;
in W&B the points share a group and the summary is a run of job_type "summary".

Deferred imports, for start-up time: lightning, mlflow and wandb (and the lmstack modules
that load them) are imported inside the functions that need them; the CLI's input checks
import this module first.
"""

from __future__ import annotations

import fcntl
import logging
import netrc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.config.groups.logger import declare_tracker
from lmstack.tracking.identity import stable_hash

MLFLOW_RUN_FILE = ".mlflow_run_id"  # in a run dir (or a sweep dir): its MLflow run
MLFLOW_PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a child under it


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker needs to know about the run it records."""

    name: str
    group: str  # the sweep's name in a multirun, else the run's own id
    job_type: str  # the phase, or "summary" for a sweep's summary
    save_dir: Path  # the run dir (or the sweep dir): the tracker's local files
    config: dict[str, Any]
    sweep_dir: Path | None = None  # a sweep point: the sweep it belongs to

    @property
    def is_sweep_summary(self) -> bool:
        return self.job_type == "summary"


def run_of(ctx: Any) -> TrackedRun:
    """The TrackedRun of a phase's RunContext."""
    return TrackedRun(
        name=ctx.run_id,
        group=ctx.group,
        job_type=ctx.config.phase.name,
        save_dir=ctx.run_dir,
        config=ctx.resolved,
        sweep_dir=ctx.run_dir.parent if ctx.multirun else None,
    )


# ---- the trackers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tracker:
    """One tracker, `logger=NAME`: the unit a plug-in registers (`register_tracker`).

    `open` makes the Lightning logger a run's training hands to the Trainer; the other hooks
    cover what Lightning's logger API lacks, and default to that API: the config as
    hyperparameters, `save()` at the end, no tables, images or notes.
    """

    name: str
    open: Callable[[Any, TrackedRun], Any]  # (logger config, run) -> a Lightning logger
    close: Callable[[Any, bool], None] = lambda logger, failed: logger.save()
    log_config: Callable[[Any, dict[str, Any]], None] = lambda logger, config: (
        logger.log_hyperparams(config)
    )
    # (logger, scalars, tables, images, notes): tables, images and text beyond the scalars
    extras: Callable[..., None] | None = None


TRACKERS: dict[str, Tracker] = {}
TRACKER_ATTRIBUTE = "lmstack_tracker"  # set on each opened logger: the Tracker it came from


def register_tracker(tracker_record: Tracker) -> Tracker:
    TRACKERS[tracker_record.name] = tracker_record
    declare_tracker(tracker_record.name)  # logger.name=NAME then composes
    return tracker_record


def tracker_of(logger: Any) -> Tracker:
    return TRACKERS[getattr(logger, TRACKER_ATTRIBUTE)]


# ---- opening and closing ----------------------------------------------------------------------


def open_tracker(logger_cfg: Any, run: TrackedRun):
    """A Lightning logger for `run`, or False for logger=none (metrics.json is written anyway)."""
    name = _get(logger_cfg, "name", "wandb")
    if name == "none":
        return False
    logger = TRACKERS[name].open(logger_cfg, run)
    setattr(logger, TRACKER_ATTRIBUTE, name)
    return logger


def close_tracker(logger: Any, failed: bool = False) -> None:
    """Close the tracker's run even when the phase failed, so its records are complete."""
    if logger:
        tracker_of(logger).close(logger, failed)


@contextmanager
def tracker(logger_cfg: Any, run: TrackedRun) -> Iterator[Any]:
    """open_tracker ... close_tracker, closing as failed when the body raises."""
    logger = open_tracker(logger_cfg, run)
    try:
        yield logger
    except BaseException:
        close_tracker(logger, failed=True)
        raise
    close_tracker(logger)


# ---- what every phase logs -------------------------------------------------------------------


def log_results(
    ctx: Any,
    metrics: dict[str, Any],
    tables: dict[str, list[dict[str, Any]]] | None = None,
    images: dict[str, Path] | None = None,
) -> None:
    """A non-training phase's results (bench, eval, report) to the configured tracker:
    the resolved config, scalars, tables (lists of row dicts) and images."""
    run = run_of(ctx)
    with tracker(ctx.config.logger, run) as logger:
        record(logger, run.config, metrics, tables, images)


def record(
    logger: Any,
    config: dict[str, Any] | None,
    metrics: dict[str, Any],
    tables: dict[str, list[dict[str, Any]]] | None = None,
    images: dict[str, Path] | None = None,
    notes: dict[str, str] | None = None,
) -> None:
    """Config, scalar metrics, tables, images and text notes into an open tracker."""
    if not logger:
        return
    if config:
        log_config(logger, config)
    if scalars := scalar_metrics(metrics):
        logger.log_metrics(scalars)
    tables = {name: rows for name, rows in (tables or {}).items() if rows}
    if extras := tracker_of(logger).extras:
        extras(logger, scalars, tables, images or {}, notes or {})


def log_config(logger: Any, config: dict[str, Any]) -> None:
    """The resolved config as the tracker's hyperparameters (W&B passes it at init)."""
    tracker_of(logger).log_config(logger, config)


def log_sweep_summary(
    logger_cfg: Any,
    sweep_dir: Path,
    config: dict[str, Any],
    metrics: dict[str, Any],
    table: list[dict[str, Any]],
    images: dict[str, Path],
    notes: dict[str, str],
) -> None:
    """A sweep's table and plots: in MLflow into the sweep's parent run, in W&B as a run of
    job_type "summary" in the sweep's group."""
    run = TrackedRun(
        name=f"{sweep_dir.name}-summary",
        group=sweep_dir.name,
        job_type="summary",
        save_dir=sweep_dir,
        config=config,
        sweep_dir=sweep_dir,
    )
    with tracker(logger_cfg, run) as logger:
        record(logger, config, metrics, {"sweep/summary": table}, images, notes)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _get(logger_cfg: Any, key: str, default: Any = None) -> Any:
    """A logger setting from the schema object or from a plain dict (a run's config.yaml)."""
    if isinstance(logger_cfg, dict):
        return logger_cfg.get(key, default)
    return getattr(logger_cfg, key, default)


# ---- W&B ---------------------------------------------------------------------------------------


def wandb_mode(requested: str) -> str:
    if requested != "auto":
        return str(requested)  # a plain string for wandb's settings (not the schema's enum)
    return "online" if _wandb_key_available() else "offline"


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _wandb_logger(logger_cfg: Any, run: TrackedRun):
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    # one W&B run per run directory (a resumed run continues its W&B run); the summary's own
    folder = str(run.save_dir.resolve())
    key = f"summary:{folder}" if run.is_sweep_summary else folder
    logger = WandbLogger(
        project=_get(logger_cfg, "project") or "lmstack",
        entity=_get(logger_cfg, "entity"),
        name=run.name,
        id=stable_hash(key, 16),
        resume="allow",
        group=run.group,
        job_type=run.job_type,
        tags=list(_get(logger_cfg, "tags") or []),
        save_dir=str(run.save_dir),
        mode=wandb_mode(_get(logger_cfg, "mode", "auto")),
        config=run.config,
    )
    # Lightning always passes wandb.init an `anonymous` key (None here), which W&B warns about
    # on every run ("the anonymous setting has no effect"); an absent key is what it wants
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger


def _wandb_extras(
    logger: Any,
    scalars: dict[str, float],
    tables: dict[str, list[dict[str, Any]]],
    images: dict[str, Path],
    notes: dict[str, str],
) -> None:
    for name, rows in tables.items():
        columns = list(rows[0])
        data = [[row.get(c) for c in columns] for row in rows]
        logger.log_table(name, columns=columns, data=data)
    for name, path in images.items():
        logger.log_image(name, images=[str(path)])
    logger.experiment.summary.update({**scalars, **notes})


# ---- MLflow ------------------------------------------------------------------------------------


def mlflow_store(logger_cfg: Any) -> tuple[str, str | None]:
    """(tracking URI, artifact location): `logger.tracking_uri` when set (the server keeps the
    artifacts), else a SQLite store and an artifact folder under `logger.store_dir`; either
    way `mlflow ui --backend-store-uri <URI>` shows the runs."""
    if uri := _get(logger_cfg, "tracking_uri"):
        return uri, None
    store = Path(_get(logger_cfg, "store_dir") or "outputs/mlflow").expanduser().resolve()
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def _mlflow_logger(logger_cfg: Any, run: TrackedRun):
    from lightning.pytorch.loggers import MLFlowLogger

    uri, artifacts = mlflow_store(logger_cfg)
    experiment = _get(logger_cfg, "project") or "lmstack"
    _mlflow_experiment(uri, artifacts, experiment)
    tags = {
        "lmstack.group": run.group,
        "lmstack.job_type": run.job_type,
        "lmstack.run_dir": str(run.save_dir.resolve()),
        **{tag: "" for tag in _get(logger_cfg, "tags") or []},
    }
    if run.is_sweep_summary:
        run_id = _sweep_parent_run(uri, artifacts, experiment, run.sweep_dir)
    else:
        run_id = _read_run_id(run.save_dir)
        if run.sweep_dir is not None:
            tags[MLFLOW_PARENT_TAG] = _sweep_parent_run(uri, artifacts, experiment, run.sweep_dir)
    logger = MLFlowLogger(
        experiment_name=experiment,
        run_name=run.name,
        tracking_uri=uri,
        artifact_location=artifacts,
        tags=tags,
        run_id=run_id,
    )
    (run.save_dir / MLFLOW_RUN_FILE).write_text(logger.run_id)
    return logger


def _read_run_id(folder: Path) -> str | None:
    """The MLflow run a folder's earlier attempt opened: a resumed run continues it."""
    path = folder / MLFLOW_RUN_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def _mlflow_experiment(uri: str, artifacts: str | None, experiment: str) -> str:
    """The experiment's id; created (with its artifact folder) on first use."""
    from mlflow import MlflowClient

    # the store's schema migrations and "creating it" notices would bury lmstack's output
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with _store_lock(uri):
        client = MlflowClient(uri)  # creates (migrates) a new SQLite store
        if found := client.get_experiment_by_name(experiment):
            return found.experiment_id
        return client.create_experiment(experiment, artifact_location=artifacts)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Parallel points (joblib, Slurm) that find no local store would each create one and
    collide in its schema migration (and in creating the experiment): one at a time."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _sweep_parent_run(uri: str, artifacts: str | None, experiment: str, sweep_dir: Path) -> str:
    """The sweep's parent run, created by whichever point (or the summary) comes first; a lock
    file keeps parallel points (joblib, Slurm) from creating two."""
    from mlflow import MlflowClient

    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".mlflow_parent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if run_id := _read_run_id(sweep_dir):
            return run_id
        parent = MlflowClient(uri).create_run(
            _mlflow_experiment(uri, artifacts, experiment),
            run_name=sweep_dir.name,
            tags={"lmstack.job_type": "sweep", "lmstack.sweep_dir": str(sweep_dir.resolve())},
        )
        (sweep_dir / MLFLOW_RUN_FILE).write_text(parent.info.run_id)
        return parent.info.run_id


def _mlflow_config(logger: Any, config: dict[str, Any]) -> None:
    """Flattened params (searchable in the UI) and the whole config as config.json."""
    from mlflow.exceptions import MlflowException

    logger.experiment.log_dict(logger.run_id, config, "config.json")
    # params are write-once: a resumed run whose cosmetic keys changed keeps the first
    with suppress(MlflowException):
        logger.log_hyperparams(config)


def _mlflow_extras(
    logger: Any,
    scalars: dict[str, float],  # logged through Lightning's API already
    tables: dict[str, list[dict[str, Any]]],
    images: dict[str, Path],
    notes: dict[str, str],
) -> None:
    client, run_id = logger.experiment, logger.run_id
    for name, rows in tables.items():
        columns = list(dict.fromkeys(key for row in rows for key in row))
        data = {c: [_cell(row.get(c)) for row in rows] for c in columns}
        client.log_table(run_id, data=data, artifact_file=f"{name.replace('/', '_')}.json")
    for path in images.values():
        client.log_artifact(run_id, str(path), artifact_path="plots")
    for key, value in notes.items():
        client.set_tag(run_id, key, str(value))


def _cell(value: Any) -> Any:
    """A table cell MLflow can store: numbers and text as they are, anything else as text."""
    return value if isinstance(value, int | float | str) or value is None else str(value)


# ---- the built-in trackers ----------------------------------------------------------------------


def _csv_logger(logger_cfg: Any, run: TrackedRun):
    # Lightning's loggers are imported here, not at the top: `lmstack --help` and config
    # errors must answer in about a second, and lightning takes several to import
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(run.save_dir), name="csv", version="")


def _wandb_close(logger: Any, failed: bool) -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


register_tracker(
    Tracker(
        "wandb",
        _wandb_logger,
        close=_wandb_close,
        log_config=lambda logger, config: None,  # passed to wandb.init
        extras=_wandb_extras,
    )
)
register_tracker(
    Tracker(
        "mlflow",
        _mlflow_logger,
        close=lambda logger, failed: logger.finalize("failed" if failed else "success"),
        log_config=_mlflow_config,
        extras=_mlflow_extras,
    )
)
register_tracker(Tracker("csv", _csv_logger))
