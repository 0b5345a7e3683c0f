"""Scalar rewards of sampled completions, for online RL objectives (grpo).

Each configured function maps ``(prompts, completions, answers)`` to one float per
completion; the objective's reward is their weighted sum ``r = sum_k w_k r_k``.

Deferred imports, for start-up time: lightning (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmstack.data import arith, math_problems
from lmstack.data.scoring import build_scorer
from lmstack.errors import LmstackError

Scorer = Callable[[list[str], list[str], list[str | None]], list[float]]


@dataclass
class RewardFunction:
    key: str  # the metric suffix: train/reward_<key>
    weight: float
    score: Scorer


def verifier_scores(
    prompts: list[str], completions: list[str], answers: list[str | None]
) -> list[float]:
    """1.0 when the completion states the row's answer in the task's format, else 0.0."""
    return [
        0.0 if answer is None else arith.verify(completion, answer)
        for completion, answer in zip(completions, answers, strict=True)
    ]


def math_scores(
    prompts: list[str], completions: list[str], answers: list[str | None]
) -> list[float]:
    """1.0 when the completion's final number equals the row's answer (data.task=math rows;
    the rule eval=math scores by: lmstack.data.math_problems), else 0.0."""
    return [
        0.0 if answer is None else math_problems.score(completion, answer)
        for completion, answer in zip(completions, answers, strict=True)
    ]


def format_scorer(pattern: str) -> Scorer:
    """1.0 when ``re.search(pattern, completion)`` matches, else 0.0."""
    regex = re.compile(pattern)

    def scores(prompts, completions, answers):
        return [float(regex.search(completion) is not None) for completion in completions]

    return scores


def reward_model_scorer(path: str, key: str = "objective.rewards.path") -> Scorer:
    """The scalar score of a reward model trained with objective=reward."""
    from lmstack.objectives.reward import load_reward_model

    model = load_reward_model(path, key=key)  # key: the config key an error names

    def scores(prompts, completions, answers):
        values = model.score(prompts, completions)
        return torch.as_tensor(values, dtype=torch.float32).flatten().tolist()

    return scores


def reference_scorer(config: Any, key: str) -> Scorer:
    """A score against each row's reference (lmstack.data.scoring); 0 for a row without one."""

    name = config.scorer if config.name == "scorer" else config.name
    key = f"{key}." + ("scorer" if config.name == "scorer" else "name")
    score_one = build_scorer(name, key, config.tolerance, list(config.fields))

    def scores(prompts, completions, answers):
        return [
            0.0 if answer is None else score_one(completion, answer, {"prompt": prompt})
            for prompt, completion, answer in zip(prompts, completions, answers, strict=True)
        ]

    return scores


def judge_scorer(config: Any, key: str) -> Scorer:
    """An LLM judge's grade of each completion, N/10 for "Rating: [[N]]" (0 for a reply
    without a rating; their count is printed): rubric config.judge.single_prompt with the
    row's reference, conf/prompt/judge_open.yaml for a row without one."""
    from lmstack.judging import connect, grade
    from lmstack.prompts import load_prompt

    key = f"{key}.judge"
    judge_cfg = config.judge
    endpoint = connect(judge_cfg, key=key)
    rubrics = {True: load_prompt(judge_cfg.single_prompt), False: load_prompt("judge_open")}

    def scores(prompts, completions, answers):
        items = [
            {"question": prompt, "answer": completion, "reference": answer or ""}
            for prompt, completion, answer in zip(prompts, completions, answers, strict=True)
        ]
        ratings: list[float | None] = [None] * len(items)
        for referenced, rubric in rubrics.items():
            wanted = [i for i, item in enumerate(items) if bool(item["reference"]) == referenced]
            if wanted:
                result = grade(
                    endpoint,
                    rubric,
                    [items[i] for i in wanted],
                    judge_cfg.max_tokens,
                    judge_cfg.concurrency,
                )
                for i, rating in zip(wanted, result["ratings"], strict=True):
                    ratings[i] = rating
        unparsed = sum(rating is None for rating in ratings)
        if unparsed:
            print(
                f"lmstack: warning: {key}: {unparsed} of {len(items)} judge replies held no "
                "rating; they score 0",
                flush=True,
            )
        return [0.0 if rating is None else rating for rating in ratings]

    return scores


REFERENCE_REWARDS = ("exact", "normalized", "numeric", "json_fields", "scorer")


def build_reward_functions(
    configs: list[Any], key: str = "objective.rewards"
) -> list[RewardFunction]:
    """One scorer per config entry (`key`: the config list errors name); a name used twice
    gets its index in the metric key."""
    names = [config.name for config in configs]
    functions = []
    for index, config in enumerate(configs):
        where = f"{key}[{index}]"
        metric = config.name if names.count(config.name) == 1 else f"{config.name}{index}"
        if config.name == "verifier":
            scorer = verifier_scores
        elif config.name == "math":
            scorer = math_scores
        elif config.name == "format":
            scorer = format_scorer(config.pattern)
        elif config.name in REFERENCE_REWARDS:
            scorer = reference_scorer(config, where)
        elif config.name == "judge":
            scorer = judge_scorer(config, where)
        else:
            scorer = reward_model_scorer(config.path, f"{where}.path")
        functions.append(RewardFunction(metric, float(config.weight), scorer))
    return functions


class ConstantRewardError(LmstackError):
    """The reward gave the same value to every completion of the first steps: nothing to learn."""


class RewardGuard:
    """Watches the first `steps` rollouts: a reward that is constant over the whole batch (all
    0, say) is a warning at the first; a total reward constant in every one of them stops the
    run with an error naming the rewards and showing a sample (0 steps: warnings only)."""

    def __init__(self, functions: list[RewardFunction], steps: int) -> None:
        self.functions, self.steps = functions, steps
        self.seen = 0
        self.always_constant = True

    def observe(self, total: torch.Tensor, parts: dict[str, torch.Tensor], sample: dict) -> None:
        if self.seen >= max(self.steps, 1):
            return
        self.seen += 1
        if self.seen == 1:
            for key, scores in parts.items():
                if is_constant(scores):
                    print(
                        f"lmstack: warning: reward '{key}' is {float(scores.flatten()[0]):g} "
                        f"for every completion of the first batch; e.g. {describe(sample)}",
                        flush=True,
                    )
        self.always_constant = self.always_constant and is_constant(total)
        if self.steps and self.seen == self.steps and self.always_constant:
            constant = [key for key, scores in parts.items() if is_constant(scores)]
            raise ConstantRewardError(
                f"objective.rewards: the reward ({', '.join(constant)}) was the same for every "
                f"completion in each of the first {self.steps} steps (value "
                f"{float(total.flatten()[0]):g}): completions that all score alike teach "
                f"nothing. Check that the reward fits your rows; a sample: {describe(sample)} "
                "(objective.reward_check_steps=0 turns this check off)"
            )


def is_constant(scores: torch.Tensor) -> bool:
    flat = scores.flatten().float()
    return flat.numel() > 0 and bool((flat == flat[0]).all())


def describe(sample: dict) -> str:
    return json.dumps(sample, default=str)[:400]


def score_completions(
    functions: list[RewardFunction],
    prompts: list[str],
    completions: list[str],
    answers: list[str | None],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, parts)``: the ``(N,)`` weighted sum and each function's ``(N,)`` scores."""
    parts = {
        function.key: torch.tensor(function.score(prompts, completions, answers))
        for function in functions
    }
    total = sum(function.weight * parts[function.key] for function in functions)
    return total, parts


def rollout_samples(batch: dict[str, Any], rollout: Any, group: int) -> list[dict[str, Any]]:
    """Each completion of a rollout with its prompt, reference and rewards, one per prompt
    first (the first sample of every group, then the second, ...)."""
    texts = rollout.texts or []
    rows = []
    for g in range(group):
        for b, prompt in enumerate(batch["prompt"]):
            i = b * group + g
            if i >= len(texts):
                continue
            rows.append(
                {
                    "prompt": prompt,
                    "completion": texts[i],
                    "reference": batch["answer"][b],
                    "reward": float(rollout.rewards[i]),
                    **{f"reward_{k}": float(v[i]) for k, v in rollout.parts.items()},
                }
            )
    return rows


def save_samples(module: Any, samples: list[dict[str, Any]], step: int) -> None:
    """samples/<objective>.jsonl in the run dir, a W&B table, and two on the console."""

    if not samples or module._trainer is None:
        return
    records = [{"step": step, **s} for s in samples]
    folder = Path(module.trainer.default_root_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{module.objective.name}.jsonl", "a") as handle:
        handle.writelines(json.dumps(r, default=str) + "\n" for r in records)
    for record in records[:2]:
        shown = {k: record[k] for k in ("step", "prompt", "completion", "reference", "reward")}
        print(f"  sample: {json.dumps(shown, default=str)[:300]}", flush=True)
    columns = list(records[0])
    for logger in module.loggers:
        if hasattr(logger, "log_table"):
            data = [
                [
                    json.dumps(r[c], default=str) if isinstance(r[c], dict | list) else r[c]
                    for c in columns
                ]
                for r in records
            ]
            logger.log_table(key="train/samples", columns=columns, data=data)
