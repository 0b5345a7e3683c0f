"""lmstack's own eval suites, each registered as one `Suite` (see evaluation/suites.py).

Every suite that asks the model questions asks the session's rows: the user's `eval.data`
(their prompts, references and contexts) or, without it, the built-in task's held-out
problems. Each saves its per-row samples (prompt, completion, reference, score) and warns
when a figure cannot be computed (no rows, verdicts that cannot be parsed).

Deferred imports, for start-up time: openai and torch (and the lmstack modules that load
them) are imported inside the functions that need them; the CLI's input checks import this
module first.
"""

from __future__ import annotations

import dataclasses
from itertools import combinations
from typing import Any

from lmstack.config.groups import eval as eval_group
from lmstack.config.groups.eval import LmEvalConfig
from lmstack.data.eval_rows import EvalRow, require_references
from lmstack.data.scoring import needs_reference
from lmstack.errors import ConfigError, DataError
from lmstack.evaluation import arena, faithfulness, lm_eval_bridge, votes
from lmstack.evaluation.arena import expand_models
from lmstack.evaluation.formats import compile_regex, compliance, load_schema
from lmstack.evaluation.lm_eval_bridge import task_manager, user_task
from lmstack.evaluation.sampling import score_samples
from lmstack.evaluation.suites import Inputs, Session, Suite, builtin_rows, register
from lmstack.prompts import load_prompt
from lmstack.tracking.identity import stable_hash
from lmstack.tracking.run_dir import write_json

# the built-in answer sentence the format suite checks on the built-in task
ARITH_ANSWER_REGEX = r"The answer is -?\d+\.?\s*$"
# judge prompts written for the built-in task, and their task-neutral stand-ins on eval.data
GENERIC_RUBRICS = {"judge_single": "judge_task", "judge_pairwise": "judge_pairwise_task"}
OPEN_RUBRIC = "judge_open"  # single-answer grading of a row without a reference
# a judge whose verdicts are unparseable more often than this gets a warning
UNPARSED_WARNING_SHARE = 0.5


# ---------------------------------------------------------------- verifier


def check_verifier(eval_cfg: Any, inputs: Inputs) -> None:
    if not inputs.builtin and needs_reference(inputs.scorer_name):
        require_references(inputs.rows, inputs.origin, f"eval.scorer.name={inputs.scorer_name}")


def suite_verifier(session: Session) -> dict[str, Any]:
    """Each answer scored against its row's reference: greedy score, or mean and CI."""

    rows, answers = session.rows(), session.answers()
    scorer = session.inputs.scorer
    scores = [
        [scorer(a, row.reference, row.record()) for a in sampled]
        for row, sampled in zip(rows, answers)
    ]
    summary = score_samples(scores, session.eval.confidence)
    session.samples(
        "verifier",
        [
            {
                **row.record(),
                "completion": sampled[0],
                "score": s[0],
                "responses": sampled,
                "scores": s,
            }
            for row, sampled, s in zip(rows, answers, scores)
        ],
    )
    return {
        "verifier/score": summary["mean"] if rows else None,
        "verifier/std": summary["std"],
        "verifier/ci_low": summary["ci_low"],
        "verifier/ci_high": summary["ci_high"],
        "verifier/num_samples": summary["n"],
        "verifier/pass_at_k": summary["pass_at_k"],
        "verifier/per_sample": summary["per_sample"],
        "verifier/n": len(rows),
        "verifier/scorer": session.inputs.scorer_name,
        "verifier/temperature": session.eval.temperature,
        # equal hashes: the same answers, word for word (greedy runs reproduce)
        "verifier/answers_hash": stable_hash(answers, 16),
    }


# ---------------------------------------------------------------- format


def format_checks(eval_cfg: Any, inputs: Inputs) -> tuple[str, str]:
    """(regex, json schema) the format suite applies; `auto` resolves by the rows' source."""
    regex = eval_cfg.format.regex
    if regex == "auto":
        regex = ARITH_ANSWER_REGEX if inputs.builtin else ""
    return regex, eval_cfg.format.json_schema


def check_format(eval_cfg: Any, inputs: Inputs) -> None:
    regex, schema = format_checks(eval_cfg, inputs)
    if not regex and not schema:
        raise ConfigError(
            "eval.format: nothing to check on your rows; give eval.format.regex='...' "
            "and/or eval.format.json_schema='{...}' (inline JSON or a file)"
        )
    if regex:
        compile_regex(regex)
    if schema:
        load_schema(schema)


def suite_format(session: Session) -> dict[str, Any]:
    regex, schema = format_checks(session.eval, session.inputs)
    rows = session.rows()
    answers = [a for sampled in session.answers() for a in sampled]
    owners = [row for row, sampled in zip(rows, session.answers()) for _ in sampled]
    result, passed = compliance(answers, regex, schema)
    session.samples(
        "format",
        [
            {
                **row.record(),
                "completion": answer,
                **{k: v[i] for k, v in passed.items()},
                "score": float(all(v[i] for v in passed.values())),
            }
            for i, (row, answer) in enumerate(zip(owners, answers))
        ],
    )
    return {f"format/{key}": value for key, value in result.items()}


# ---------------------------------------------------------------- lm-eval


def harness_settings(eval_cfg: Any, inputs: Inputs) -> Any:
    """eval.lm_eval, or on the user's rows with the built-in tasks left as they are, a
    generative exact-match task written from those rows (lm_eval_bridge.user_task)."""

    lm_cfg = eval_cfg.lm_eval
    if inputs.builtin or list(lm_cfg.tasks) != LmEvalConfig().tasks:
        return lm_cfg
    require_references(inputs.rows, inputs.origin, "the lm-eval task made from your rows")
    folder, name = user_task(inputs.rows, inputs.cache_dir, eval_cfg.max_new_tokens)
    return dataclasses.replace(
        lm_cfg, tasks=[name], include_paths=[str(folder), *lm_cfg.include_paths]
    )


def check_lm_eval(eval_cfg: Any, inputs: Inputs) -> None:
    lm_cfg = harness_settings(eval_cfg, inputs)
    task_manager(list(lm_cfg.tasks), list(lm_cfg.include_paths), inputs.cache_dir)


def suite_lm_eval(session: Session) -> dict[str, Any]:
    lm_cfg = harness_settings(session.eval, session.inputs)
    if lm_cfg is not session.eval.lm_eval:
        print(f"lmstack: lm-eval runs task {lm_cfg.tasks[0]}, made from your rows", flush=True)
    if session.target.kind == "served":
        from lmstack.models.loading import resolve_base_path

        tokenizer_path = (
            ""
            if lm_cfg.apply_chat_template
            else resolve_base_path(session.config.model, session.cache_dir)
        )
        results = lm_eval_bridge.evaluate_served(
            session.endpoint,
            tokenizer_path,
            lm_cfg,
            session.cache_dir,
            session.eval.seed,
            session.eval.concurrency,
        )
    else:
        results = lm_eval_bridge.evaluate_in_process(
            session.target.local, lm_cfg, session.cache_dir, session.eval.seed
        )
    samples = lm_eval_bridge.samples_table(results, limit=10_000)
    session.samples("lm_eval", samples)
    versions = {task: str(v) for task, v in (results.get("versions") or {}).items()}
    flat = lm_eval_bridge.flatten(results)
    first_task = f"lm_eval/{lm_cfg.tasks[0]}/"
    primary = [
        k for k in flat if k.startswith(first_task) and not k.endswith(("stderr", "sample_len"))
    ]
    return {
        **flat,
        "lm_eval/score": flat[primary[0]] if primary else None,
        "lm_eval/score_metric": primary[0] if primary else None,
        "lm_eval/task_versions": versions,
    }


# ---------------------------------------------------------------- judge


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


# ---------------------------------------------------------------- calibration


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


# ---------------------------------------------------------------- faithfulness


def check_faithfulness(eval_cfg: Any, inputs: Inputs) -> None:
    if not inputs.builtin and not any(row.context for row in inputs.rows):
        raise DataError(
            f"{inputs.origin}: the faithfulness suite needs rows with a 'context' (the text "
            "an answer must be grounded in); none of the rows has one"
        )
    if eval_cfg.faithfulness.method == "judge":
        load_prompt("judge_faithfulness")


def suite_faithfulness(session: Session) -> dict[str, Any]:
    faith_cfg, inputs = session.eval.faithfulness, session.inputs
    if inputs.builtin:
        items = faithfulness.context_qa_set(faith_cfg.num_items)
        fields = [faithfulness.prompt_fields(item) for item in items]
        references = [item["answer"] for item in items]
    else:
        rows = [row for row in inputs.rows if row.context][: faith_cfg.num_items]
        items = [
            {"context": row.context, "question": row.text(), "answer": row.reference}
            for row in rows
        ]
        fields = [faithfulness.grounded_fields(row) for row in rows]
        references = [row.reference for row in rows]
    answers = [sampled[0] for sampled in session.target.answers(fields)]
    correct = [
        inputs.scorer(a, ref, {}) if ref is not None else None
        for a, ref in zip(answers, references)
    ]
    if faith_cfg.method == "judge":
        result = faithfulness.judge_report(
            items, answers, correct, session.judge(), session.eval.judge
        )
        warn_unparsed(session, "faithfulness judge", result["parse_failures"], len(items))
    else:
        check = faithfulness.supported if inputs.builtin else faithfulness.grounded
        result = faithfulness.report(items, answers, correct, check)
    session.samples(
        "faithfulness",
        [
            {
                "prompt": item["question"],
                "context": item["context"],
                "reference": item["answer"],
                "completion": answer,
                "score": supported,
            }
            for item, answer, supported in zip(items, answers, result.pop("supported"))
        ],
    )
    return {f"faithfulness/{key}": value for key, value in result.items()} | {
        "faithfulness/method": faith_cfg.method
    }


# ---------------------------------------------------------------- arena


def check_arena(eval_cfg: Any, inputs: Inputs) -> None:
    arena_cfg = eval_cfg.arena
    if arena_cfg.judge != "none":
        expand_models(list(arena_cfg.models))
    if arena_cfg.human_votes:
        labelled = votes.open_session(arena_cfg.human_votes, "eval.arena.human_votes")
        votes.human_battles(labelled, "eval.arena.human_votes")
    verified = arena_cfg.judge == "verifier" and not inputs.builtin
    if verified and needs_reference(inputs.scorer_name):
        why = f"the arena's verifier (eval.scorer.name={inputs.scorer_name})"
        require_references(inputs.rows, inputs.origin, why)
    if arena_cfg.judge == "judge":
        load_prompt(rubric_name(inputs.builtin, eval_cfg.judge.pairwise_prompt))


def arena_rows(session: Session) -> list[EvalRow]:
    count = session.eval.arena.num_prompts
    if session.inputs.builtin:
        return builtin_rows(count, seed=1)
    return session.rows()[:count]


def suite_arena(session: Session) -> dict[str, Any]:
    """Ratings from the machine's battles (verifier or LLM judge) and/or from people's votes
    (eval.arena.human_votes), each fitted and reported on its own."""

    arena_cfg = session.eval.arena
    boards: dict[str, dict[str, Any]] = {}
    if arena_cfg.judge != "none":
        boards[arena_cfg.judge] = machine_board(session)
    if arena_cfg.human_votes:
        boards["human"] = human_board(session)
    run_dir = session.records.run_dir
    first = next(iter(boards.values()))
    write_json(run_dir / "arena.json", {"leaderboard": first["leaderboard"], "boards": boards})
    text = arena.boards_markdown({rater: b["leaderboard"] for rater, b in boards.items()})
    (run_dir / "arena.md").write_text(text)
    plot = arena.plot_boards(
        {rater: b["leaderboard"] for rater, b in boards.items()}, run_dir / "arena.png"
    )
    session.records.images["arena/plot"] = plot
    print(text, flush=True)
    metrics: dict[str, Any] = {"arena/judge": arena_cfg.judge}
    for rater, board in boards.items():
        # the machine's figures keep their names (arena/<model>/rating); people's: arena/human/
        prefix = "arena/human/" if rater == "human" else "arena/"
        session.records.tables[f"{prefix}leaderboard"] = board["leaderboard"]
        metrics |= {f"{prefix}{key}": value for key, value in board.items() if key != "battles"}
        metrics[f"{prefix}battles"] = len(board["battles"])
        for row in board["leaderboard"]:
            for key in ("rating", "ci_low", "ci_high"):
                metrics[f"{prefix}{row['model']}/{key}"] = row[key]
    return metrics


def machine_board(session: Session) -> dict[str, Any]:
    """Each arena model (in process, greedy) answers the same prompts (the user's rows, or the
    built-in task's); the scorer or the judge decides every battle."""

    arena_cfg = session.eval.arena
    models = arena.expand_models(list(arena_cfg.models))
    rows = arena_rows(session)
    answers: dict[str, list[str]] = {}
    for name, path in models:
        print(f"lmstack: arena model {name}", flush=True)
        answers[name] = answers_of(session, path, rows)
    names = [name for name, _ in models]
    unparsed = 0
    scorer = session.inputs.scorer
    if arena_cfg.judge == "verifier":
        correct = {
            n: [scorer(a, row.reference, row.record()) for a, row in zip(answers[n], rows)]
            for n in names
        }
        battles = arena.verifier_battles(names, correct)
    else:
        battles, unparsed = judge_battles(session, names, rows, answers)
    session.samples(
        "arena",
        [
            {**row.record(), **{f"completion/{n}": answers[n][i] for n in names}}
            for i, row in enumerate(rows)
        ],
        show=1,
    )
    anchor = arena_cfg.anchor or names[0]
    board = arena.rate(battles, names, anchor, arena_cfg.bootstrap_rounds, session.eval.seed)
    paths = dict(models)
    for row in board:
        row["path"] = paths[row["model"]] or "base"
    return {"leaderboard": board, "anchor": anchor, "battles": battles, "unparsed": unparsed}


def human_board(session: Session) -> dict[str, Any]:
    """One battle per vote of a labelling session (both bad = a tie), fitted the same way."""
    from lmstack.evaluation.agreement import labeller_agreement

    arena_cfg = session.eval.arena
    labelled = votes.open_session(arena_cfg.human_votes, "eval.arena.human_votes")
    battles = votes.human_battles(labelled, "eval.arena.human_votes")
    names = sorted({name for a, b, _ in battles for name in (a, b)})
    anchor = arena_cfg.anchor if arena_cfg.anchor in names else names[0]
    board = arena.rate(battles, names, anchor, arena_cfg.bootstrap_rounds, session.eval.seed)
    people = labeller_agreement(labelled.votes)
    return {
        "leaderboard": board,
        "anchor": anchor,
        "battles": battles,
        "labellers": people["labellers"],
        "both_bad": sum(vote["winner"] == "both_bad" for vote in labelled.votes),
        "alpha": people["alpha"],
        "source": str(labelled.source),
    }


def judge_battles(session: Session, names, rows: list[EvalRow], answers):
    from lmstack.evaluation.judge import compare

    judge_cfg = session.eval.judge
    pairs = [
        {"question": row.text(), "x": answers[a][i], "y": answers[b][i], "a": a, "b": b}
        for a, b in combinations(names, 2)
        for i, row in enumerate(rows)
    ]
    template = load_prompt(rubric_name(session.inputs.builtin, judge_cfg.pairwise_prompt))
    verdicts = compare(
        session.judge(), template, pairs, judge_cfg.max_tokens, judge_cfg.concurrency
    )
    session.records.jsonl("arena_verdicts", verdicts)
    battles, unparsed = arena.judged_battles(verdicts)
    warn_unparsed(session, "arena judge", unparsed, len(verdicts))
    return battles, unparsed


# ---------------------------------------------------------------- the registry


def register_builtin_suites() -> None:
    def needs_of_arena(cfg: Any) -> tuple[str, ...]:
        return ("judge",) if cfg.arena.judge == "judge" else ()

    def needs_of_faithfulness(cfg: Any) -> tuple[str, ...]:
        return ("answers", "judge") if cfg.faithfulness.method == "judge" else ("answers",)

    for suite in (
        Suite(
            "verifier",
            suite_verifier,
            "verifier/score",
            rank=10,
            needs=("answers",),
            check=check_verifier,
            schema=eval_group.ScorerConfig,
            options_key="scorer",
        ),
        Suite(
            "format",
            suite_format,
            "format/rate",
            rank=60,
            needs=("answers",),
            check=check_format,
            schema=eval_group.FormatConfig,
            options_key="format",
        ),
        Suite(
            "lm_eval",
            suite_lm_eval,
            "lm_eval/score",
            rank=20,
            needs=("answers",),
            check=check_lm_eval,
            schema=eval_group.LmEvalConfig,
            options_key="lm_eval",
        ),
        Suite(
            "judge",
            suite_judge,
            "judge/score",
            rank=30,
            needs=("answers", "judge"),
            check=check_judge,
            schema=eval_group.JudgeConfig,
            options_key="judge",
        ),
        Suite(
            "calibration",
            suite_calibration,
            "calibration/agreement",
            rank=50,
            needs=("judge",),
            check=check_calibration,
            schema=eval_group.JudgeConfig,
            options_key="judge",
        ),
        Suite(
            "arena",
            suite_arena,
            None,
            needs=needs_of_arena,
            check=check_arena,
            schema=eval_group.ArenaConfig,
            options_key="arena",
        ),
        Suite(
            "faithfulness",
            suite_faithfulness,
            "faithfulness/support_rate",
            rank=40,
            needs=needs_of_faithfulness,
            check=check_faithfulness,
            schema=eval_group.FaithfulnessConfig,
            options_key="faithfulness",
        ),
    ):
        register(suite)


register_builtin_suites()
import lmstack.evaluation.humaneval  # noqa: E402  (registers eval=humaneval)
import lmstack.evaluation.ifeval  # noqa: E402  (registers eval=ifeval)
import lmstack.evaluation.math_suite  # noqa: E402  (registers eval=math)
import lmstack.evaluation.mmlu  # noqa: E402, F401  (registers eval=mmlu)
