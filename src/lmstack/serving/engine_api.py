"""The serving-engine plug-in interface: what an engine tells lmstack, and nothing else.

An engine (one module, one schema in config/groups/serving.py, one YAML in conf/serving/) says
- which `serving.quantization` values it can do on which device,
- where its own environment lives (`make engines` builds it under paths.engines_dir),
- what it loads for a model (a Hugging Face folder, base + adapter, a GGUF file),
- the command line and environment that start it, and the URL path of its health check.
lmstack.serving.engines starts, health-checks and stops every engine the same way.

Deferred imports, for start-up time: torch (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmstack.config.groups.serving import ENGINE_RECORDS
from lmstack.errors import ConfigError
from lmstack.models.adapters import is_adapter_folder, merged_adapter
from lmstack.tracking.run_dir import read_json
from lmstack.util.cpu_kind import cpu_kind


@dataclass(frozen=True)
class Target:
    """What the engine loads, and what lmstack records about it."""

    path: str  # a Hugging Face folder or hub id, or a .gguf file
    served: dict[str, Any]  # path, run_id, artifact_hash, quantization
    adapter: Path | None = None  # a PEFT adapter folder served on top of `path`
    # several adapters on one base, by the model name each answers to (vLLM's multi-LoRA)
    adapters: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Launch:
    """How to start the engine."""

    command: list[str]
    model_name: str  # the "model" field requests must send
    env: dict[str, str] = field(default_factory=dict)


class Engine:
    """One serving engine. Subclasses fill in the class attributes and the two methods."""

    name: ClassVar[str]  # its record's name (config/groups/serving.py: EngineRecord)
    # the engine's folder under paths.engines_dir, and the program inside it
    environment: ClassVar[str] = ""
    program: ClassVar[str] = "bin/python"
    health_path: ClassVar[str] = "/health"
    # the file `make engines` writes last in the environment, holding the CPU kind it was built on
    built_stamp: ClassVar[str] = ".installed"

    @property
    def quantizations(self) -> dict[str, tuple[str, ...]]:
        """serving.quantization values the engine can do, by device: its record's."""
        return ENGINE_RECORDS[self.name].quantizations

    def check_quantization(self, serving: Any, device: str) -> None:
        """Exit 2 (ConfigError) for a quantization this engine cannot do on this device."""
        supported = self.quantizations.get(device, ())
        if serving.quantization not in supported:
            raise ConfigError(
                f"serving.quantization: '{serving.quantization}' is not supported by "
                f"serving={self.name} on this machine's {device}; it offers "
                f"{', '.join(supported) or 'nothing'} here"
            )

    def executable(self, serving: Any, engines_dir: str) -> str:
        """serving.python if set, else the engine's own environment, else lmstack's Python."""
        if serving.python:
            found = shutil.which(serving.python) or (
                serving.python if Path(serving.python).is_file() else None
            )
            if found is None:
                hint = (
                    f" (`make engines` builds {Path(engines_dir) / self.environment})"
                    if self.environment
                    else ""
                )
                raise ConfigError(
                    f"serving.python: '{serving.python}' is neither a file nor a command on "
                    f"PATH{hint}"
                )
            return str(Path(found).absolute())
        own = Path(engines_dir) / self.environment / self.program
        if self.environment and own.exists():
            self.warn_if_built_for_another_cpu(Path(engines_dir) / self.environment)
            return str(own.absolute())
        return self.fallback_executable(engines_dir)

    def warn_if_built_for_another_cpu(self, environment: Path) -> None:
        """A build carried from another kind of CPU may run, or die of an illegal instruction
        mid-request: say so before starting it."""
        stamp = environment / self.built_stamp
        built_on = stamp.read_text().strip() if stamp.is_file() else ""
        here = cpu_kind()
        if built_on and built_on != here:
            print(
                f"lmstack: warning: serving={self.name}'s environment {environment.resolve()} "
                f"was built on a {built_on} CPU, this one is {here}; run `make engines` "
                "to build it for this CPU",
                flush=True,
            )

    def fallback_executable(self, engines_dir: str) -> str:
        """Without an environment of its own: lmstack's own Python."""
        return sys.executable

    def startup_note(self, executable: str) -> str:
        """What the engine will choose for this machine that a user should see, or ''."""
        return ""

    def target(self, config: Any, cache_dir: str) -> Target:
        """What to load: the served model resolved to a Hugging Face folder by default."""
        path, served = servable_model(config, cache_dir)
        return Target(path, served)

    def device(self, executable: str) -> str:
        """The device the engine will run on."""
        return current_device()

    def launch(
        self, serving: Any, target: Target, executable: str, device: str, port: int, scratch: Path
    ) -> Launch:
        """The command line (as a user would type it) and environment that start the engine
        on 127.0.0.1:`port`; `scratch` is a folder for its temporary files (removed after)."""
        raise NotImplementedError


def servable_model(config: Any, cache_dir: str) -> tuple[str, dict[str, Any]]:
    """A Hugging Face folder (or hub id) to serve, and the identity of what it holds."""
    from lmstack.models.loading import model_from_run, resolve_base_path

    source = config.serving.model
    run_id = None
    if not source:
        path = resolve_base_path(config.model, cache_dir)
    elif (Path(source) / "status.json").is_file():
        path = str(model_from_run(Path(source), cache_dir))
        run_id = (read_json(Path(source) / "status.json") or {}).get("run_id")
    elif (Path(source) / "config.json").is_file():
        path = source
    elif is_adapter_folder(source):
        path = str(merged_adapter(source, config.model.base, cache_dir, "serving.model"))
    elif Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        raise ConfigError(
            f"serving.model: '{source}' is neither an lmstack run directory (status.json), "
            "a Hugging Face model folder (config.json) nor a PEFT adapter folder "
            "(adapter_config.json); pass one of them"
        )
    else:
        path = source  # a hub id: the engine fetches it
    path = str(Path(path).resolve()) if Path(path).exists() else path
    served = {
        "path": path,
        "run_id": run_id,
        "artifact_hash": artifact_hash(path),
        "quantization": config.serving.quantization,
    }
    return path, served


def artifact_hash(path: str) -> str | None:
    """Hash of a model folder's files: small files by content, large ones by size, head
    and tail (hashing gigabytes of weights on every start would cost seconds)."""

    folder = Path(path)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        size = file.stat().st_size
        with open(file, "rb") as handle:
            if size <= 64 << 20:
                digest.update(handle.read())
            else:
                digest.update(str(size).encode() + handle.read(1 << 20))
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def current_device() -> str:
    """The device engines run on here: "cuda" where torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def short_model_name(model_path: str, run_id: str | None = None) -> str:
    """A run's id, a hub id as it is, a local folder by its name (not its absolute path)."""
    if run_id:
        return run_id
    path = Path(model_path)
    if not path.is_absolute() and not path.exists():
        return model_path  # a hub id
    if path.name in ("merged", "model") and (path.parent / "status.json").is_file():
        status = json.loads((path.parent / "status.json").read_text())
        return status.get("run_id") or path.parent.name
    if path.name == "merged":  # merged into the cache: <run id>-<adapter hash>/merged
        return path.parent.name
    return path.name
