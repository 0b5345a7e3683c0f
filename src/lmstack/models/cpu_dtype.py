"""Which dtype this CPU computes fastest: float32 or bfloat16, measured once and cached.

CPUs differ: with AVX-512 bf16 (or AMX) a bfloat16 matmul runs faster than a float32
one; without, bfloat16 is emulated and many times slower (bitsandbytes' 4-bit kernels
most of all). A tiny probe times both, for a plain matmul (the training precision) and
for a 4-bit layer's forward and backward (QLoRA's compute dtype), and the answer is
cached in the cache dir under the CPU's identity, so every later run reads it.

Deferred imports, for start-up time: bitsandbytes (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch

from lmstack.models.builtin import file_lock
from lmstack.util.hashing import stable_hash

# bfloat16 must win by this factor to be chosen: a tie keeps float32's precision
MARGIN = 1.15


def cpu_identity() -> str:
    """What the probe's answer depends on: the CPU model and flags, torch, bitsandbytes."""
    flags = model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        model = platform.processor()
    return stable_hash(
        {"cpu": model, "flags": flags, "torch": torch.__version__, "bnb": _bnb_version()}, 16
    )


def _bnb_version() -> str:
    try:
        return version("bitsandbytes")
    except Exception:  # not installed: the 4-bit probe is skipped
        return "none"


def _best_seconds(step, repeats: int = 5) -> float:
    step()  # warm-up: first-call dispatch and allocation
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def probe_matmul() -> dict[str, float]:
    """Seconds of a 256x512 @ 512x1024 matmul with its backward, per dtype."""
    seconds = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(256, 512, dtype=dtype, requires_grad=True)
        b = torch.randn(512, 1024, dtype=dtype, requires_grad=True)
        seconds[name] = _best_seconds(lambda a=a, b=b: (a @ b).sum().backward())
    return seconds


def probe_4bit() -> dict[str, float]:
    """Seconds of a 4-bit (nf4) layer's forward and backward, per compute dtype."""
    import bitsandbytes as bnb

    seconds = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        layer = bnb.nn.Linear4bit(512, 1024, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(1024, 512), requires_grad=False)
        layer = layer.to("cpu")
        x = torch.randn(256, 512, dtype=dtype, requires_grad=True)
        seconds[name] = _best_seconds(lambda layer=layer, x=x: layer(x).sum().backward())
    return seconds


def measure() -> dict:
    threads = torch.get_num_threads()
    matmul = probe_matmul()
    four_bit = probe_4bit() if _bnb_version() != "none" else {"float32": 1.0, "bfloat16": 2.0}
    return {
        "threads": threads,
        "matmul_seconds": matmul,
        "4bit_seconds": four_bit,
        "training": _faster(matmul),
        "compute_4bit": _faster(four_bit),
    }


def _faster(seconds: dict[str, float]) -> str:
    return "bfloat16" if seconds["bfloat16"] * MARGIN < seconds["float32"] else "float32"


def cpu_dtypes(cache_dir: str | Path) -> dict:
    """The probe's answer for this CPU: measured on first use, then read from the cache."""
    path = Path(cache_dir) / "cpu_dtype" / f"{cpu_identity()}.json"
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        if not path.is_file():
            result = measure()
            path.write_text(json.dumps(result, indent=2))
    return json.loads(path.read_text())


def describe(result: dict) -> str:
    m, q = result["matmul_seconds"], result["4bit_seconds"]
    return (
        f"bfloat16 matmul {m['float32'] / m['bfloat16']:.2f}x float32's speed, "
        f"4-bit bfloat16 compute {q['float32'] / q['bfloat16']:.2f}x float32's"
    )


def default_cache_dir() -> str:
    """paths.cache_dir's default, for callers that are not handed the run's cache dir."""

    return os.environ.get("LMSTACK_CACHE_DIR", ".cache/lmstack")


def compute_dtype_4bit(cache_dir: str | Path | None = None) -> torch.dtype:
    """quantization.compute_dtype=auto: bfloat16 on CUDA; on a CPU, the faster one here."""
    if torch.cuda.is_available():
        return torch.bfloat16
    result = cpu_dtypes(cache_dir or default_cache_dir())
    return torch.bfloat16 if result["compute_4bit"] == "bfloat16" else torch.float32


def training_precision(precision: str, accelerator: str, cache_dir: str | Path) -> str:
    """trainer.precision=auto: bf16-mixed on CUDA, and on a CPU that runs bfloat16 matmuls
    faster than float32 ones (weights and optimizer stay float32); 32-true elsewhere."""
    if precision != "auto":
        return precision
    if accelerator != "cpu" and torch.cuda.is_available():
        return "bf16-mixed"
    return "bf16-mixed" if cpu_dtypes(cache_dir)["training"] == "bfloat16" else "32-true"


def probe_note(cache_dir: str | Path | None = None) -> str:
    """ "; this CPU: ..." with the probe's figures, or "" on CUDA (no probe there)."""
    if torch.cuda.is_available():
        return ""
    return f"; this CPU: {describe(cpu_dtypes(cache_dir or default_cache_dir()))}"
