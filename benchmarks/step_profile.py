"""Where a training step's time and memory go: lmstack's SFT step against TRL's, op by op.

Not a benchmark of whole runs (that is sft.py): one process per side builds the model
and the first batches exactly as that side does (lmstack: its loader, packed rows and
`CausalLMModule.target_logprobs`; TRL: SFTTrainer's own dataloader and `compute_loss`),
then times forward + backward + AdamW steps and prints torch.profiler's top operators by
self CPU time and by memory allocated, and the process's peak RSS.

    .venv/bin/python benchmarks/step_profile.py --model smollm2_135m            # both sides
    .venv/bin/python benchmarks/step_profile.py --model smollm2_135m --side trl
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def lmstack_step(args, model_path: Path, rows: list[dict]):
    """lmstack's model, batches and loss, as `run.py model=hf data=jsonl` builds them."""
    import torch
    from transformers import AutoTokenizer

    from lmstack.data.loading import build_train_loader
    from lmstack.data.tokenize import encode_row, fit_length, has_target
    from lmstack.models.loading import attach_adapter, load_base
    from lmstack.objectives.causal_lm import CausalLMModule

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model_cfg = SimpleNamespace(dtype="float32", revision=None, trust_remote_code=False)
    quant_cfg = SimpleNamespace(name="none")
    base = load_base(str(model_path), model_cfg, quant_cfg)
    adapter = SimpleNamespace(
        name="lora",
        r=common.LORA["r"],
        alpha=common.LORA["alpha"],
        dropout=common.LORA["dropout"],
        target_modules=common.LORA_TARGETS,
        use_dora=False,
    )
    model = attach_adapter(base, adapter, quantized=False)
    if args.checkpointing:  # as load_for_training does with trainer.gradient_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    encoded = [encode_row(r, "prompt_completion", tokenizer, None) for r in rows]
    encoded, _ = fit_length(encoded, args.max_length, "truncate")
    encoded = [e for e in encoded if has_target(e)]
    loader = build_train_loader(encoded, args.batch_size, True, 0, tokenizer.pad_token_id)
    module = CausalLMModule(model, None, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        loss = -module.target_logprobs(batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return list(loader), step


def trl_step(args, model_path: Path, rows: list[dict], out: str):
    """TRL SFTTrainer's model, dataloader batches and compute_loss (its defaults)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=out, **common.trl_training_options(args), max_length=args.max_length
    )
    trainer = SFTTrainer(
        model=str(model_path),
        args=config,
        train_dataset=Dataset.from_list(common.conversational(rows)),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=common.trl_lora_config(),
    )
    model = trainer.model
    model.train()
    if config.gradient_checkpointing:  # what Trainer.train does before its loop
        model.gradient_checkpointing_enable(config.gradient_checkpointing_kwargs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = list(trainer.get_train_dataloader())

    def step(batch):
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return batches, step


def run_side(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model_path = Path(args.model_path)
    rows = common.read_rows(Path(args.data))
    with tempfile.TemporaryDirectory() as out:
        if args.side == "lmstack":
            batches, step = lmstack_step(args, model_path, rows)
        else:
            batches, step = trl_step(args, model_path, rows, out)
        loaded = rss_mb()
        shapes = [tuple(b["input_ids"].shape) for b in batches]
        step(batches[0])  # warm-up
        started = time.perf_counter()
        for batch in batches[1 : 1 + args.steps]:
            step(batch)
        seconds = (time.perf_counter() - started) / min(args.steps, len(batches) - 1)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(batches[-1])
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(table.table(sort_by="self_cpu_memory_usage", row_limit=args.top))
    figures = {
        "side": args.side,
        "step_s": seconds,
        "rss_loaded_mb": loaded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch_shapes": shapes[:4],
    }
    print("BENCH_RESULT " + json.dumps(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", default="lmstack,trl")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after a warm-up")
    parser.add_argument("--top", type=int, default=18, help="operators shown")
    parser.add_argument("--case", default="chat")
    parser.add_argument(
        "--checkpointing", action="store_true", help="lmstack with gradient checkpointing"
    )
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    common.add_model_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return run_side(args)
    from transformers import AutoTokenizer

    model = common.model_folder(args)
    case = common.DATA_CASES[args.case]
    data = common.write_rows(case, args.rows, "sft", AutoTokenizer.from_pretrained(model))
    for side in args.side.split(","):
        command = [common.PYTHON, __file__, "--child", "--side", side, "--data", str(data)]
        command += ["--model-path", str(model), "--max-length", str(case.max_length)]
        command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        command += ["--threads", str(args.threads), "--top", str(args.top)]
        command += ["--checkpointing"] if args.checkpointing else []
        child = common.run_child(command, args.threads)
        print(f"==== {side} (exit {child.returncode}, peak RSS {child.peak_rss_mb:.0f} MB)")
        print(child.output[-12000:])


if __name__ == "__main__":
    main()
