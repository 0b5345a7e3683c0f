"""What every phase entry point receives: the config and where the run lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
