"""DPO + LoRA: lmstack (`python run.py objective=dpo ...`) against TRL's DPOTrainer.

Same model, preference rows, pairs per batch, max sequence length, LoRA settings
and precision (float32, CPU), one epoch each, everything else on each side's
defaults; then both with reference log-probs precomputed before training
(lmstack: objective.precompute_ref=true; TRL: precompute_ref_log_probs=True).
Tokens are the real tokens of both sequences of each pair; the time is the
training loop's (each side precomputes reference log-probs before it).

    .venv/bin/python benchmarks/dpo.py
    .venv/bin/python benchmarks/dpo.py --rows 32 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lmstack_side(
    model: Path, data: Path, args, case: common.DataCase, tokens: int, pre: bool, ckpt: bool
):
    overrides = [
        f"trainer.gradient_checkpointing={str(ckpt).lower()}",
        "objective=dpo",
        f"objective.precompute_ref={str(pre).lower()}",
        "model=hf",
        f"model.name_or_path={model}",
        "data=jsonl",
        f"data.path={data}",
        "data.eval_fraction=0",
        f"data.batch_size={args.batch_size}",
        f"data.max_length={case.max_length}",
        f"trainer.max_steps={args.rows // args.batch_size}",
        f"adapter.r={LORA['r']}",
        f"adapter.alpha={LORA['alpha']}",
        f"adapter.dropout={LORA['dropout']}",
        "verify.enabled=false",
    ]

    def run() -> dict[str, float]:
        metrics, child = common.run_lmstack(overrides, args.threads)
        seconds = metrics["train/seconds"]
        return {
            "tokens": tokens,
            "train_s": seconds,
            "tokens_per_s": tokens / seconds,
            "peak_rss_mb": child.peak_rss_mb,
        }

    return run


def trl_child(args) -> None:
    """One TRL DPOTrainer run, on its defaults but for the shared settings."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = common.conversational(common.read_rows(Path(args.data)))
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_length=args.max_length,
            num_train_epochs=1,
            bf16=False,  # float32 on both sides
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
            save_strategy="no",
            precompute_ref_log_probs=args.child == "precompute_ref",
        )
        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        )
        trainer = DPOTrainer(
            model=args.model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(args.model),
            peft_config=peft_config,
        )
        result = trainer.train()
    figures = {"tokens": args.tokens, "train_s": result.metrics["train_runtime"]}
    print("BENCH_RESULT " + json.dumps(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="preference pairs (one epoch)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per batch")
    parser.add_argument("--cases", default="chat", help=f"of {', '.join(common.DATA_CASES)}")
    parser.add_argument(
        "--variants", default="default,precompute_ref", help="default, precompute_ref"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run lmstack with trainer.gradient_checkpointing=true",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, on every side")
    parser.add_argument("--peak-gflops", type=float, default=0.0, help="0: measure it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return trl_child(args)
    compare(args)


def compare(args) -> None:
    from hardware import matmul_gflops
    from transformers import AutoTokenizer

    model = common.build_model()
    params = common.parameter_count(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    peak = args.peak_gflops or matmul_gflops(args.threads)
    print(f"model: {params / 1e6:.1f}M parameters ({model.name}); matmul peak {peak:.1f} GFLOP/s")
    results, rows_out = {}, []
    for name in args.cases.split(","):
        case = common.DATA_CASES[name]
        data = common.write_rows(case, args.rows, "dpo", tokenizer)
        tokens = common.lmstack_token_count(common.read_rows(data), tokenizer, case.max_length)
        print(f"\ncase {name}: {args.rows} pairs, {tokens} tokens, {args.batch_size} pairs/batch")
        for variant in args.variants.split(","):
            pre = variant == "precompute_ref"
            options = ["--model", str(model), "--data", str(data)]
            options += ["--batch-size", str(args.batch_size), "--max-length", str(case.max_length)]
            options += ["--tokens", str(tokens)]
            sides = [
                common.Side(
                    f"lmstack {variant}", lmstack_side(model, data, args, case, tokens, pre, False)
                )
            ]
            if args.checkpointing:  # TRL's default has it on; lmstack's has it off
                side = lmstack_side(model, data, args, case, tokens, pre, True)
                sides.append(common.Side(f"lmstack {variant} +ckpt", side))
            trl = common.child_side(__file__, variant, options, args.threads)
            sides.append(common.Side(f"trl {variant}", trl))
            common.interleaved(sides, args.repeats)
            medians = {side.name: common.medians(side) for side in sides}
            rows_out += common.comparison_rows(f"{name}", medians, params, peak)
            results[f"{name}/{variant}"] = {
                "rows": args.rows,
                "tokens": tokens,
                "max_length": case.max_length,
                "medians": medians,
                "samples": {side.name: side.samples for side in sides},
            }
    common.print_table(
        f"DPO + LoRA, median of {args.repeats} (threads={args.threads})",
        rows_out,
        common.TABLE_COLUMNS,
    )
    common.write_results(
        "dpo",
        {
            "params": params,
            "pairs_per_batch": args.batch_size,
            "threads": args.threads,
            "peak_gflops": peak,
            "lora": LORA,
            "versions": common.versions("torch", "transformers", "trl", "peft", "lightning"),
            "table": rows_out,
            "cases": results,
        },
    )


if __name__ == "__main__":
    main()
