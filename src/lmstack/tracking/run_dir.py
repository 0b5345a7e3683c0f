"""The run directory's records: status, metrics, the resolved config, the lock file."""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lmstack.config.recipes import for_stage, inherited_overrides
from lmstack.util.cpu_kind import cpu_kind

# whole name parts: `hf_token` and `api_key` are secrets, `max_tokens` is not
SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|token|secret|password)$", re.IGNORECASE)
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
    """Updates status.json. An `error` describes the attempt that set it: any later status
    without one (a re-run that runs, finishes, or stops) drops it."""
    record = read_json(run_dir / "status.json") or {}
    record.pop("error", None)
    record.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
    write_json(run_dir / "status.json", record)


def record_end(run_dir: Path, status: str, detail: str) -> None:
    """How an attempt ended other than finished: `detail` in error.log, its last line as
    status.json's error."""
    (run_dir / "error.log").write_text(detail)
    set_status(run_dir, status, error=detail.strip().splitlines()[-1] if detail.strip() else "")


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    status = read_json(run_dir / "status.json") or {}
    if status.get("status") != "finished":
        return None
    return read_json(run_dir / "metrics.json")


def previous_results(
    run_dir: Path, rerun: bool, what: str, show: Callable[[dict[str, Any]], None]
) -> dict[str, Any] | None:
    """A finished run's metrics, shown with `show`, when it is not to be run again (the phase
    then returns them as they are); None when the phase has its work to do."""
    if rerun or not (done := finished_metrics(run_dir)):
        return None
    print(f"lmstack: {run_dir} already holds this finished {what}; its results:")
    show(done)
    return done


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
    lock = lock_text(config, run_dir, identity, data_fingerprint)
    (run_dir / "recipe.lock.yaml").write_text(lock)
    for line in lock_drift(config.get("lock") or {}, data_fingerprint):
        print(f"lmstack: warning: {line}", file=sys.stderr, flush=True)


def lock_drift(lock: dict[str, Any], data_fingerprint: str) -> list[str]:
    """What differs from the lock file a run was started from (packages, data, code)."""
    if not lock:
        return []
    drift = [
        f"the lock has {name} {version}, this machine {current.get(name, 'none')}"
        for current in [package_versions()]
        for name, version in (lock.get("packages") or {}).items()
        if current.get(name) != version
    ]
    if lock.get("data_fingerprint") not in (None, data_fingerprint):
        drift.append(f"the lock's data was {lock['data_fingerprint']}, now {data_fingerprint}")
    if lock.get("code_version") and _git_commit() and lock["code_version"] != _git_commit():
        drift.append(f"the lock's code version is {lock['code_version']}, this one {_git_commit()}")
    if lock.get("cpu_kind") not in (None, cpu_kind()):
        drift.append(
            f"the lock was recorded on a {lock['cpu_kind']} CPU, this one is {cpu_kind()}: "
            "float32 kernels differ across CPU kinds in the last bits, so weights and figures "
            "may differ from the lock's run (the same run within rounding, not bit for bit)"
        )
    return drift


# left out of a lock: where things live on this machine, and how to re-run (not what)
LOCK_LEFT_OUT = ("paths", "run", "lock")


def lock_text(config: dict[str, Any], run_dir: Path, identity: str, data_fingerprint: str) -> str:
    """A recipe that reproduces the run: the group options it used (a defaults list), its
    resolved config, and its provenance under `lock` (which the run identity ignores)."""
    command = f"python run.py recipe={run_dir.resolve()}/recipe.lock.yaml"
    header = (
        "# @package _global_\n"
        f"# Lock file of run {identity}: its group options and resolved config, with the\n"
        "# package versions, data fingerprint and code version it ran with. Reproduces the run\n"
        "# (here or on another machine) in a fresh output directory:\n"
        f"#   {command} paths.output_dir=<fresh dir>\n"
    )
    body: dict[str, Any] = {"defaults": [{f"override /{g}": c} for g, c in group_choices().items()]}
    body |= lock_body(config)
    body["lock"] = provenance(identity, data_fingerprint)
    return header + OmegaConf.to_yaml(OmegaConf.create(body))


def provenance(identity: str, data_fingerprint: str) -> dict[str, Any]:
    """What a run ran with: the lock file's `lock` section, and the W&B run's `lock` config."""
    return {
        "run_id": identity,
        "data_fingerprint": data_fingerprint,
        "packages": package_versions(),
        "python": platform.python_version(),
        "code_version": _git_commit(),
        # float32 kernels are chosen by the CPU's vector instructions: a replay on another kind
        # computes the same run within rounding, not bit for bit (lock_drift says so)
        "cpu_kind": cpu_kind(),
    }


def group_choices() -> dict[str, Any]:
    """The config group options this run was composed from (recipe and sweep files resolved)."""

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    left_out = ("recipe", "sweep")  # their keys are in the lock's resolved config
    return {
        group: choice
        for group, choice in choices.items()
        if choice is not None and not group.startswith("hydra/") and group not in left_out
    }


def lock_body(config: dict[str, Any]) -> dict[str, Any]:
    """The keys a lock sets. A pipeline's stages are composed afresh (with the lock as their
    recipe), so its lock bakes the command's overrides into each stage and sets no group keys,
    which would otherwise land on stages of other objectives."""
    body = {k: v for k, v in config.items() if k not in LOCK_LEFT_OUT}
    if (config.get("phase") or {}).get("name") != "pipeline":
        return body
    # a repo recipe's name is kept (the code version has it); a recipe file's path is not,
    # nor where this machine keeps things (LOCK_LEFT_OUT)
    command = [o for o in inherited_overrides() if not _left_out_of_lock(o)]
    objective = config["objective"]["name"]
    stages = [
        {
            "name": stage["name"],
            "overrides": [*for_stage(command, stage["overrides"], objective), *stage["overrides"]],
        }
        for stage in config["phase"]["stages"]
    ]
    body = {k: v for k, v in body.items() if not isinstance(v, dict) or k in ("verify", "export")}
    body["phase"] = {"stages": stages}
    return body


def _left_out_of_lock(override: str) -> bool:
    key = re.split(r"[.=]", override.lstrip("+~"), maxsplit=1)[0]
    if key == "recipe":  # a file's path is left out; a repo recipe's name is kept
        return "/" in override or override.endswith((".yaml", ".yml"))
    return key == "phase" or key in LOCK_LEFT_OUT


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """The code version: `git rev-parse HEAD` of the checkout lmstack runs from (a git
    worktree too); None for an installed wheel (whose version is the package's, recorded
    beside it), outside git or without git. An installed lmstack never asks git, which would
    answer with the commit of whatever repository holds the venv."""
    checkout = Path(__file__).resolve().parents[3]
    if not (checkout / ".git").exists():
        return None
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() if found.returncode == 0 else None
