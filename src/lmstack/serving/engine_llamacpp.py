"""serving=llamacpp: llama.cpp's OpenAI-compatible server (llama-server) on a GGUF file.

A run or Hugging Face folder is first exported to GGUF with llama.cpp's own converter and
quantizer (lmstack.models.gguf) into the cache, keyed by the model's content (a run's own
gguf/ from export.gguf is used as it is); a .gguf file is served as it is.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError
from lmstack.models.gguf import export_gguf
from lmstack.serving.engine_api import Engine, Launch, Target, servable_model
from lmstack.util.signals import how_it_ended

# serving.quantization -> the GGUF's type (the values the llamacpp EngineRecord offers,
# config/groups/serving.py)
GGUF_TYPE = {
    "none": "f16",
    "f16": "f16",
    "int8": "q8_0",
    "q8_0": "q8_0",
    "q4": "q4_k_m",
    "q4_k_m": "q4_k_m",
}


def loaded_cpu_variant(log_text: str) -> str:
    """'zen4' from "load_backend: loaded CPU backend from .../libggml-cpu-zen4.so"; 'this
    CPU' for a build with one native backend (libggml-cpu.so), 'unknown' without the line."""
    loaded = re.findall(r"loaded CPU backend from \S*libggml-cpu-?([\w.]*)\.so", log_text)
    if not loaded:
        return "unknown"
    return loaded[-1] or "this CPU"


class LlamaCppEngine(Engine):
    name = "llamacpp"
    environment = "llamacpp"
    program = "bin/llama-server"
    built_stamp = ".built"

    def startup_note(self, executable: str) -> str:
        """`make engines` builds one CPU backend per x86 level; llama-server loads the best one
        this CPU runs, and says which only in its verbose log: asked of the binary itself
        (`-v --list-devices`, 0.1 s), which also shows a build that cannot run here."""
        try:
            probe = subprocess.run(
                [executable, "-v", "--list-devices"], capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired:
            return f"its CPU probe `{executable} --list-devices` did not answer in 60 s"
        if probe.returncode != 0:
            ended = how_it_ended(probe.returncode)
            return f"its CPU probe `{executable} --list-devices` ended ({ended})"
        variant = loaded_cpu_variant(probe.stdout + probe.stderr)
        return f"llama.cpp runs its CPU kernels for {variant} (the best it has for this CPU)"

    def fallback_executable(self, engines_dir: str) -> str:
        raise ConfigError(
            f"serving=llamacpp: llama.cpp is not built at {Path(engines_dir) / self.environment} "
            "(no bin/llama-server); run `make engines`, or point serving.python at a "
            "llama-server binary"
        )

    def target(self, config: Any, cache_dir: str) -> Target:
        serving = config.serving
        gguf_type = GGUF_TYPE[serving.quantization]
        if serving.model.endswith(".gguf"):
            if not Path(serving.model).is_file():
                raise ConfigError(f"serving.model: '{serving.model}' is no GGUF file")
            served = {"path": str(Path(serving.model).resolve()), "run_id": None}
            return Target(served["path"], served | {"quantization": "as exported"})
        path, served = servable_model(config, cache_dir)
        if not Path(path).is_dir():
            raise ConfigError(
                f"serving.model: serving=llamacpp needs a local model, run directory or .gguf "
                f"file; '{path}' is not one"
            )
        run_dir = Path(serving.model) if served.get("run_id") else None
        exported = run_dir / "gguf" / f"model-{gguf_type}.gguf" if run_dir else None
        if exported is not None and exported.is_file():  # written by export.gguf at training
            return Target(str(exported.resolve()), served | {"gguf": str(exported.resolve())})
        # a run's own folder is never written to unasked: other GGUFs go to the cache
        out_dir = Path(cache_dir) / "gguf" / served["artifact_hash"]
        print(f"lmstack: GGUF ({gguf_type}) of {path} in {out_dir}", flush=True)
        gguf = export_gguf(path, out_dir, gguf_type, config.paths.engines_dir)
        return Target(str(gguf.resolve()), served | {"gguf": str(gguf.resolve())})

    def launch(
        self, serving: Any, target: Target, executable: str, device: str, port: int, scratch: Path
    ) -> Launch:
        model_name = serving.served_model_name or Path(target.path).name
        command = [executable, "--model", target.path, "--alias", model_name]
        command += ["--host", serving.host, "--port", str(port)]
        # --jinja: the GGUF's own chat template, rendered as transformers renders it
        command += ["--ctx-size", str(serving.ctx_size), "--parallel", str(serving.parallel)]
        command += ["--jinja", "--no-webui"]
        if serving.threads:
            command += ["--threads", str(serving.threads)]
        return Launch(command + list(serving.extra_args), model_name)
