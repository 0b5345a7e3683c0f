"""Faithfulness of context-grounded answers, on a small context-QA set of the built-in task.

Each item gives a context passage (the problem's facts plus a distractor fact about someone
else) and a question about it. An answer is *supported* by its context when

- it states a final answer ("The answer is N"),
- every equation "a op b = c" in it uses numbers that appear in the context, computed right,
- and N is the result of one of those equations (or a number of the context itself).

So an answer that invents a number, miscalculates, or states a result it never derived is
unsupported; one that uses the distractor's numbers is supported but wrong, which is why
correctness is reported beside the support rate. With method=judge the LLM judge reads
context and answer instead (conf/prompt/judge_faithfulness.yaml).

Deferred imports, for start-up time: openai (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import random
import re
from typing import Any

from lmstack.data import arith
from lmstack.prompts import load_prompt, prompt_version, render_messages

EQUATION = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)")
NUMBER = re.compile(r"-?\d+")
SUPPORTED = re.compile(r"\[\[\s*(yes|no)\s*\]\]", re.IGNORECASE)


def context_qa_set(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Items {context, question, answer}: the problem's own sentence and a distractor."""
    rng = random.Random(f"faithfulness-{seed}")
    items = []
    for problem in arith.problems(count, seed + 11, held_out=True):
        other = rng.choice([n for n in arith.NAMES if n != problem.name])
        item = rng.choice([i for i in arith.ITEMS if i != problem.item])
        verb = "gets" if problem.op == "+" else "gives away"
        facts = [
            f"{problem.name} has {problem.a} {problem.item} and {verb} {problem.b}"
            + (" more." if problem.op == "+" else "."),
            f"{other} has {rng.randint(0, arith.MAX_OPERAND)} {item}.",
        ]
        rng.shuffle(facts)
        ask = "now" if problem.op == "+" else "left"
        question = f"How many {problem.item} does {problem.name} have {ask}?"
        items.append({"context": " ".join(facts), "question": question, "answer": problem.answer})
    return items


def prompt_fields(item: dict[str, Any]) -> dict[str, Any]:
    """What the prompt template's {question} becomes: the context, then the question."""
    return {"question": f"{item['context']} {item['question']}"}


def supported(answer: str, context: str) -> bool:
    """The deterministic support check (see the module docstring)."""
    stated = arith.extract_answer(answer)
    if stated is None:
        return False
    facts = {int(n) for n in NUMBER.findall(context)}
    results = set()
    for a, op, b, c in EQUATION.findall(answer):
        a, b, c = int(a), int(b), int(c)
        if a not in facts or b not in facts or c != (a + b if op == "+" else a - b):
            return False
        results.add(c)
    return stated in results or stated in facts


def grounded_fields(row: Any) -> dict[str, Any]:
    """A user's row with a context: its prompt, with the context put first unless the prompt
    already quotes it."""
    fields = row.fields()
    if row.context not in fields["question"]:
        if "messages" in fields:
            fields = {**fields, "messages": with_context(fields["messages"], row.context)}
        fields["question"] = f"{row.context}\n\n{fields['question']}"
    return fields


def with_context(messages: list[dict[str, str]], context: str) -> list[dict[str, str]]:
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = [dict(m) for m in messages]
    out[last_user]["content"] = f"{context}\n\n{out[last_user]['content']}"
    return out


WORD = re.compile(r"[A-Za-z]{3,}|-?\d+(?:\.\d+)?")
# share of an answer's content words and numbers that must occur in its context
GROUNDED_SHARE = 0.8


def grounded(answer: str, context: str) -> bool:
    """The check on a user's rows: at least GROUNDED_SHARE of the answer's words (3+ letters)
    and numbers occur in the context (case-insensitive); an empty answer is not grounded."""
    words = [w.lower() for w in WORD.findall(answer)]
    if not words:
        return False
    known = {w.lower() for w in WORD.findall(context)}
    return sum(w in known for w in words) / len(words) >= GROUNDED_SHARE


def report(
    items: list[dict[str, Any]],
    answers: list[str],
    correct: list[float | None],
    check: Any = supported,
) -> dict[str, Any]:
    """Support rate by `check(answer, context)`, and correctness where references exist."""
    support = [check(answer, item["context"]) for item, answer in zip(items, answers)]
    scored = [(s, c) for s, c in zip(support, correct) if c is not None]
    n = max(1, len(items))
    return {
        "support_rate": sum(support) / n if items else None,
        "correct_rate": sum(c for _, c in scored) / len(scored) if scored else None,
        "supported_but_wrong": (
            sum(s and not c for s, c in scored) / len(scored) if scored else None
        ),
        "n": len(items),
        "supported": support,
    }


def judge_report(
    items: list[dict[str, Any]],
    answers: list[str],
    correct: list[float | None],
    endpoint: Any,
    judge_cfg: Any,
) -> dict[str, Any]:
    """Support decided by the LLM judge ([[yes]] / [[no]]); unparseable replies counted."""
    from lmstack.judging import ask, run_concurrently

    rubric = load_prompt("judge_faithfulness")
    version = prompt_version(rubric)
    replies = run_concurrently(
        [
            lambda i=item, a=answer: ask(
                endpoint,
                render_messages(rubric, {**i, "response": a}),
                version,
                judge_cfg.max_tokens,
            )
            for item, answer in zip(items, answers)
        ],
        judge_cfg.concurrency,
    )
    verdicts = [SUPPORTED.search(reply) for reply in replies]
    parsed = [v.group(1).lower() == "yes" for v in verdicts if v]
    scored = [c for c in correct if c is not None]
    return {
        "support_rate": sum(parsed) / len(parsed) if parsed else None,
        "correct_rate": sum(scored) / len(scored) if scored else None,
        "n": len(items),
        "parse_failures": len(items) - len(parsed),
        "prompt_version": version,
        "supported": [None if v is None else v.group(1).lower() == "yes" for v in verdicts],
    }
