"""The `math` eval suite: grade-school math from reasoning-gym, on held-out templates.

`eval.math.count` problems are drawn from the generators of `eval.math.generators` (shared by
weight, seeded by `eval.math.seed`) on the templates held out from training (the split and
the scoring rule: lmstack.data.math_problems). The model under test answers each question
(the `prompt` group's template, `eval.max_new_tokens` tokens; conf/eval/math.yaml gives room
for a worked answer), and an answer is right when its final number equals the reference.

Figures: `math/accuracy` (the headline: the mean score over problems, and over samples when
eval.num_samples > 1) with a Wilson interval over problems at eval.confidence, and
`math/accuracy/<generator>` per generator. Per-problem samples go to math_samples.jsonl,
each with the extracted number and reasoning-gym's own score of it.
"""

from __future__ import annotations

from typing import Any

from lmstack.config.groups.eval_math import MathEvalConfig
from lmstack.data import math_problems
from lmstack.data.math_problems import MathProblem
from lmstack.evaluation.suites import Inputs, Session, Suite, register
from lmstack.tracking.identity import stable_hash
from lmstack.util.stats import wilson_interval


def held_out_problems(math_cfg: Any) -> list[MathProblem]:
    return math_problems.problems(
        list(math_cfg.generators), math_cfg.count, math_cfg.seed, held_out=True
    )


def check_math(eval_cfg: Any, inputs: Inputs) -> None:
    """The wheel is there and every generator accepts its options (draws the problems once)."""
    held_out_problems(eval_cfg.math)


def reasoning_gym_score(problem: MathProblem, completion: str) -> float | None:
    """reasoning-gym's own score of the number lmstack extracted (None: nothing to score)."""
    import reasoning_gym

    number = math_problems.final_number(completion)
    if number is None:
        return None
    dataset = reasoning_gym.create_dataset(problem.generator, size=1, seed=0)
    return float(dataset.score_answer(math_problems.canonical(number), problem.entry))


def sample_record(problem: MathProblem, sampled: list[str], scores: list[float]) -> dict:
    return {
        "prompt": problem.question,
        "reference": problem.answer,
        "completion": sampled[0],
        "extracted": math_problems.final_number(sampled[0]),
        "score": scores[0],
        "reasoning_gym_score": reasoning_gym_score(problem, sampled[0]),
        **problem.record(),
        "responses": sampled,
        "scores": scores,
    }


def per_generator(problems: list[MathProblem], means: list[float]) -> dict[str, float]:
    names = dict.fromkeys(p.generator for p in problems)
    return {
        f"math/accuracy/{name}": sum(m for p, m in zip(problems, means) if p.generator == name)
        / sum(p.generator == name for p in problems)
        for name in names
    }


def suite_math(session: Session) -> dict[str, Any]:
    problems = held_out_problems(session.eval.math)
    answers = session.target.answers(
        [{"question": p.question} for p in problems], session.eval.num_samples
    )
    scores = [[math_problems.score(a, p.answer) for a in sampled]
              for p, sampled in zip(problems, answers)]  # fmt: skip
    means = [sum(s) / len(s) for s in scores]
    session.samples("math", [sample_record(p, a, s) for p, a, s in zip(problems, answers, scores)])
    low, high = wilson_interval(sum(means), len(means), session.eval.confidence)
    return {
        "math/accuracy": sum(means) / len(means),
        "math/ci_low": low,
        "math/ci_high": high,
        "math/n": len(problems),
        "math/templates": len({(p.generator, p.template) for p in problems}),
        **per_generator(problems, means),
        "math/max_new_tokens": session.eval.max_new_tokens,
        # equal hashes: the same answers, word for word (greedy runs reproduce)
        "math/answers_hash": stable_hash(answers, 16),
    }


register(
    Suite(
        "math",
        suite_math,
        "math/accuracy",
        rank=25,
        needs=("answers",),
        check=check_math,
        schema=MathEvalConfig,
        options_key="math",
    )
)
