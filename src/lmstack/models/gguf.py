"""GGUF files (llama.cpp, Ollama, LM Studio) of a model, made with llama.cpp's own tools.

llama.cpp's converter (convert_hf_to_gguf.py, run with lmstack's Python: it needs torch and
transformers) writes an f16 GGUF of a Hugging Face folder; its quantizer (llama-quantize)
turns that into q8_0 or q4_k_m. Both come from `make engines`, which builds llama.cpp from
the source inside the llama-cpp-python sdist into paths.engines_dir/llamacpp.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from lmstack.errors import ConfigError, LmstackError
from lmstack.util.signals import how_it_ended

GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
# the converter's own "unknown architecture" answers
UNKNOWN_ARCHITECTURE = ("is not supported", "Model architecture not supported")
LOG_LINES = 12


class GgufError(LmstackError):
    """llama.cpp's converter or quantizer failed."""


def llamacpp_dir(engines_dir: str | Path) -> Path:
    return Path(engines_dir) / "llamacpp"


def require_llamacpp(engines_dir: str | Path, key: str) -> Path:
    """The llama.cpp build made by `make engines`, or exit 2 naming `key`."""
    root = llamacpp_dir(engines_dir)
    missing = [
        p
        for p in (root / "src" / "convert_hf_to_gguf.py", root / "bin" / "llama-quantize")
        if not p.exists()
    ]
    if missing:
        raise ConfigError(
            f"{key}: llama.cpp is not built at {root} (missing {missing[0].name}); "
            "run `make engines`"
        )
    return root


def export_gguf(model_dir: str | Path, out_dir: Path, gguf_type: str, engines_dir: str) -> Path:
    """`out_dir/model-<type>.gguf` of the Hugging Face folder `model_dir` (reused when there).

    Written under a temporary name first, so a killed export never leaves a file that
    looks complete.
    """
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"export.gguf: '{gguf_type}' is not one of {', '.join(GGUF_TYPES)}")
    root = require_llamacpp(engines_dir, "export.gguf")
    target = out_dir / f"model-{gguf_type}.gguf"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "model-f16.gguf"
    if not f16.is_file():
        _convert(Path(model_dir), f16, root, out_dir / "convert.log")
    if gguf_type != "f16":
        partial = target.with_suffix(".partial")
        command = [str(root / "bin" / "llama-quantize"), str(f16), str(partial), gguf_type.upper()]
        _run(command, out_dir / "quantize.log", "llama.cpp's quantizer")
        partial.rename(target)
    return target


def _convert(model_dir: Path, target: Path, root: Path, log_path: Path) -> None:
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures", [])
    partial = target.with_suffix(".partial")
    command = [sys.executable, "-m", "lmstack.models.gguf_convert", str(root / "src")]
    command += [str(model_dir), "--outfile", str(partial), "--outtype", "f16"]
    try:
        _run(command, log_path, "llama.cpp's converter")
    except GgufError as error:
        if any(phrase in str(error) for phrase in UNKNOWN_ARCHITECTURE):
            raise ConfigError(
                f"export.gguf: llama.cpp's converter does not know the architecture "
                f"{', '.join(architectures) or '(none in config.json)'} of {model_dir}:\n"
                f"{error}"
            ) from None
        raise
    partial.rename(target)


def _run(command: list[str], log_path: Path, what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    log_path.write_text(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        tail = "\n".join(f"  {line}" for line in lines[-LOG_LINES:])
        ended = how_it_ended(result.returncode)
        raise GgufError(f"{what} failed ({ended}; log: {log_path}):\n{tail}")


def remove_gguf(out_dir: Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
