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
