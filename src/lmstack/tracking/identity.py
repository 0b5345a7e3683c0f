"""Run identity: a hash of what a run computes.

The identity covers the resolved config (cosmetic keys such as logging cadence
left out), the data fingerprint and the package version. It names the run
directory, so re-running a command finds its earlier run: finished runs are
reported, killed ones resume.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import lmstack
from lmstack.config.schema import COSMETIC_KEYS, GROUP_SCHEMAS, PHASE_GROUPS


def stable_hash(obj: Any, length: int = 10) -> str:
    payload = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:length]


def file_fingerprint(path: str | Path) -> str:
    """Content hash of a file (streamed, so large files cost memory only for the buffer)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def data_fingerprint(data: dict[str, Any]) -> str:
    """What the data is: generator settings, a file's content, or a hub name and split."""
    source = data.get("source")
    path = data.get("path")
    if source in ("jsonl", "parquet") and path and Path(path).is_file():
        return f"file:{file_fingerprint(path)}"
    if source == "hub" and path and Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        return f"folder:{stable_hash([file_fingerprint(f) for f in files], 16)}"
    if source == "hub":
        return f"hub:{path}:{data.get('subset')}:{data.get('split')}"
    return f"builtin:{data.get('task')}:v1"


def identity_payload(cfg: DictConfig) -> dict[str, Any]:
    """The resolved, non-cosmetic part of a task config (no `hydra` node)."""
    keys = [key for key in cfg if key != "hydra"]
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    for dotted in COSMETIC_KEYS:
        _drop(resolved, dotted.split("."))
    read_groups = PHASE_GROUPS.get((resolved.get("phase") or {}).get("name"))
    if read_groups:
        for group in set(GROUP_SCHEMAS) - set(read_groups):
            resolved.pop(group, None)
    from lmstack.models.builtin import BUILD_VERSION

    init_from = (resolved.get("model") or {}).get("init_from")
    if init_from:
        # the earlier run's identity, so re-training it changes this run's identity too
        status = Path(init_from) / "status.json"
        resolved["model"]["init_from"] = {
            "path": init_from,
            "run": json.loads(status.read_text()).get("run_id") if status.is_file() else None,
        }
    payload = {
        "config": resolved,
        "data": data_fingerprint(resolved.get("data", {})),
        "version": lmstack.__version__,
        "builtin_build": BUILD_VERSION,
    }
    eval_data = ((resolved.get("eval") or {}).get("data") or {}).get("path")
    if eval_data:
        # the user's eval rows by content: an edited file is a new evaluation
        payload["eval_data"] = data_fingerprint(
            {"source": "parquet" if eval_data.endswith(".parquet") else "jsonl", "path": eval_data}
        )
    return payload


def _drop(tree: dict[str, Any], parts: list[str]) -> None:
    node = tree
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)


def run_name(cfg: DictConfig) -> str:
    """Readable prefix: objective-adapter[-quantization], e.g. sft-lora; or pipeline."""
    phase = cfg.get("phase", {}).get("name")
    if phase in ("pipeline", "report", "label"):
        return phase
    if phase == "eval":
        # eval-in_process, eval-served-hf: what was evaluated, and through what
        target = cfg.get("eval", {}).get("target", "in_process")
        served = cfg.get("serving", {}).get("name") if target == "served" else None
        return "-".join(p for p in ("eval", target, served) if p)
    if phase in ("serve", "bench"):
        serving = cfg.get("serving", {})
        quant = serving.get("quantization")
        return "-".join(p for p in (phase, serving.get("name"), quant) if p and p != "none")
    parts = [cfg.get("objective", {}).get("name"), cfg.get("adapter", {}).get("name")]
    quant = cfg.get("quantization", {}).get("name")
    if quant and quant != "none":
        parts.append(quant)
    return "-".join(str(p) for p in parts if p)


def run_id(cfg: DictConfig) -> str:
    return f"{run_name(cfg)}-{stable_hash(identity_payload(cfg))}"


def run_id_resolver(*, _root_: DictConfig) -> str:
    """`${run_id:}` in hydra.run.dir / hydra.sweep.subdir."""
    return run_id(_root_)


def sweep_id_resolver() -> str:
    """`${sweep_id:}` in hydra.sweep.dir: the same for every point of one sweep command.

    Hydra resolves the sweep dir once, in the launching process, so the command
    line identifies the sweep; re-running the same command finds the same sweep.
    """
    args = sorted(arg for arg in sys.argv[1:] if arg not in ("-m", "--multirun"))
    return f"sweep-{stable_hash(args, 8)}"
