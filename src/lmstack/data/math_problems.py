"""Grade-school math problems from reasoning-gym's seeded generators, split by template.

One module feeds both the `math` eval suite (held-out templates) and GRPO training rows
(`data.task=math`, the other templates), so the two never share a template. It lives in
lmstack.data because objectives may not import lmstack.evaluation.

Generators (reasoning-gym 0.1.25): ``gsm_symbolic`` (GSM8K-derived templates),
``basic_arithmetic`` and ``chain_sum``. A problem's *template* is

- gsm_symbolic: the index of the GSM8K-derived template that wrote it (0-99);
- basic_arithmetic, chain_sum: the expression's shape, every number replaced by ``N``
  (``N + N - N``), so two problems differing only in their numbers share a template.

The split: a template is held out for evaluation when
``sha256("<generator>:<template>")`` (its first 8 hex digits as an integer) mod 100 is below
``TEST_PERCENT``. It depends on nothing else (not the seed, not the count), so every run,
eval or training, agrees on it. Problems are drawn with reasoning-gym's own ``__getitem__``
(seeded by the seed), and those of the wrong side of the split are skipped.

Scoring rule (exact numeric answer): the completion's final number (``-`` sign and decimals
kept, commas between digit groups dropped) must equal the reference numerically. This is
lm-eval's GSM8K "flexible-extract" rule. ``canonical`` writes that number the way
reasoning-gym writes its answers (``12``, not ``12.0``), so its own ``score_answer`` can be
asked about the same extraction (tests/test_math_suite.py checks they agree).

Deferred imports, for start-up time: reasoning_gym is imported inside the functions that
need it; a missing wheel is a ConfigError naming what to install.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lmstack.config.groups.eval_math import check_math_generators
from lmstack.errors import ConfigError

# share (in percent) of each generator's templates held out for evaluation
TEST_PERCENT = 30
# a final number: sign, digits with optional thousands commas, decimals
FINAL_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
INSTALL_HINT = "pip install 'lmstack[evals]' (or: pip install 'reasoning-gym>=0.1.25,<0.2')"
# reasoning-gym draws problems by index; more than this many skips per problem is a bug
MAX_DRAWS_PER_PROBLEM = 200


@dataclass
class MathProblem:
    question: str
    answer: str  # as reasoning-gym writes it ("288", "-4")
    generator: str
    template: str
    entry: dict[str, Any] = field(repr=False, default_factory=dict)  # reasoning-gym's own

    def record(self) -> dict[str, Any]:
        return {"generator": self.generator, "template": self.template}


def require_reasoning_gym(key: str) -> Any:
    """The reasoning_gym module, or a ConfigError naming the key that needs it."""
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError(f"{key}: needs the reasoning-gym wheel, which is not installed; "
                          f"{INSTALL_HINT}") from None  # fmt: skip
    return reasoning_gym


def spec_of(spec: Any) -> tuple[str, float, dict[str, Any]]:
    """(name, weight, options) of a generator entry (a dict or the config dataclass)."""
    get = spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)
    return str(get("name")), float(get("weight", 1.0)), dict(get("options", None) or {})


def counts(generators: list[Any], total: int) -> list[int]:
    """`total` shared by weight (largest remainders get the leftovers, first wins ties)."""
    weights = [spec_of(spec)[1] for spec in generators]
    shares = [total * w / sum(weights) for w in weights]
    out = [int(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: out[i] - shares[i])
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def template_of(generator: str, dataset: Any, index: int, entry: dict[str, Any]) -> str:
    if generator == "gsm_symbolic":
        return str(dataset.task_indices[index])
    return re.sub(r"\d+", "N", entry["metadata"]["expression"])


def is_held_out(generator: str, template: str) -> bool:
    digest = hashlib.sha256(f"{generator}:{template}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 < TEST_PERCENT


def problems(
    generators: list[Any],
    total: int,
    seed: int,
    held_out: bool,
    key: str = "eval.math.generators",
) -> list[MathProblem]:
    """`total` problems, shared among the generators by weight, from the held-out templates
    (held_out=True) or the others; the same arguments give the same problems. `key` names the
    generator list in errors."""
    check_math_generators(list(generators), key)
    gym = require_reasoning_gym(key)
    out: list[MathProblem] = []
    for spec, count in zip(generators, counts(generators, total)):
        name, _, options = spec_of(spec)
        drawn = draw(gym, name, options, seed, held_out, key)
        out.extend(next(drawn) for _ in range(count))
    return out


def draw(gym: Any, name: str, options: dict, seed: int, held_out: bool, key: str) -> Iterator:
    """Problems of one generator on one side of the split, in reasoning-gym's index order."""
    size = 10_000
    try:
        dataset = gym.create_dataset(name, seed=seed, size=size, **options)
    except (TypeError, AssertionError, ValueError) as error:
        refusal = f"generator '{name}' refuses options {options} ({error})"
        raise ConfigError(f"{key}: {refusal}") from None
    misses = 0
    for index in range(size):
        entry = dataset[index]
        template = template_of(name, dataset, index, entry)
        if is_held_out(name, template) != held_out:
            misses += 1
            if misses > MAX_DRAWS_PER_PROBLEM:
                raise ConfigError(f"{key}: generator '{name}' with options {options} has no "
                                  "templates on this side of the split")  # fmt: skip
            continue
        misses = 0
        yield MathProblem(entry["question"], str(entry["answer"]), name, template, entry)
    raise ConfigError(f"{key}: generator '{name}' ran out of problems ({size} drawn)")


def final_number(completion: str) -> str | None:
    """The completion's last number as written (commas dropped), or None."""
    found = FINAL_NUMBER.findall(completion or "")
    return found[-1].replace(",", "") if found else None


def canonical(number: str) -> str:
    """A number as reasoning-gym writes answers: integers without a decimal part."""
    value = float(number)
    return str(int(value)) if value.is_integer() else repr(value)


def score(completion: str, answer: str) -> float:
    """1.0 when the completion's final number equals the answer numerically, else 0.0."""
    number = final_number(completion)
    if number is None:
        return 0.0
    return float(float(number) == float(answer))


def prompt_rows(problems_: list[MathProblem]) -> list[dict[str, Any]]:
    """GRPO prompt rows: the question, and its answer for the `math` reward."""
    return [
        {"prompt": p.question, "answer": p.answer, "_line": f"{p.generator}#{p.template}"}
        for p in problems_
    ]
