"""Scalar rewards of sampled completions, for online RL objectives (grpo).

Each configured function maps ``(prompts, completions, answers)`` to one float per
completion; the objective's reward is their weighted sum ``r = sum_k w_k r_k``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmstack.data import arith

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


def build_reward_functions(configs: list[Any]) -> list[RewardFunction]:
    """One scorer per config entry; a name used twice gets its index in the metric key."""
    names = [config.name for config in configs]
    functions = []
    for index, config in enumerate(configs):
        key = config.name if names.count(config.name) == 1 else f"{config.name}{index}"
        if config.name == "verifier":
            scorer = verifier_scores
        elif config.name == "format":
            scorer = format_scorer(config.pattern)
        else:
            scorer = reward_model_scorer(config.path, f"objective.rewards[{index}].path")
        functions.append(RewardFunction(key, float(config.weight), scorer))
    return functions


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
