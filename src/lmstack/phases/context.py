"""What every phase entry point receives: the config and where the run lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the environment a pipeline gives its stages: where a stage reports its run directory, and
# the tracker group the stages share (W&B group, MLflow tag lmstack.group), so the chain
# v0 -> harvest -> v1 -> A/B is one group in the tracker
RUN_DIR_REPORT = "LMSTACK_RUN_DIR_REPORT"
PIPELINE_GROUP = "LMSTACK_PIPELINE_GROUP"


@dataclass
class RunContext:
    cfg: Any  # the composed DictConfig (for identity and records)
    config: Any  # the same, as validated schema objects
    run_dir: Path
    run_id: str
    group: str  # the W&B group: the sweep's name, or the run's own id
    cache_dir: str
    resolved: dict[str, Any]  # resolved config with secrets redacted
    multirun: bool = False
    # phase=train: the rows its preflight loaded (launch.py), so they are read once
    rows: Any = None
