"""The run directory's records: status, metrics, the resolved config, the lock file."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
LOCK_PACKAGES = (
    "lmstack",
    "torch",
    "transformers",
    "peft",
    "lightning",
    "bitsandbytes",
    "hydra-core",
    "datasets",
    "tokenizers",
    "wandb",
    "lm_eval",
)


def redact(tree: Any) -> Any:
    """A copy with secret-looking values replaced, so they never reach disk or W&B."""
    if isinstance(tree, dict):
        return {k: "***" if SECRET_KEY.search(str(k)) and v else redact(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    keys = [key for key in cfg if key != "hydra"]
    return redact(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True))


def write_json(path: Path, payload: Any) -> None:
    """Atomic: a reader never sees half a file, a kill never leaves one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def set_status(run_dir: Path, status: str, **extra: Any) -> None:
    record = read_json(run_dir / "status.json") or {}
    record.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
    write_json(run_dir / "status.json", record)


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    status = read_json(run_dir / "status.json") or {}
    if status.get("status") != "finished":
        return None
    return read_json(run_dir / "metrics.json")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in LOCK_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_run_records(cfg: DictConfig, run_dir: Path, identity: str, data_fingerprint: str) -> None:
    """config.yaml (resolved) and recipe.lock.yaml (reproduces the run elsewhere)."""
    config = resolved_config(cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    lock = {
        "# lmstack lock": f"python run.py recipe={run_dir}/recipe.lock.yaml",
        "run_id": identity,
        "data_fingerprint": data_fingerprint,
        "packages": package_versions(),
        "python": platform.python_version(),
        "code_version": _git_commit(),
        "config": config,
    }
    (run_dir / "recipe.lock.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(lock)))


def _git_commit() -> str | None:
    head = Path(__file__).resolve().parents[3] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None
