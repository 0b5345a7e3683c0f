"""SFT + LoRA: lmstack (`python run.py ...`, as users run it) against TRL's SFTTrainer.

Same model (a ~21M-parameter random Llama with lmstack's tokenizer, or a real one
with --model), same rows, batch size, max sequence length, LoRA settings and
precision (float32, or bfloat16 with --precision bf16), one epoch each; everything
else on each side's defaults. TRL also runs with its documented speed options
(padding_free, packing). Figures: real (non-pad) tokens per second of the training
loop, peak RSS of the process, and model-FLOPs
utilisation against this machine's measured matmul rate.

    .venv/bin/python benchmarks/sft.py                       # ~10 min on 2 busy cores
    .venv/bin/python benchmarks/sft.py --model smollm2_135m --cases chat   # real model
    .venv/bin/python benchmarks/sft.py --model smollm2_135m --cases chat --precision bf16
    .venv/bin/python benchmarks/sft.py --rows 64 --repeats 1 # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

TRL_VARIANTS = {
    "default": {},
    # TRL refuses padding_free with max_length unless it packs; the rows fit max_length anyway
    "padding_free": {"padding_free": True, "max_length": None},
    "packing": {"packing": True},
}


def lmstack_side(
    model: Path, data: Path, args, case: common.DataCase, tokens: int, checkpointing: bool | None
):
    """lmstack on its defaults (`checkpointing` None: the memory plan decides), or with it
    forced."""
    overrides = common.checkpointing_override(checkpointing)
    return common.lmstack_lora_side(overrides, model, data, args, case, tokens)


def trl_side(model: Path, data: Path, args, case: common.DataCase, variant: str):
    options = ["--model", str(model), "--data", str(data), "--batch-size", str(args.batch_size)]
    options += ["--max-length", str(case.max_length), "--precision", args.precision]
    return common.child_side(__file__, variant, options, args.threads)


def trl_child(args) -> None:
    """One TRL SFTTrainer run, on its defaults but for the shared settings."""
    rows = common.trl_dataset(args)
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            **common.trl_training_options(args),
            **{"max_length": args.max_length, **TRL_VARIANTS[args.child]},
        )
        trainer = SFTTrainer(
            model=args.model,
            args=config,
            train_dataset=rows,
            processing_class=AutoTokenizer.from_pretrained(args.model),
            peft_config=common.trl_lora_config(),
        )
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        result = trainer.train()
    figures = {"tokens": tokens, "train_s": result.metrics["train_runtime"]}
    print("BENCH_RESULT " + json.dumps(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, help="training rows, one epoch (default: 128; 32 on a real model)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cases", default="chat,mixed", help=f"of {', '.join(common.DATA_CASES)}")
    parser.add_argument("--trl", default="default,padding_free", help="TRL variants to run")
    common.add_training_arguments(parser)
    args = parser.parse_args()
    common.short_on_a_real_model(args, rows=128, real_rows=32)
    if args.child:
        return trl_child(args)
    compare(args)


def compare(args) -> None:
    model, params, tokenizer, peak = common.comparison_model(args)
    results, rows_out = {}, []
    for name, case, data, tokens in common.comparison_cases(args, "sft", tokenizer):
        print(f"\ncase {name}: {args.rows} rows, {tokens} tokens, batch {args.batch_size}")
        sides = [common.Side("lmstack", lmstack_side(model, data, args, case, tokens, None))]
        if args.checkpointing:  # TRL's default has it on; lmstack's plan decides (the log says)
            for forced, label in ((True, "lmstack +ckpt"), (False, "lmstack -ckpt")):
                side = lmstack_side(model, data, args, case, tokens, forced)
                sides.append(common.Side(label, side))
        sides += [
            common.Side(f"trl {v}", trl_side(model, data, args, case, v))
            for v in args.trl.split(",")
        ]
        common.interleaved(sides, args.repeats)
        results[name] = common.case_record(args, case, tokens, sides)
        rows_out += common.comparison_rows(name, results[name]["medians"], params, peak)
    common.report_comparison(
        "sft", "SFT + LoRA", args, params, peak, rows_out, results, batch_size=args.batch_size
    )


if __name__ == "__main__":
    main()
