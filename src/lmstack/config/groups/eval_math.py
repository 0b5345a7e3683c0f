"""Options of the `math` eval suite (eval.math): reasoning-gym problems on held-out templates.

The generator names and the default mix live here (the config layer may not import
lmstack.data); lmstack.data.math_problems draws the problems.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from lmstack.config.rules import require, require_choice

MATH_GENERATORS = ("gsm_symbolic", "basic_arithmetic", "chain_sum")
# the default mix: each generator's weight and reasoning-gym options (chain sums of 2-3 numbers
# under 100, so a 135M model gets some right and RL has a signal to learn from)
DEFAULT_MATH_GENERATORS: list[dict[str, Any]] = [
    {"name": "gsm_symbolic", "weight": 0.5, "options": {}},
    {
        "name": "chain_sum",
        "weight": 0.5,
        "options": {"min_terms": 2, "max_terms": 3, "max_digits": 2},
    },
]


@dataclass
class MathGenerator:
    """One reasoning-gym generator of the mix: its name, its share, its own options."""

    # gsm_symbolic, basic_arithmetic or chain_sum
    name: str = "gsm_symbolic"
    # problems are shared among the generators in proportion to their weights
    weight: float = 1.0
    # passed to reasoning_gym.create_dataset (e.g. chain_sum's max_terms, max_digits)
    options: dict[str, Any] = field(default_factory=dict)


def check_math_generators(generators: list[Any], key: str) -> None:
    """Each entry names a known generator with a positive weight (dicts or MathGenerator)."""
    require(len(generators) > 0, key, f"is empty; name some of {', '.join(MATH_GENERATORS)}")
    for index, spec in enumerate(generators):
        get = spec.get if isinstance(spec, dict) else lambda k, d=None, s=spec: getattr(s, k, d)
        require_choice(str(get("name")), MATH_GENERATORS, f"{key}[{index}].name")
        weight = get("weight", 1.0)
        require(weight > 0, f"{key}[{index}].weight", f"must be > 0, got {weight}")


@dataclass
class MathEvalConfig:
    """Grade-school math from reasoning-gym's seeded generators, scored by exact numeric answer
    on templates that GRPO's `data.task=math` rows never use (lmstack.data.math_problems)."""

    # problems in all, shared among the generators by weight
    count: int = 100
    generators: list[MathGenerator] = field(
        default_factory=lambda: [MathGenerator(**copy.deepcopy(g)) for g in DEFAULT_MATH_GENERATORS]
    )
    # reasoning-gym's seed: the same seed, the same problems
    seed: int = 0

    def check(self) -> None:
        require(self.count >= 1, "eval.math.count", "must be >= 1")
        check_math_generators(list(self.generators), "eval.math.generators")
