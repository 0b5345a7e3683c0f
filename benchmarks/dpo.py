"""DPO + LoRA: lmstack (`python run.py objective=dpo ...`) against TRL's DPOTrainer.

Same model, preference rows, pairs per batch, max sequence length, LoRA settings
and precision (float32, or bfloat16 with --precision bf16), one epoch each,
everything else on each side's defaults; then both with reference log-probs
precomputed before training
(lmstack: objective.precompute_ref=true; TRL: precompute_ref_log_probs=True).
Tokens are the real tokens of both sequences of each pair; the time is the
training loop's (each side precomputes reference log-probs before it).

    .venv/bin/python benchmarks/dpo.py
    .venv/bin/python benchmarks/dpo.py --model smollm2_135m --cases chat   # real model
    .venv/bin/python benchmarks/dpo.py --model smollm2_135m --cases chat --precision bf16
    .venv/bin/python benchmarks/dpo.py --rows 32 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def lmstack_side(
    model: Path,
    data: Path,
    args,
    case: common.DataCase,
    tokens: int,
    pre: bool,
    ckpt: bool | None,
):
    """lmstack on its defaults (`ckpt` None: checkpointing on for DPO), or with it forced."""
    overrides = [
        *common.checkpointing_override(ckpt),
        "objective=dpo",
        f"objective.precompute_ref={str(pre).lower()}",
    ]
    return common.lmstack_lora_side(overrides, model, data, args, case, tokens)


def trl_child(args) -> None:
    """One TRL DPOTrainer run, on its defaults but for the shared settings."""
    rows = common.trl_dataset(args)
    from trl import DPOConfig, DPOTrainer

    def config(out: str) -> DPOConfig:
        return DPOConfig(
            output_dir=out,
            **common.trl_training_options(args),
            max_length=args.max_length,
            precompute_ref_log_probs=args.child == "precompute_ref",
        )

    common.train_trl(DPOTrainer, config, rows, args, count=args.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, help="preference pairs, one epoch (default: 64; 16 on a real model)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per batch")
    parser.add_argument("--cases", default="chat", help=f"of {', '.join(common.DATA_CASES)}")
    parser.add_argument(
        "--variants", default="default,precompute_ref", help="default, precompute_ref"
    )
    common.add_training_arguments(parser)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.short_on_a_real_model(args, rows=64, real_rows=16)
    if args.child:
        return trl_child(args)
    compare(args)


def compare(args) -> None:
    model, params, tokenizer, peak = common.comparison_model(args)
    results, rows_out = {}, []
    for name, case, data, tokens in common.comparison_cases(args, "dpo", tokenizer):
        print(f"\ncase {name}: {args.rows} pairs, {tokens} tokens, {args.batch_size} pairs/batch")
        for variant in args.variants.split(","):
            pre = variant == "precompute_ref"
            options = ["--model", str(model), "--data", str(data)]
            options += ["--batch-size", str(args.batch_size), "--max-length", str(case.max_length)]
            options += ["--tokens", str(tokens), "--precision", args.precision]
            sides = [
                common.Side(
                    f"lmstack {variant}", lmstack_side(model, data, args, case, tokens, pre, None)
                )
            ]
            if args.checkpointing:  # both sides' DPO defaults have it on: lmstack also without
                side = lmstack_side(model, data, args, case, tokens, pre, False)
                sides.append(common.Side(f"lmstack {variant} -ckpt", side))
            trl = common.child_side(__file__, variant, options, args.threads)
            sides.append(common.Side(f"trl {variant}", trl))
            common.interleaved(sides, args.repeats)
            record = results[f"{name}/{variant}"] = common.case_record(args, case, tokens, sides)
            rows_out += common.comparison_rows(name, record["medians"], params, peak)
    common.report_comparison(
        "dpo", "DPO + LoRA", args, params, peak, rows_out, results, pairs_per_batch=args.batch_size
    )


if __name__ == "__main__":
    main()
