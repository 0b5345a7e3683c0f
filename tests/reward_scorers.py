"""Reward scorers for the tests' runs (objective.rewards: {name: scorer, scorer: MODULE:NAME},
with tests/ on PYTHONPATH): deterministic in the completion, so which groups tie is known."""

from __future__ import annotations

from typing import Any


def completion_length(completion: str, reference: Any, row: dict) -> float:
    """The completion's length in characters: two samples rarely tie."""
    return float(len(completion))


def length_if_divisible_by_3(completion: str, reference: Any, row: dict) -> float:
    """The completion's length when the row's answer is a multiple of 3, else 0: the groups of
    the other prompts (about two in three) all score the same."""
    return float(len(completion)) if int(reference) % 3 == 0 else 0.0


def always_zero(completion: str, reference: Any, row: dict) -> float:
    """The same for every completion: every group's rewards agree."""
    return 0.0
