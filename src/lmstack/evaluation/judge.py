"""LLM-as-judge through any OpenAI-compatible endpoint: grading, pairwise verdicts, calibration.

- Single-answer grading: the rubric (conf/prompt/judge_single.yaml) asks for "Rating: [[N]]",
  N in 1..10, reported as N/10.
- Pairwise: conf/prompt/judge_pairwise.yaml asks for [[A]], [[B]] or [[C]] (tie). Every pair is
  judged in both orders; a verdict that flips with the order counts as a tie (Zheng et al. 2023).
- Answers that cannot be parsed are counted and reported, never dropped: a pair with an
  unparseable verdict is "unparsed", which agrees with no label.
- Calibration on a labelled set reports agreement, Cohen's kappa, the position-bias rate (share
  of order-inconsistent pairs among those judged in both orders) and the length bias (how much
  more often the judge's verdicts, each order on its own, pick the longer answer than the
  labels do).

An endpoint that cannot be reached fails the whole evaluation with an LmstackError: no partial
set of verdicts is passed off as complete.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lmstack.data import arith
from lmstack.errors import ConfigError, DataError
from lmstack.evaluation import votes
from lmstack.judging import (
    UNPARSED,
    JudgeEndpoint,
    ask,
    parse_verdict,
    run_concurrently,
)
from lmstack.prompts import load_prompt, prompt_version, render_messages


def compare(
    endpoint: JudgeEndpoint,
    template: Any,
    pairs: list[dict[str, Any]],
    max_tokens: int,
    concurrency: int,
) -> list[dict[str, Any]]:
    """Each pair {question, x, y} judged as (A=x, B=y) and as (A=y, B=x).

    `winner` is "x", "y", "tie" or "unparsed"; `consistent` is whether both orders agreed
    (None when either verdict could not be parsed)."""

    version = prompt_version(template)
    calls = []
    for pair in pairs:
        for first, second in (("x", "y"), ("y", "x")):
            fields = {
                "question": pair["question"],
                "answer_a": pair[first],
                "answer_b": pair[second],
            }
            messages = render_messages(template, fields)
            calls.append(lambda m=messages: ask(endpoint, m, version, max_tokens))
    replies = run_concurrently(calls, concurrency)
    results = []
    for index, pair in enumerate(pairs):
        forward, backward = replies[2 * index], replies[2 * index + 1]
        first = _as_xy(parse_verdict(forward), ("x", "y"))
        second = _as_xy(parse_verdict(backward), ("y", "x"))
        results.append(
            {
                **pair,
                "verdicts": [first, second],
                "replies": [forward, backward],
                "winner": _combine(first, second),
                "consistent": None if UNPARSED in (first, second) else first == second,
                "prompt_version": version,
            }
        )
    return results


def _as_xy(verdict: str | None, order: tuple[str, str]) -> str:
    if verdict is None:
        return UNPARSED
    return {"A": order[0], "B": order[1], "C": "tie"}[verdict]


def _combine(first: str, second: str) -> str:
    if UNPARSED in (first, second):
        return UNPARSED
    return first if first == second else "tie"


# ---------------------------------------------------------------- calibration


def verbose(solution: str) -> str:
    """The same solution in more words: length without substance."""
    return f"Let me work this out step by step. {solution} I checked the sum twice."


def builtin_calibration_set(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Labelled pairs for the arithmetic task: the right solution against a wrong one
    (arith.wrong_solution), in random order; one side, drawn at random, made verbose, so
    length says nothing about the label and a judge that follows length shows it.
    A "wrong" solution that still states the right number (3 + 0 for "gives away 0") is
    drawn again: its label would be arguable."""
    rng = random.Random(f"judge-calibration-{seed}")
    rows = []
    for problem in arith.problems(count, seed + 7, held_out=True):
        right, wrong = problem.solution(), arith.wrong_solution(problem, rng)
        while arith.extract_answer(wrong) == problem.answer:
            wrong = arith.wrong_solution(problem, rng)
        if rng.random() < 0.5:
            right = verbose(right)
        else:
            wrong = verbose(wrong)
        right_first = rng.random() < 0.5
        rows.append(
            {
                "question": problem.question,
                "x": right if right_first else wrong,
                "y": wrong if right_first else right,
                "label": "x" if right_first else "y",
            }
        )
    return rows


def load_calibration_set(spec: str, count: int) -> list[dict[str, Any]]:
    """ "builtin", a jsonl of {question, answer_a, answer_b, label: A|B|tie}, or a labelling
    session (phase=label's run directory or votes.sqlite): people's votes are the labels, and
    every voted item is used."""

    if spec == "builtin":
        return builtin_calibration_set(count)
    if votes.is_session(spec):
        key = "eval.judge.calibration_set"
        return votes.calibration_rows(votes.open_session(spec, key))
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"eval.judge.calibration_set: no file '{spec}' (or use 'builtin')")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            label = {"A": "x", "B": "y", "tie": "tie"}[row["label"]]
            rows.append(
                {
                    "question": row["question"],
                    "x": row["answer_a"],
                    "y": row["answer_b"],
                    "label": label,
                }
            )
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(
                f"{path}:{number}: a calibration row needs question, answer_a, answer_b and "
                f"label (A, B or tie) ({type(error).__name__}: {error})"
            ) from None
    if not rows:
        raise DataError(f"{path}: no calibration rows")
    return rows[:count]


def cohen_kappa(labels: list[str], predictions: list[str]) -> float | None:
    """(p_o - p_e) / (1 - p_e) over the categories either side uses."""
    n = len(labels)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(labels, predictions)) / n
    categories = set(labels) | set(predictions)
    p_e = sum((labels.count(c) / n) * (predictions.count(c) / n) for c in categories)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def _longer(pair: dict[str, Any], side: str) -> bool | None:
    """Whether `side` holds the longer answer (None for equal lengths or no side)."""
    if side not in ("x", "y") or len(pair["x"]) == len(pair["y"]):
        return None
    other = "y" if side == "x" else "x"
    return len(pair[side]) > len(pair[other])


def _rate(flags: list[bool | None]) -> float | None:
    known = [f for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def calibration_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Agreement, Cohen's kappa, position-bias rate and length bias of judged labelled pairs."""
    labels = [r["label"] for r in results]
    winners = [r["winner"] for r in results]
    both_parsed = [r for r in results if r["consistent"] is not None]
    single_verdicts = [v for r in results for v in r["verdicts"]]
    # length bias from the single-order verdicts: an order-inconsistent judge's final
    # verdicts are ties, which would hide how its raw picks follow length
    judge_longer = _rate([_longer(r, v) for r in results for v in r["verdicts"]])
    label_longer = _rate([_longer(r, r["label"]) for r in results])
    # first position: verdict 0 asked x first, verdict 1 asked y first
    first_picks = [
        (r["verdicts"][0] == "x", r["verdicts"][1] == "y")
        for r in results
        if UNPARSED not in r["verdicts"]
    ]
    return {
        "n": len(results),
        "agreement": sum(w == label for w, label in zip(winners, labels)) / len(results),
        "kappa": cohen_kappa(labels, winners),
        "position_bias_rate": (
            sum(not r["consistent"] for r in both_parsed) / len(both_parsed)
            if both_parsed
            else None
        ),
        "first_position_rate": (
            sum(a + b for a, b in first_picks) / (2 * len(first_picks)) if first_picks else None
        ),
        "length_bias": (
            judge_longer - label_longer
            if judge_longer is not None and label_longer is not None
            else None
        ),
        "longer_picked_rate": judge_longer,
        "longer_labelled_rate": label_longer,
        "ties": winners.count("tie"),
        "parse_failures": single_verdicts.count(UNPARSED),
        "pairs_unparsed": winners.count(UNPARSED),
    }


def calibrate(endpoint: JudgeEndpoint, judge_cfg: Any) -> tuple[dict[str, Any], list[dict]]:
    """The judge on the labelled set: the four figures (plus counts) and every verdict."""
    template = load_prompt(judge_cfg.pairwise_prompt)
    pairs = load_calibration_set(judge_cfg.calibration_set, judge_cfg.calibration_size)
    results = compare(endpoint, template, pairs, judge_cfg.max_tokens, judge_cfg.concurrency)
    figures = calibration_figures(results)
    figures["prompt_version"] = prompt_version(template)
    return figures, results
