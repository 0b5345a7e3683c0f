"""The built-in task: arithmetic word problems with a verifiable answer.

One seeded generator yields everything the stack needs from a task: pretraining
text, SFT prompt/completion pairs, preference pairs (a correct and a wrong
completion) and a verifier. Train and held-out problems never share an
(a, op, b) triple, so the held-out score measures generalisation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ("Ana", "Ben", "Chen", "Dana", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles")
MAX_OPERAND = 9
ANSWER_PATTERN = re.compile(r"answer is (-?\d+)")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str
    name: str
    item: str

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        if self.op == "+":
            return (
                f"{self.name} has {self.a} {self.item} and gets {self.b} more. "
                f"How many {self.item} does {self.name} have now?"
            )
        return (
            f"{self.name} has {self.a} {self.item} and gives away {self.b}. "
            f"How many {self.item} does {self.name} have left?"
        )

    def solution(self, answer: int | None = None) -> str:
        """The assistant's completion: the equation, then the answer sentence."""
        value = self.answer if answer is None else answer
        return f"{self.a} {self.op} {self.b} = {value}. The answer is {value}."

    def wrong_answer(self, rng: random.Random) -> int:
        offset = rng.choice([-3, -2, -1, 1, 2, 3])
        return self.answer + offset


def _is_held_out(a: int, op: str, b: int) -> bool:
    """A fixed fifth of all (a, op, b) triples is reserved for evaluation."""
    return (a * 31 + b * 17 + (op == "-") * 7) % 5 == 0


def _random_problem(rng: random.Random) -> Problem:
    op = rng.choice("+-")
    a = rng.randint(0, MAX_OPERAND)
    b = rng.randint(0, MAX_OPERAND)
    if op == "-" and b > a:
        a, b = b, a
    return Problem(a, b, op, rng.choice(NAMES), rng.choice(ITEMS))


def problems(count: int, seed: int, held_out: bool) -> list[Problem]:
    """`count` problems from the train or the held-out part of the task."""
    rng = random.Random(f"arith-{seed}-{held_out}")
    found: list[Problem] = []
    while len(found) < count:
        problem = _random_problem(rng)
        if _is_held_out(problem.a, problem.op, problem.b) == held_out:
            found.append(problem)
    return found


def pretraining_text(problem: Problem) -> str:
    """Plain-text form the base model learns from: the solution as the assistant would
    give it, but no chat template, which SFT teaches. The answer sentence is in it so that a
    briefly fine-tuned model states answers confidently enough to sample from (GRPO, PPO)."""
    return f"Question: {problem.question} Answer: {problem.solution()}"


def pretraining_corpus(count: int, seed: int) -> list[str]:
    """Arithmetic facts from both parts of the task: the base model knows the sums;
    held-out evaluation then measures whether fine-tuning taught the answer format
    on problems it never saw in fine-tuning."""
    train = problems(count - count // 5, seed, held_out=False)
    held_out = problems(count // 5, seed + 1, held_out=True)
    texts = [pretraining_text(p) for p in train + held_out]
    return texts + equation_drills(count, seed)


def equation_drills(count: int, seed: int, per_line: int = 4) -> list[str]:
    """Lines of bare equations: many arithmetic facts per token, so a small model
    learns the sums in a short pretraining run."""
    rng = random.Random(f"drills-{seed}")
    lines = []
    for _ in range(count):
        facts = [_random_problem(rng) for _ in range(per_line)]
        lines.append(" ".join(f"{p.a} {p.op} {p.b} = {p.answer}." for p in facts))
    return lines


def sft_row(problem: Problem) -> dict[str, str]:
    return {
        "prompt": problem.question,
        "completion": problem.solution(),
        "answer": str(problem.answer),
    }


ERROR_KINDS = ("operation", "operand", "answer", "sentence")


def wrong_solution(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong completion, with one of the mistakes a solver makes, drawn by `rng`:

    - operation: the other operation (a + b for a "gives away" problem), worked out right;
    - operand: one operand copied wrongly from the question, worked out right;
    - answer: the right equation with its result off by 1 to 3, stated consistently;
    - sentence: the right equation, but an answer sentence that disagrees with it.

    Only the "answer" kind needs the sums themselves to tell apart; the others are
    mistakes of reading and copying, which carry over to problems never trained on.
    """
    a, b, op = problem.a, problem.b, problem.op
    kind = rng.choice(ERROR_KINDS)
    if kind == "operation":
        other = "-" if op == "+" else "+"
        value = a + b if other == "+" else a - b
        return f"{a} {other} {b} = {value}. The answer is {value}."
    if kind == "operand":
        first = rng.random() < 0.5
        copied = a if first else b
        wrong = rng.choice([v for v in range(MAX_OPERAND + 1) if v != copied])
        a, b = (wrong, b) if first else (a, wrong)
        value = a + b if op == "+" else a - b
        return f"{a} {op} {b} = {value}. The answer is {value}."
    if kind == "answer":
        return problem.solution(problem.wrong_answer(rng))
    stated = problem.wrong_answer(rng)
    return f"{a} {op} {b} = {problem.answer}. The answer is {stated}."


def preference_row(problem: Problem, rng: random.Random) -> dict[str, str]:
    return {
        "prompt": problem.question,
        "chosen": problem.solution(),
        "rejected": wrong_solution(problem, rng),
        "answer": str(problem.answer),
    }


def extract_answer(completion: str) -> int | None:
    match = ANSWER_PATTERN.search(completion)
    return int(match.group(1)) if match else None


def verify(completion: str, answer: str | int) -> float:
    """1.0 when the completion states the right answer in the task's format, else 0.0."""
    predicted = extract_answer(completion)
    return float(predicted is not None and predicted == int(answer))


def corpus_for_tokenizer(seed: int = 0, count: int = 4000) -> list[str]:
    """Text covering every word and template the task uses, for training the BPE."""
    texts = pretraining_corpus(count, seed)
    return texts + [sft_row(p)["completion"] for p in problems(count // 4, seed, held_out=False)]
