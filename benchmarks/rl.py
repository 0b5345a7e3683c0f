"""GRPO and RLOO + LoRA: lmstack (`python run.py objective=grpo|rloo
objective.rollout_engine=in_process ...`) against TRL's GRPOTrainer and RLOOTrainer, both
sampling with transformers' `generate` in the training process (TRL: use_vllm=False).

Same model, prompts, prompts per update, group size (TRL num_generations), completion budget
(max_new_tokens = max_completion_length), sampling (temperature 1, top_p 1, no top-k), KL
weight beta (lmstack's defaults: GRPO 0.04, RLOO 0.05; TRL's GRPO default is 0), loss
(GRPO: dapo on both sides), one policy update per batch of rollouts, LoRA settings, precision
and reward: `distinct_words`, below, one deterministic function given to lmstack as a scorer
reward and to TRL as a reward callable. Everything else (learning rate, gradient
checkpointing) on each side's defaults. The figure is policy updates per second over the
training loop (rollouts, rewards, reference pass and update); the same number of updates a
side.

    .venv/bin/python benchmarks/rl.py --model smollm2_135m --cases chat,mixed
    .venv/bin/python benchmarks/rl.py --model smollm2_135m --updates 2 --repeats 1   # a look
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

METHODS = ("grpo", "rloo")
BETA = {"grpo": 0.04, "rloo": 0.05}  # lmstack's defaults, given to TRL too


def distinct_word_share(text: str) -> float:
    """The share of a completion's words that are distinct (0 for an empty one): cheap,
    deterministic, and different between samples, so every group has an advantage to learn."""
    words = text.split()
    return len(set(words)) / len(words) if words else 0.0


def distinct_words(completion: str, reference: Any, row: dict) -> float:
    """lmstack's scorer form of the reward (objective.rewards: name=scorer)."""
    return distinct_word_share(completion)


def trl_distinct_words(prompts: list, completions: list, **kwargs) -> list[float]:
    """TRL's reward-callable form of the same reward (conversational completions)."""
    return [
        distinct_word_share(c[-1]["content"] if isinstance(c, list) else c) for c in completions
    ]


LMSTACK_REWARD = "[{name:scorer,weight:1.0,scorer:'benchmarks.rl:distinct_words'}]"


def prompt_rows(case: common.DataCase, count: int, tokenizer) -> Path:
    """`count` prompts of the case's shape (the SFT rows' prompts), as lmstack's prompt rows
    (an "answer" each: lmstack scores a row without one as 0; this reward ignores it)."""
    sft = common.write_rows(case, count, "sft", tokenizer)
    path = sft.with_name(sft.name.replace("sft-", "prompts-", 1))
    if not path.exists():
        rows = [{"prompt": r["prompt"], "answer": "-"} for r in common.read_rows(sft)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lmstack_side(method: str, model: Path, data: Path, args, case: common.DataCase):
    overrides = [
        f"objective={method}",
        "objective.rollout_engine=in_process",
        f"objective.group_size={args.group_size}",
        f"objective.max_new_tokens={args.max_new_tokens}",
        "objective.temperature=1.0",
        "objective.top_p=1.0",
        f"objective.beta={BETA[method]}",
        "objective.iterations=1",
        f"objective.rewards={LMSTACK_REWARD}",
        "objective.reward_check_steps=0",  # a benchmark never stops on a flat reward
    ]
    sizes = copy.copy(args)
    sizes.rows = args.updates * args.batch_size
    run = common.lmstack_lora_side(overrides, model, data, sizes, case, args.updates)
    return lambda: updates_figures(run())


def updates_figures(figures: dict[str, float]) -> dict[str, float]:
    """A side's figures with its `tokens` (here: updates) renamed."""
    updates = figures.pop("tokens")
    figures.pop("tokens_per_s", None)
    return {"updates": updates, **figures, "updates_per_s": updates / figures["train_s"]}


def trl_child(args) -> None:
    """One TRL GRPOTrainer or RLOOTrainer run, on its defaults but for the shared settings."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset

    prompts = [
        {"prompt": [{"role": "user", "content": row["prompt"]}]}
        for row in common.read_rows(Path(args.data))
    ]
    if args.child == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        extra = {"loss_type": "dapo"}
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

        extra = {}
    options = common.trl_training_options(args)
    # TRL counts completions per device batch: B prompts x G samples, one generation a step
    options["per_device_train_batch_size"] = args.batch_size * args.group_size

    def config(out: str) -> Any:
        return Config(
            output_dir=out,
            **options,
            **extra,
            max_steps=args.updates,
            num_generations=args.group_size,
            max_completion_length=args.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=BETA[args.child],
            num_iterations=1,
            use_vllm=False,
        )

    common.train_trl(
        Trainer,
        config,
        Dataset.from_list(prompts),
        args,
        count=args.updates,
        tokenizer_options={"padding_side": "left"},
        reward_funcs=[trl_distinct_words],
    )


def trl_side(method: str, model: Path, data: Path, args):
    options = ["--model", str(model), "--data", str(data), "--precision", args.precision]
    options += ["--batch-size", str(args.batch_size), "--group-size", str(args.group_size)]
    options += ["--max-new-tokens", str(args.max_new_tokens), "--updates", str(args.updates)]
    run = common.child_side(__file__, method, options, args.threads)
    return lambda: updates_figures(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=4, help="policy updates a side")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per update")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion budget")
    parser.add_argument("--cases", default="chat", help=f"of {', '.join(common.DATA_CASES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    parser.add_argument(
        "--precision", choices=common.PRECISIONS, default="fp32", help="the same on every side"
    )
    common.add_model_arguments(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return trl_child(args)
    compare(args)


COLUMNS = [
    "case",
    "side",
    "updates/s",
    "train s",
    "peak RSS MB",
    "lmstack speed-up",
    "lmstack RSS ratio",
    "load",
]


def comparison_rows(case: str, method: str, medians: dict[str, dict[str, float]]) -> list[dict]:
    ours, theirs = medians[f"lmstack {method}"], medians[f"trl {method}"]
    rows = []
    for side, figures in ((f"lmstack {method}", ours), (f"trl {method}", theirs)):
        row = {
            "case": case,
            "side": side,
            "updates/s": figures["updates_per_s"],
            "train s": figures["train_s"],
            "peak RSS MB": figures["peak_rss_mb"],
            "load": figures["load_1min"],
        }
        if figures is theirs:
            row["lmstack speed-up"] = ours["updates_per_s"] / theirs["updates_per_s"]
            row["lmstack RSS ratio"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
        rows.append(row)
    return rows


def compare(args) -> None:
    model = common.model_folder(args)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = args.updates * args.batch_size
    results, table = {}, []
    for name in args.cases.split(","):
        case = common.DATA_CASES[name]
        data = prompt_rows(case, prompts, tokenizer)
        print(
            f"\ncase {name}: {args.updates} updates of {args.batch_size} prompts x "
            f"{args.group_size} completions of up to {args.max_new_tokens} tokens"
        )
        by_method = {
            method: [
                common.Side(f"lmstack {method}", lmstack_side(method, model, data, args, case)),
                common.Side(f"trl {method}", trl_side(method, model, data, args)),
            ]
            for method in args.methods.split(",")
        }
        every_side = [side for sides in by_method.values() for side in sides]
        common.interleaved(every_side, args.repeats)
        results[name] = {
            "prompts": prompts,
            "medians": {side.name: common.medians(side) for side in every_side},
            "samples": {side.name: side.samples for side in every_side},
        }
        for method in by_method:
            table += comparison_rows(name, method, results[name]["medians"])
    title = f"GRPO, RLOO + LoRA, median of {args.repeats} (threads={args.threads})"
    common.print_table(title, table, COLUMNS)
    payload = {
        "updates": args.updates,
        "prompts_per_update": args.batch_size,
        "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens,
        "beta": BETA,
        "threads": args.threads,
        "lora": common.LORA,
        "versions": common.versions("torch", "transformers", "trl", "peft", "lightning"),
        "table": table,
        "cases": results,
    }
    name = "rl" if args.precision == "fp32" else f"rl-{args.precision}"
    common.write_results(name, payload, args.model)


if __name__ == "__main__":
    main()
