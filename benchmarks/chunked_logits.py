"""The long-row cell of SFT's loss: target logits all at once against a chunk at a time.

One LoRA (r=8, all linear layers) training step's forward and backward on SmolLM2-135M (49k
vocabulary, gradient checkpointing on, as the memory plan picks for such rows), rows of seeded
random tokens with log-normal lengths around --length (10% prompt), each mode in its own
process: the process's peak RSS above the loaded model, and seconds a step. "plain" computes
the (N, V) float32 target logits at once (as before this round); "chunked" is lmstack's
default past next_token.LOGIT_CHUNK_ELEMENTS (models/next_token.py).

    .venv/bin/python benchmarks/chunked_logits.py --rows 2 --length 1000   # docs/benchmarks.md
    .venv/bin/python benchmarks/chunked_logits.py --rows 8 --length 400
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"plain": 1 << 50, "chunked": None}  # None: lmstack's default threshold


def rows(count: int, length: int, vocabulary: int, seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        size = min(2 * length, max(length // 2, int(length * math.exp(rng.gauss(0, 0.3)))))
        ids = [rng.randrange(10, vocabulary) for _ in range(size)]
        prompt = size // 10
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmstack.data.loading import collate_padded
    from lmstack.models import next_token
    from lmstack.models.from_gguf import SMOLLM2_135M, ensure_gguf_model
    from lmstack.models.next_token import target_token_logprobs

    torch.set_num_threads(args.threads)
    folder = ensure_gguf_model(SMOLLM2_135M, REPO / ".cache" / "lmstack")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # as lmstack's memory plan chooses for rows this long: layers recomputed in backward
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0))
    model.train()  # checkpointing applies in training mode only
    if MODES[args.mode] is not None:
        next_token.LOGIT_CHUNK_ELEMENTS = MODES[args.mode]
    batch = collate_padded(rows(args.rows, args.length, model.config.vocab_size, args.seed), 0)
    loaded = peak_rss_mb()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        logps, _ = target_token_logprobs(model, batch)
        (-logps.mean()).backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    result = {
        "mode": args.mode,
        "targets": int(logps.numel()),
        "loaded_mb": round(loaded),
        "step_peak_above_load_mb": round(peak_rss_mb() - loaded),
        "peak_rss_mb": round(peak_rss_mb()),
        "s_per_step": round(min(seconds), 2),
        "loss": round(float(-logps.mean()), 6),
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return child(args)
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode]
        command += [
            f"--{k}={getattr(args, k)}" for k in ("rows", "length", "steps", "threads", "seed")
        ]
        print(f"{mode}: one process, {args.steps} steps ...", flush=True)
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        line = next(x for x in output.splitlines() if x.startswith("BENCH_RESULT "))
        results[mode] = json.loads(line.removeprefix("BENCH_RESULT "))
    columns = list(results["plain"])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for result in results.values():
        print("| " + " | ".join(str(result[c]) for c in columns) + " |")
    plain, chunked = results["plain"], results["chunked"]
    above = "step_peak_above_load_mb"
    print(
        f"chunked / plain: peak RSS {chunked['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x, "
        f"step's peak above the loaded model {chunked[above]} vs {plain[above]} MB, "
        f"time {chunked['s_per_step'] / plain['s_per_step']:.2f}x, "
        f"loss difference {abs(chunked['loss'] - plain['loss']):.1e}"
    )


if __name__ == "__main__":
    main()
