"""KTO, ORPO and SimPO + LoRA: lmstack (`python run.py objective=<method> ...`) against TRL's
KTOTrainer, ORPOTrainer and CPOTrainer (SimPO: `CPOConfig(loss_type="simpo", cpo_alpha=0)`),
with lmstack's own DPO on the same rows beside them (ORPO and SimPO have no reference, so
they should peak below it).

Same model, rows, batch, max sequence length, LoRA settings, precision (float32, or
bfloat16 with --precision bf16) and loss settings (beta; SimPO's margin gamma = 0.5 x beta =
1.0) on both sides, one epoch each, everything else (learning rate, gradient checkpointing)
on each side's defaults. KTO's rows are the preference pairs split in two, one file for both
sides: `{prompt, chosen answer, label: true}` and `{prompt, rejected answer, label: false}`,
at twice the pairs per batch (the same sequences per step). Tokens are the real tokens of
every trained sequence (both answers of a pair; KTO's KL sequences, on both sides, are not
counted); the time is each side's training loop. All sides of a data case run interleaved in
one loop, so the DPO memory comparison comes from the same run.

    .venv/bin/python benchmarks/preference.py --model smollm2_135m --cases chat,mixed
    .venv/bin/python benchmarks/preference.py --model smollm2_135m --rows 16 --repeats 1  # a look
    .venv/bin/python benchmarks/preference.py --methods kto,orpo --no-dpo   # some of them
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

METHODS = ("kto", "orpo", "simpo")
# loss settings both sides get (lmstack's defaults, given to TRL by its own names)
BETA = {"kto": 0.1, "orpo": 0.1, "simpo": 2.0}
SIMPO_GAMMA = 0.5 * BETA["simpo"]  # lmstack objective.gamma_beta_ratio (0.5) x beta
# lmstack's default: the objective checkpoints (True) or the memory plan decides (None)
CHECKPOINTED = {"kto": None, "orpo": True, "simpo": True, "dpo": True}


def unpaired_rows(pairs: Path) -> Path:
    """The preference pairs as KTO's unpaired rows, chosen (true) then rejected (false)."""
    path = pairs.with_name(pairs.name.replace("dpo-", "kto-", 1))
    if not path.exists():
        rows = [
            {"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
            for row in common.read_rows(pairs)
            for side in ("chosen", "rejected")
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kto_sizes(args):
    """KTO's rows and batch: twice the pairs' (one row per answer), so the same steps."""
    doubled = copy.copy(args)
    doubled.rows, doubled.batch_size = 2 * args.rows, 2 * args.batch_size
    return doubled


def lmstack_side(method: str, model: Path, data: Path, args, case, tokens: int, ckpt):
    """lmstack on its defaults for `method` (`ckpt` None), or with checkpointing forced."""
    overrides = [*common.checkpointing_override(ckpt), f"objective={method}"]
    sizes = kto_sizes(args) if method == "kto" else args
    return common.lmstack_lora_side(overrides, model, data, sizes, case, tokens)


def trl_config(method: str, out: str, args):
    """The TRL config of `method`: the shared settings and the loss settings, nothing else."""
    shared = {"output_dir": out, **common.trl_training_options(args), "max_length": args.max_length}
    if method == "kto":
        from trl import KTOConfig

        return KTOConfig(**shared, beta=BETA["kto"])
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**shared, beta=BETA["orpo"])
    from trl.experimental.cpo import CPOConfig

    return CPOConfig(
        **shared, loss_type="simpo", cpo_alpha=0.0, beta=BETA["simpo"], simpo_gamma=SIMPO_GAMMA
    )


def trl_trainer_class(method: str):
    if method == "kto":
        from trl import KTOTrainer

        return KTOTrainer
    if method == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        return ORPOTrainer
    from trl.experimental.cpo import CPOTrainer

    return CPOTrainer


def trl_child(args) -> None:
    """One TRL run of --child (kto, orpo or simpo), on its defaults but for the shared settings."""
    rows = common.trl_dataset(args)
    source = common.read_rows(Path(args.data))
    if "label" in source[0]:  # KTO: the conversation keeps its label
        rows = rows.add_column("label", [row["label"] for row in source])
    make_config = lambda out: trl_config(args.child, out, args)  # noqa: E731
    common.train_trl(trl_trainer_class(args.child), make_config, rows, args, count=args.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, help="preference pairs, one epoch (default: 64; 16 on a real model)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="pairs per batch (KTO: twice as many rows)"
    )
    parser.add_argument("--cases", default="chat", help=f"of {', '.join(common.DATA_CASES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument(
        "--dpo",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also lmstack's DPO on the same pairs (the memory ORPO and SimPO should stay under)",
    )
    common.add_training_arguments(parser)
    parser.set_defaults(checkpointing=False)  # --checkpointing: lmstack with it flipped too
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.short_on_a_real_model(args, rows=64, real_rows=16)
    if args.child:
        return trl_child(args)
    compare(args)


def case_sides(args, model: Path, case, pairs: Path, tokens: int) -> dict[str, list]:
    """Each method's sides: lmstack, [lmstack with checkpointing flipped,] TRL; dpo: lmstack."""
    by_method = {}
    for method in args.methods.split(","):
        data = unpaired_rows(pairs) if method == "kto" else pairs
        sizes = kto_sizes(args) if method == "kto" else args
        options = ["--model", str(model), "--data", str(data), "--tokens", str(tokens)]
        options += ["--batch-size", str(sizes.batch_size), "--max-length", str(case.max_length)]
        options += ["--precision", args.precision]
        sides = [
            common.Side(
                f"lmstack {method}", lmstack_side(method, model, data, args, case, tokens, None)
            )
        ]
        if args.checkpointing:
            flipped = not CHECKPOINTED[method]
            side = lmstack_side(method, model, data, args, case, tokens, flipped)
            sides.append(common.Side(f"lmstack {method} {'+' if flipped else '-'}ckpt", side))
        trl = common.child_side(__file__, method, options, args.threads)
        by_method[method] = [*sides, common.Side(f"trl {method}", trl)]
    if args.dpo:
        side = lmstack_side("dpo", model, pairs, args, case, tokens, None)
        by_method["dpo"] = [common.Side("lmstack dpo", side)]
    return by_method


def versus_dpo(case: str, medians: dict[str, dict[str, float]]) -> list[dict]:
    """ORPO's and SimPO's peak RSS (lmstack) as a ratio of lmstack DPO's on the same rows."""
    dpo = medians.get("lmstack dpo")
    if dpo is None:
        return []
    return [
        {
            "case": case,
            "side": name,
            "peak RSS MB": figures["peak_rss_mb"],
            "lmstack dpo MB": dpo["peak_rss_mb"],
            "RSS ratio to dpo": figures["peak_rss_mb"] / dpo["peak_rss_mb"],
            "tokens/s ratio to dpo": figures["tokens_per_s"] / dpo["tokens_per_s"],
        }
        for name, figures in medians.items()
        if name in ("lmstack orpo", "lmstack simpo")
    ]


def compare(args) -> None:
    model, params, tokenizer, peak = common.comparison_model(args)
    results, table, dpo_table = {}, [], []
    for name, case, pairs, tokens in common.comparison_cases(args, "dpo", tokenizer):
        print(f"\ncase {name}: {args.rows} pairs, {tokens} tokens, {args.batch_size} pairs/batch")
        by_method = case_sides(args, model, case, pairs, tokens)
        every_side = [side for sides in by_method.values() for side in sides]
        common.interleaved(every_side, args.repeats)
        record = results[name] = common.case_record(args, case, tokens, every_side)
        for sides in by_method.values():
            medians = {side.name: record["medians"][side.name] for side in sides}
            table += common.comparison_rows(name, medians, params, peak)
        dpo_table += versus_dpo(name, record["medians"])
    columns = ["case", "side", "peak RSS MB", "lmstack dpo MB", "RSS ratio to dpo"]
    if dpo_table:
        common.print_table("ORPO and SimPO (lmstack) against lmstack DPO", dpo_table, columns)
    methods = args.methods.split(",") + (["dpo"] if args.dpo else [])
    # a run of some of the methods goes beside the full one, not over it
    kind = "preference" if set(METHODS) <= set(methods) else "-".join(["preference", *methods])
    common.report_comparison(
        kind,
        "KTO, ORPO, SimPO + LoRA",
        args,
        params,
        peak,
        table,
        results,
        pairs_per_batch=args.batch_size,
        versus_dpo=dpo_table,
        loss_settings={"beta": BETA, "simpo_gamma": SIMPO_GAMMA},
    )


if __name__ == "__main__":
    main()
