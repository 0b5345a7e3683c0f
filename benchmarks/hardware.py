"""The machine's ceiling: measured float32 matmul throughput (GFLOP/s), and model-FLOPs
utilisation (MFU) of a training run against it.

MFU = 6 * parameters * tokens/s / peak: the usual estimate of a training step's
work (2 FLOPs per parameter per token forward, 4 backward). With LoRA the base
weights get no gradient, so the real work is nearer 4N per token; 6N is kept so
the figure compares with published MFUs, and both sides of a comparison share it.

    .venv/bin/python benchmarks/hardware.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def matmul_gflops(threads: int, size: int = 1024, repeats: int = 7) -> float:
    """Best-of-`repeats` float32 GEMM rate (a ceiling, so the best, not the median)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm-up: thread pool and kernel selection
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            rates.append(4 * 2 * size**3 / (time.perf_counter() - started) / 1e9)
        return max(rates)
    finally:
        torch.set_num_threads(previous)


def mfu(params: int, tokens_per_s: float, peak_gflops: float) -> float:
    return 6 * params * tokens_per_s / (peak_gflops * 1e9)


def main() -> None:
    import common

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="measurements (median reported)")
    args = parser.parse_args()
    rows = []
    for threads in sorted({1, args.threads}):
        load = common.load_average()
        samples = [matmul_gflops(threads) for _ in range(args.repeats)]
        rows.append(
            {
                "threads": threads,
                "GFLOP/s median": statistics.median(samples),
                "GFLOP/s best": max(samples),
                "load": load,
            }
        )
    common.print_table(
        "float32 matmul (1024x1024), best of 7 per measurement",
        rows,
        ["threads", "GFLOP/s median", "GFLOP/s best", "load"],
    )
    common.write_results("hardware", {"table": rows})


if __name__ == "__main__":
    main()
