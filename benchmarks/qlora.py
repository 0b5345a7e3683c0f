"""QLoRA against LoRA on a random Llama of >= 100M parameters (or --model smollm2_135m),
through lmstack's own loading path (`load_for_training`: bitsandbytes NF4 base, compute
dtype chosen per device, peft adapter): weight memory (the model's footprint), peak process
memory and training-step time.

    .venv/bin/python benchmarks/qlora.py
    .venv/bin/python benchmarks/qlora.py --steps 3 --repeats 1   # a quick look
    .venv/bin/python benchmarks/qlora.py --model smollm2_135m     # the real model, all cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# ~113M parameters; hidden and intermediate sizes are multiples of 64 (bitsandbytes CPU blocks)
SHAPE = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "num_kv_heads": 12,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
}


def child(args) -> None:
    """One side: load through lmstack, then time full training steps on packed rows."""
    import torch

    torch.set_num_threads(args.threads)
    from lmstack.config.groups.adapter import AdapterConfig
    from lmstack.config.groups.model import ModelConfig
    from lmstack.config.groups.quantization import QuantizationConfig
    from lmstack.data.loading import collate_packed
    from lmstack.models.loading import load_for_training
    from lmstack.objectives.losses import causal_lm_loss

    quantization = "nf4" if args.child == "qlora" else "none"
    config = SimpleNamespace(
        model=ModelConfig(source="hf", name_or_path=args.model),
        quantization=QuantizationConfig(name=quantization),
        adapter=AdapterConfig(name=args.child),
    )
    loaded = load_for_training(config, str(common.CACHE))
    model = loaded.model
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    weight_bytes += sum(t.numel() * t.element_size() for t in model.buffers())
    generator, vocab = torch.Generator().manual_seed(0), len(loaded.tokenizer)
    examples = []
    for _ in range(args.batch_size):
        ids = torch.randint(10, vocab, (args.seq_len,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    batch = collate_packed(examples)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up and is not counted
        started = time.perf_counter()
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        causal_lm_loss(logits, batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    figures = {
        "weight_mb": weight_bytes / 2**20,
        "step_s": statistics.median(times[1:]),
        "params": loaded.total_params,
        "compute_dtype": str(next(iter(model.parameters())).dtype),
    }
    print("BENCH_RESULT " + json.dumps(figures), flush=True)


def side(name: str, model: Path, args):
    def run() -> dict[str, float]:
        command = [common.PYTHON, __file__, "--child", name, "--model", str(model)]
        command += ["--threads", str(args.threads), "--steps", str(args.steps)]
        command += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        result = common.run_child(command, args.threads)
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{result.output[-3000:]}")
        figures = common.result_line(result.output)
        figures.pop("compute_dtype")
        figures["peak_rss_mb"] = result.peak_rss_mb
        return figures

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (median)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per packed row")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    common.add_model_arguments(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    model = common.model_folder(args, SHAPE)
    params = common.parameter_count(model)
    print(f"model: {params / 1e6:.1f}M parameters ({model.name})")
    sides = [common.Side("lora", side("lora", model, args))]
    sides.append(common.Side("qlora", side("qlora", model, args)))
    common.interleaved(sides, args.repeats)
    medians = {s.name: common.medians(s) for s in sides}
    lora = medians["lora"]
    rows = []
    for name, figures in medians.items():
        rows.append(
            {
                "side": name,
                "weight MB": figures["weight_mb"],
                "peak RSS MB": figures["peak_rss_mb"],
                "step s": figures["step_s"],
                "weight / LoRA": figures["weight_mb"] / lora["weight_mb"],
                "peak / LoRA": figures["peak_rss_mb"] / lora["peak_rss_mb"],
                "step / LoRA": figures["step_s"] / lora["step_s"],
                "load": figures["load_1min"],
            }
        )
    tokens = args.batch_size * args.seq_len
    common.print_table(
        f"QLoRA vs LoRA, {params / 1e6:.0f}M parameters, {tokens} tokens/step, "
        f"median of {args.repeats} (threads={args.threads})",
        rows,
        list(rows[0]),
    )
    common.write_results(
        "qlora",
        {
            "params": params,
            "tokens_per_step": tokens,
            "threads": args.threads,
            "versions": common.versions("torch", "transformers", "peft", "bitsandbytes"),
            "table": rows,
            "medians": medians,
            "samples": {s.name: s.samples for s in sides},
        },
        args.model,
    )


if __name__ == "__main__":
    main()
