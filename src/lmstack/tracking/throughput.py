"""Training speed and memory of a fit, for metrics.json and a sweep's table.

`ThroughputMeter` (a Lightning callback) counts the tokens of the training sequences the
loader hands the model and the fit's wall time, and reads the peak memory at the end:

- `train/tokens_per_s`: real (unpadded) tokens of the training batches per second of fit;
  every sequence of a batch counts (DPO's chosen and rejected rows, KTO's completion and KL
  sequences), since each costs a forward pass. Rollout objectives (GRPO, PPO) generate their
  sequences: their speed is `train/rollout_tokens_per_s`, and this figure is left out.
- `train/peak_memory_mb`: on a GPU, the most memory torch allocated on it during the fit; on
  a CPU, the process's peak resident set size during the fit (model, data, Python,
  everything): Linux's high-water mark, reset when the fit starts, so the points of a
  multirun in one process each get their own; elsewhere the process's peak so far.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


def sequence_tokens(batch: Any) -> int:
    """Real tokens of every training sequence in a batch: a dict holding ``labels`` is one
    sub-batch (its ``attention_mask`` counts, or all of its ``input_ids`` when packed); dicts,
    lists and tuples are searched for such sub-batches."""
    if isinstance(batch, dict):
        if "labels" in batch and "input_ids" in batch:
            mask = batch.get("attention_mask")
            return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return sum(sequence_tokens(value) for value in batch.values())
    if isinstance(batch, list | tuple):
        return sum(sequence_tokens(value) for value in batch)
    return 0


PROC_SELF = Path("/proc/self")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the resident set's high-water mark
        (PROC_SELF / "clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = (PROC_SELF / "status").read_text().splitlines()
        high_water = next(line for line in status if line.startswith("VmHWM:"))
        return int(high_water.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class ThroughputMeter(Callback):
    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.peak_mb: float | None = None
        self._started = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        reset_peak_memory(pl_module.device)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs, batch, batch_idx) -> None:
        self.tokens += sequence_tokens(batch)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.seconds = time.perf_counter() - self._started
        self.peak_mb = peak_memory_mb(pl_module.device)

    def metrics(self) -> dict[str, float]:
        figures = {}
        if self.tokens and self.seconds > 0:
            figures["train/tokens_per_s"] = round(self.tokens / self.seconds, 1)
        if self.peak_mb is not None:
            figures["train/peak_memory_mb"] = round(self.peak_mb, 1)
        return figures
