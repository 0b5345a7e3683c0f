"""Run identity: a hash of what a run computes.

The identity covers the parts of the resolved config that the run's phase reads
(config/phases.py; cosmetic keys such as logging cadence left out), the data
fingerprint and the package version. It names the run directory, so re-running a
command finds its earlier run: finished runs are reported, killed ones resume. The
readable part of the name comes from the resolved config too: what actually runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import lmstack
from lmstack.config.groups.model import BUILTIN_BUILD_VERSION
from lmstack.config.phases import PHASES
from lmstack.util.hashing import file_fingerprint, stable_hash

# Keys that do not change what a run computes: left out of the run identity.
COSMETIC_KEYS = (
    "logger",
    "paths",
    "run",
    "sweep",
    "lock",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.checkpoint_every_n_steps",
    "trainer.num_threads",
    "trainer.device_memory_gb",
    "trainer.memory_check",
    "trainer.gradient_checkpointing",
    "data.num_workers",
    "verify.batch_size",
    "serving.host",
    "serving.port",
    "serving.startup_timeout_s",
    "trace.retry_s",
    "bench.request_timeout_s",
    "label.host",
    "label.port",
    "label.token_env",
    "label.title",
)


def data_fingerprint(data: dict[str, Any]) -> str:
    """What the data is: generator settings, a file's content, or a hub name and split."""
    source = data.get("source")
    path = data.get("path")
    if source in ("jsonl", "parquet") and path and Path(path).is_file():
        held_out = data.get("eval_path")
        if held_out and Path(held_out).is_file():  # the held-out rows are data too
            return f"files:{file_fingerprint(path)}:{file_fingerprint(held_out)}"
        return f"file:{file_fingerprint(path)}"
    if source == "hub" and path and Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        return f"folder:{stable_hash([file_fingerprint(f) for f in files], 16)}"
    if source == "hub":
        return f"hub:{path}:{data.get('subset')}:{data.get('split')}"
    return f"builtin:{data.get('task')}:v1"


def identity_payload(cfg: DictConfig) -> dict[str, Any]:
    """The resolved, non-cosmetic part of the config that the run's phase reads."""
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, read_keys(cfg)), resolve=True)
    for dotted in COSMETIC_KEYS:
        _drop(resolved, dotted.split("."))

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
        "builtin_build": BUILTIN_BUILD_VERSION,
    }
    eval_data = ((resolved.get("eval") or {}).get("data") or {}).get("path")
    if eval_data and Path(eval_data).is_file():
        # the user's eval rows by content: an edited file is a new evaluation (a hub dataset's
        # name and split are in the config already)
        payload["eval_data"] = f"file:{file_fingerprint(eval_data)}"
    return payload


def read_keys(cfg: DictConfig) -> list[str]:
    """The root keys the phase reads (config/phases.py); every key for a phase that reads all."""
    spec = PHASES.get(cfg.get("phase", {}).get("name"))
    keys = [key for key in cfg if key != "hydra"]
    if spec is None or spec.reads is None:
        return keys
    return [key for key in keys if key in spec.reads]


def _drop(tree: dict[str, Any], parts: list[str]) -> None:
    node = tree
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)


def run_name(cfg: DictConfig) -> str:
    """Readable prefix from what runs: objective-adapter[-quantization] (sft-lora,
    dpo-qlora-nf4, sft-full); what a served run serves (bench-hf-int8); a plan's training run
    (plan-sft-lora); or the phase."""
    phase = cfg.get("phase", {}).get("name")
    if phase == "plan":
        # plan-sft-lora: the plan of that training run, never mistaken for one
        return f"plan-{training_name(cfg)}"
    if phase in ("pipeline", "report", "label", "harvest"):
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
    return training_name(cfg)


def training_name(cfg: DictConfig) -> str:
    """objective-adapter[-quantization]: sft-lora, dpo-qlora-nf4, sft-full."""
    quant = cfg.get("quantization", {}).get("name") or "none"
    parts = [cfg.get("objective", {}).get("name"), adapter_kind(cfg.get("adapter", {}), quant)]
    if quant != "none":
        parts.append(quant)
    return "-".join(str(p) for p in parts if p)


def adapter_kind(adapter: Any, quantization: str) -> str:
    """What trains, whatever the option was called: full, lora or dora, q-prefixed on a 4-bit
    base (QLoRA's setting). `adapter=qlora quantization=none` is lora; `adapter.use_dora=true`
    is dora (models/loading.py attaches DoRA for either)."""
    name = adapter.get("name") or "none"
    if name == "none":
        return "full"
    method = "dora" if adapter.get("use_dora") or name == "dora" else "lora"
    return f"q{method}" if quantization == "nf4" else method


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


def register_resolvers() -> None:
    """`${run_id:}` and `${sweep_id:}` for hydra.run.dir and hydra.sweep.dir (run.py)."""
    OmegaConf.register_new_resolver("run_id", run_id_resolver, replace=True)
    # cached: Hydra copies the launching process's resolver cache into every point's config,
    # so a point run in another process (joblib, Slurm) lands in the same sweep dir
    OmegaConf.register_new_resolver("sweep_id", sweep_id_resolver, replace=True, use_cache=True)
