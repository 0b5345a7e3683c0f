"""Experiment trackers for the Lightning Trainer: W&B (offline unless a key is set), CSV."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any


def wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    return "online" if _wandb_key_available() else "offline"


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_logger(logger_cfg: Any, run_dir: Path, run_id: str, group: str, config: dict[str, Any]):
    """A Lightning logger, or False for logger=none (metrics.json is written regardless)."""
    if logger_cfg.name == "none":
        return False
    if logger_cfg.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(logger_cfg.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        name=run_id,
        # one W&B run per run directory: a resumed run continues its W&B run
        id=_wandb_id(run_dir),
        resume="allow",
        group=group,
        tags=list(logger_cfg.tags),
        save_dir=str(run_dir),
        mode=mode,
        config=config,
    )


def _wandb_id(run_dir: Path) -> str:
    from lmstack.tracking.identity import stable_hash

    return stable_hash(str(run_dir.resolve()), 16)


def finish_logger(logger: Any) -> None:
    """Close the W&B run even when training failed, so its files are complete."""
    if logger and hasattr(logger, "experiment") and logger.__class__.__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish()


def log_results(
    ctx: Any,
    metrics: dict[str, Any],
    tables: dict[str, list[dict[str, Any]]] | None = None,
    images: dict[str, Path] | None = None,
) -> None:
    """A non-training phase's results (bench, eval, report) to the configured tracker:
    scalars, tables (lists of row dicts) and images, in the run's W&B group."""
    logger_cfg = ctx.config.logger
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    if logger_cfg.name == "csv":
        _append_csv(ctx.run_dir / "csv" / "metrics.csv", scalars)
        return
    if logger_cfg.name != "wandb":
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        name=ctx.run_id,
        id=_wandb_id(ctx.run_dir),
        resume="allow",
        group=ctx.group,
        job_type=ctx.config.phase.name,
        tags=list(logger_cfg.tags),
        dir=str(ctx.run_dir),
        mode=wandb_mode(logger_cfg.mode),
        config=ctx.resolved,
        reinit="finish_previous",
    )
    try:
        payload: dict[str, Any] = dict(scalars)
        for name, rows in (tables or {}).items():
            if rows:
                columns = list(rows[0])
                payload[name] = wandb.Table(
                    columns=columns, data=[[row.get(c) for c in columns] for row in rows]
                )
        for name, path in (images or {}).items():
            payload[name] = wandb.Image(str(path))
        run.log(payload)
        run.summary.update(scalars)
    finally:
        run.finish()


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
