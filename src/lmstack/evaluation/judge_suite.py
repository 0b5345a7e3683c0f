"""eval=judge and eval=calibration: an LLM judge grades the answers (against the reference, or
pairwise against another model's), and the judge's own agreement with labels (people's votes or
the built-in set).

One module for both: calibration measures the very judge and rubrics the judge suite uses.

Deferred imports, for start-up time: openai and torch (and the lmstack modules that load them)
are imported inside the functions that need them; the CLI's input checks import this module
first.
"""

from __future__ import annotations

from typing import Any

from lmstack.config.groups import eval as eval_group
from lmstack.data.eval_rows import EvalRow
from lmstack.evaluation import arena, votes
from lmstack.evaluation.arena import expand_models
from lmstack.evaluation.suites import Inputs, Session, Suite, register
from lmstack.prompts import load_prompt

# judge prompts written for the built-in task, and their task-neutral stand-ins on eval.data
GENERIC_RUBRICS = {"judge_single": "judge_task", "judge_pairwise": "judge_pairwise_task"}
OPEN_RUBRIC = "judge_open"  # single-answer grading of a row without a reference
# a judge whose verdicts are unparseable more often than this gets a warning
UNPARSED_WARNING_SHARE = 0.5


def rubric_name(session_or_builtin: bool, configured: str) -> str:
    """The configured rubric, or on the user's rows the task-neutral stand-in of a rubric
    written for the built-in arithmetic task."""
    return configured if session_or_builtin else GENERIC_RUBRICS.get(configured, configured)


def check_judge(eval_cfg: Any, inputs: Inputs) -> None:
    judge_cfg = eval_cfg.judge
    load_prompt(rubric_name(inputs.builtin, judge_cfg.single_prompt))
    load_prompt(rubric_name(inputs.builtin, judge_cfg.pairwise_prompt))
    load_prompt(OPEN_RUBRIC)
    if judge_cfg.compare_to and judge_cfg.compare_to != "base":
        expand_models(["base", judge_cfg.compare_to])


def warn_unparsed(session: Session, what: str, unparsed: int, total: int) -> None:
    if total and unparsed / total > UNPARSED_WARNING_SHARE:
        session.warn(
            f"{what}: {unparsed} of {total} judge verdicts could not be parsed; the judge "
            "does not follow its rubric's format (try a stronger judge, eval.judge.base_url)"
        )
    if total == 0:
        session.warn(f"{what}: no rows to judge")


def suite_judge(session: Session) -> dict[str, Any]:
    """Single-answer grades of the (first-sample) answers, reference-guided where a row has
    a reference; with eval.judge.compare_to, pairwise verdicts against that model too."""
    from lmstack.judging import grade

    judge_cfg, inputs = session.eval.judge, session.inputs
    rows, answers = session.rows(), [sampled[0] for sampled in session.answers()]
    items = [judge_item(row, answer, inputs.builtin) for row, answer in zip(rows, answers)]
    with_reference = rubric_name(inputs.builtin, judge_cfg.single_prompt)
    ratings: list[float | None] = [None] * len(items)
    replies: list[str] = [""] * len(items)
    versions = set()
    for name in (with_reference, OPEN_RUBRIC):
        graded_here = name != OPEN_RUBRIC  # rows with a reference, or those without
        wanted = [i for i, item in enumerate(items) if bool(item["reference"]) == graded_here]
        if not wanted:
            continue
        result = grade(
            session.judge(),
            load_prompt(name),
            [items[i] for i in wanted],
            judge_cfg.max_tokens,
            judge_cfg.concurrency,
        )
        versions.add(result["prompt_version"])
        for i, rating, reply in zip(wanted, result["ratings"], result["replies"]):
            ratings[i], replies[i] = rating, reply
    parsed = [r for r in ratings if r is not None]
    warn_unparsed(session, "eval judge", len(items) - len(parsed), len(items))
    correct = [
        inputs.scorer(a, row.reference, row.record()) if row.reference is not None else None
        for row, a in zip(rows, answers)
    ]
    agree = [(r >= 0.5, c >= 0.5) for r, c in zip(ratings, correct) if None not in (r, c)]
    session.samples(
        "judge",
        [
            {**row.record(), "completion": item["answer"], "score": rating, "reply": reply}
            for row, item, rating, reply in zip(rows, items, ratings, replies)
        ],
    )
    metrics = {
        "judge/score": sum(parsed) / len(parsed) if parsed else None,
        "judge/n": len(items),
        "judge/parse_failures": len(items) - len(parsed),
        "judge/verifier_agreement": sum(a == b for a, b in agree) / len(agree) if agree else None,
        "judge/prompt_version": ",".join(sorted(versions)),
        "judge/model": session.judge().model,
    }
    if judge_cfg.compare_to:
        metrics |= pairwise_against(session, rows, answers)
    return metrics


def judge_item(row: EvalRow, answer: str, builtin: bool) -> dict[str, Any]:
    reference = row.metadata.get("solution") if builtin else row.reference_text()
    return {"question": row.text(), "answer": answer, "reference": reference or ""}


def pairwise_against(session: Session, rows: list[EvalRow], answers: list[str]) -> dict[str, Any]:
    """Win rate of the model under test against eval.judge.compare_to on the same prompts
    (both orders per pair; ties count half; unparsed pairs left out and counted)."""
    from lmstack.evaluation.judge import compare

    judge_cfg = session.eval.judge
    other = judge_cfg.compare_to
    theirs = answers_of(session, None if other == "base" else other, rows)
    pairs = [
        {"question": row.text(), "x": mine, "y": their}
        for row, mine, their in zip(rows, answers, theirs)
    ]
    template = load_prompt(rubric_name(session.inputs.builtin, judge_cfg.pairwise_prompt))
    verdicts = compare(
        session.judge(), template, pairs, judge_cfg.max_tokens, judge_cfg.concurrency
    )
    points = {"x": 1.0, "y": 0.0, "tie": 0.5}
    decided = [points[v["winner"]] for v in verdicts if v["winner"] in points]
    warn_unparsed(session, "eval judge (pairwise)", len(verdicts) - len(decided), len(verdicts))
    session.samples(
        "judge_pairwise",
        [
            {
                **row.record(),
                "completion": v["x"],
                "other": v["y"],
                "winner": v["winner"],
                "replies": v["replies"],
            }
            for row, v in zip(rows, verdicts)
        ],
    )
    return {
        "judge/win_rate": sum(decided) / len(decided) if decided else None,
        "judge/pairwise_unparsed": len(verdicts) - len(decided),
        "judge/compared_to": other,
    }


def answers_of(session: Session, path: str | None, rows: list[EvalRow]) -> list[str]:
    """Greedy answers of another model (a run, an HF folder, or the base: None), in process."""
    from lmstack.evaluation.target import InProcessTarget, Sampling, load_local_model

    config = session.config
    local = load_local_model(
        arena.model_config_for(config.model, path), config.quantization, session.cache_dir
    )
    sampling = Sampling(session.eval.max_new_tokens, batch_size=session.eval.batch_size)
    target = InProcessTarget(local, session.inputs.prompt, session.eval.chat, sampling)
    answers = [sampled[0] for sampled in target.answers([row.fields() for row in rows])]
    del local, target
    return answers


def check_calibration(eval_cfg: Any, inputs: Inputs) -> None:
    from lmstack.evaluation.judge import load_calibration_set

    load_calibration_set(eval_cfg.judge.calibration_set, eval_cfg.judge.calibration_size)
    load_prompt(eval_cfg.judge.pairwise_prompt)


def suite_calibration(session: Session) -> dict[str, Any]:
    from lmstack.evaluation.judge import calibrate

    figures, results = calibrate(session.judge(), session.eval.judge)
    figures |= people_figures(session.eval.judge.calibration_set)
    session.records.jsonl("calibration_verdicts", results)
    session.samples(
        "calibration",
        [
            {
                "prompt": r["question"],
                "x": r["x"],
                "y": r["y"],
                "reference": r["label"],
                "winner": r["winner"],
                "score": float(r["winner"] == r["label"]),
            }
            for r in results
        ],
        show=0,
    )
    if figures["parse_failures"]:
        print(
            f"lmstack: the judge gave {figures['parse_failures']} verdicts that could not be "
            f"parsed ({figures['pairs_unparsed']} of {figures['n']} pairs unscored)",
            flush=True,
        )
    warn_unparsed(session, "judge calibration", figures["parse_failures"], 2 * figures["n"])
    return {f"calibration/{key}": value for key, value in figures.items()} | {
        "calibration/judge_model": session.judge().model
    }


def people_figures(calibration_set: str) -> dict[str, Any]:
    """With people's votes as the labels: how far the people agree among themselves
    (human/alpha, human/kappa for two labellers) and their own first-position rate."""
    from lmstack.evaluation.agreement import labeller_agreement

    if not votes.is_session(calibration_set):
        return {"labels": calibration_set}
    labelled = votes.open_session(calibration_set, "eval.judge.calibration_set")
    people = labeller_agreement(labelled.votes)
    return {"labels": "human"} | {f"human/{key}": value for key, value in people.items()}


register(
    Suite(
        "judge",
        suite_judge,
        "judge/score",
        rank=30,
        needs=("answers", "judge"),
        check=check_judge,
        schema=eval_group.JudgeConfig,
        options_key="judge",
    )
)


register(
    Suite(
        "calibration",
        suite_calibration,
        "calibration/agreement",
        rank=50,
        needs=("judge",),
        check=check_calibration,
        schema=eval_group.JudgeConfig,
        options_key="judge",
    )
)
