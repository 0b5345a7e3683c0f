"""phase=eval: check inputs -> model under test (in process or served) -> suites -> records.

The suites (`eval=[verifier,lm_eval,judge,...]`) run on one model under test: the `model`
group's model in this process (a run's adapter on its base, any quantization) or, with
eval.target=served, that model behind the `serving` group's engine, exactly as users get it.
A judge without its own URL is the served model. Bad input (an unknown harness task, a bad
regex, a missing calibration file, arena models that are not runs) fails before any model is
loaded; an unreachable judge fails the run without writing partial results as finished.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from lmstack.config.schema import EVAL_SUITES
from lmstack.data import arith
from lmstack.phases.context import RunContext
from lmstack.tracking.run_dir import finished_metrics, previous_results, set_status, write_json

log = logging.getLogger(__name__)

# the held-out problems every suite that asks the model task questions uses
PROBLEM_SEED = 0
SUITES_NEEDING_ANSWERS = ("verifier", "format", "lm_eval", "judge", "faithfulness")
SUITES_NEEDING_JUDGE = ("judge", "calibration")


def run(ctx: RunContext) -> dict[str, Any]:
    config, run_dir = ctx.config, ctx.run_dir
    done = previous_results(run_dir, config.run.rerun, "evaluation", print_summary)
    if done is not None:
        return done

    eval_cfg = config.eval
    suites = [name for name in EVAL_SUITES if eval_cfg.suites.get(name)]
    check_inputs(ctx, suites)  # bad input fails here, before any model is loaded

    if config.trainer.num_threads > 0:
        import torch

        torch.set_num_threads(config.trainer.num_threads)
    from lmstack.prompts import prompt_version

    metrics: dict[str, Any] = {
        "run_id": ctx.run_id,
        "eval/suites": suites,
        "eval/target": eval_cfg.target,
        "eval/model": config.model.init_from or config.model.name_or_path or "base",
        "prompt/name": config.prompt.name,
        "prompt/version": prompt_version(config.prompt),
    }
    records = Records(run_dir)
    with model_under_test(ctx, suites) as (target, endpoint):
        if target is not None:
            metrics["eval/described"] = target.described
        session = Session(ctx, target, endpoint, records)
        for suite in suites:
            print(f"lmstack: eval suite {suite}", flush=True)
            metrics |= SUITES[suite](session)
    metrics["eval/score"] = headline(metrics)
    metrics |= served_costs(config, run_dir / "serving")  # after the engine stopped: traces written

    from lmstack.tracking.loggers import log_results

    log_results(ctx, metrics, tables=records.tables, images=records.images)
    write_json(run_dir / "metrics.json", metrics)
    set_status(run_dir, "finished")
    write_comparison(run_dir.parent)
    print_summary(metrics)
    return metrics


# ---------------------------------------------------------------- inputs and the model


def check_inputs(ctx: RunContext, suites: list[str]) -> None:
    """Everything that can be checked without a model: fails in about a second."""
    eval_cfg = ctx.config.eval
    if "lm_eval" in suites:
        from lmstack.evaluation.lm_eval_bridge import task_manager

        task_manager(
            list(eval_cfg.lm_eval.tasks), list(eval_cfg.lm_eval.include_paths), ctx.cache_dir
        )
    if "format" in suites:
        from lmstack.evaluation.formats import compile_regex, load_schema

        if eval_cfg.format.regex:
            compile_regex(eval_cfg.format.regex)
        if eval_cfg.format.json_schema:
            load_schema(eval_cfg.format.json_schema)
    if "calibration" in suites:
        from lmstack.evaluation.judge import load_calibration_set

        load_calibration_set(eval_cfg.judge.calibration_set, eval_cfg.judge.calibration_size)
    if "arena" in suites and eval_cfg.arena.judge != "none":
        from lmstack.evaluation.arena import expand_models

        expand_models(list(eval_cfg.arena.models))
    if "arena" in suites and eval_cfg.arena.human_votes:
        from lmstack.evaluation import votes

        labelled = votes.open_session(eval_cfg.arena.human_votes, "eval.arena.human_votes")
        votes.human_battles(labelled, "eval.arena.human_votes")
    for name in ("judge_single", "judge_pairwise") if needs_judge(eval_cfg, suites) else ():
        from lmstack.prompts import load_prompt

        load_prompt(getattr(eval_cfg.judge, name.replace("judge_", "") + "_prompt"))


def needs_judge(eval_cfg: Any, suites: list[str]) -> bool:
    return (
        any(s in suites for s in SUITES_NEEDING_JUDGE)
        or ("faithfulness" in suites and eval_cfg.faithfulness.method == "judge")
        or ("arena" in suites and eval_cfg.arena.judge == "judge")
    )


@contextlib.contextmanager
def model_under_test(ctx: RunContext, suites: list[str]):
    """(target, endpoint): the target answers questions; the endpoint is the served model
    (for eval.target=served, or as the judge when eval.judge.base_url is empty)."""
    from lmstack.evaluation.target import InProcessTarget, Sampling, ServedTarget, load_local_model

    config, eval_cfg = ctx.config, ctx.config.eval
    sampling = Sampling(
        eval_cfg.max_new_tokens,
        eval_cfg.temperature,
        eval_cfg.top_p,
        eval_cfg.seed,
        eval_cfg.batch_size,
    )
    wants_answers = any(s in suites for s in SUITES_NEEDING_ANSWERS)
    served = eval_cfg.target == "served" and wants_answers
    serve_judge = needs_judge(eval_cfg, suites) and not eval_cfg.judge.base_url
    with contextlib.ExitStack() as stack:
        endpoint = None
        if served or serve_judge:
            from lmstack.serving.engines import serve

            print("lmstack: starting the served model", flush=True)
            endpoint = stack.enter_context(serve(config, ctx.cache_dir, ctx.run_dir / "serving"))
        target = None
        if served:
            target = ServedTarget(
                endpoint.base_url,
                endpoint.model,
                config.prompt,
                eval_cfg.chat,
                sampling,
                api_key=endpoint.api_key,
                described=dict(endpoint.served),
                concurrency=eval_cfg.concurrency,
            )
        elif wants_answers:
            local = load_local_model(config.model, config.quantization, ctx.cache_dir)
            target = InProcessTarget(local, config.prompt, eval_cfg.chat, sampling)
        yield target, endpoint


def served_costs(config: Any, serving_dir: Path) -> dict[str, float]:
    """What the served model's answers cost (cost/*), priced from its gateway's traces; {} when
    nothing was served or traced."""
    from lmstack.errors import DataError
    from lmstack.serving.costs import cost_metrics
    from lmstack.serving.traces import TRACE_DB_NAME

    db = serving_dir / TRACE_DB_NAME
    if not db.is_file():
        return {}
    try:
        return cost_metrics(db, config.cost)
    except DataError as error:
        print(f"lmstack: warning: no cost figures ({error})", flush=True)
        return {}


class Records:
    """Files beside metrics.json, and the tables and images that go to W&B."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.images: dict[str, Path] = {}

    def jsonl(self, name: str, rows: list[dict[str, Any]]) -> Path:
        import json

        path = self.run_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
        return path


class Session:
    """What the suites share: the config, the target, the endpoint, answers asked once."""

    def __init__(self, ctx: RunContext, target: Any, endpoint: Any, records: Records) -> None:
        self.ctx, self.config, self.eval = ctx, ctx.config, ctx.config.eval
        self.target, self.endpoint, self.records = target, endpoint, records
        self._problem_answers: list[list[str]] | None = None
        self._judge = None

    def problems(self) -> list[arith.Problem]:
        return arith.problems(self.eval.num_prompts, PROBLEM_SEED, held_out=True)

    def problem_answers(self) -> list[list[str]]:
        """num_samples answers per held-out problem (shared by verifier, format, judge)."""
        if self._problem_answers is None:
            rows = [{"question": p.question} for p in self.problems()]
            self._problem_answers = self.target.answers(rows, self.eval.num_samples)
        return self._problem_answers

    def judge(self):
        if self._judge is None:
            from lmstack.evaluation.judge import connect

            self._judge = connect(self.eval.judge, self.endpoint)
        return self._judge


# ---------------------------------------------------------------- suites


def suite_verifier(session: Session) -> dict[str, Any]:
    """The task's verifier on the answers: greedy score, or mean and CI over samples."""
    from lmstack.evaluation.sampling import score_samples
    from lmstack.tracking.identity import stable_hash

    problems, answers = session.problems(), session.problem_answers()
    scores = [[arith.verify(a, p.answer) for a in row] for p, row in zip(problems, answers)]
    summary = score_samples(scores, session.eval.confidence)
    session.records.jsonl(
        "verifier_answers",
        [
            {"question": p.question, "answer": p.answer, "responses": row, "scores": s}
            for p, row, s in zip(problems, answers, scores)
        ],
    )
    session.records.tables["eval/verifier_samples"] = [
        {"question": p.question, "response": row[0], "correct": s[0]}
        for p, row, s in list(zip(problems, answers, scores))[:20]
    ]
    return {
        "verifier/score": summary["mean"],
        "verifier/std": summary["std"],
        "verifier/ci_low": summary["ci_low"],
        "verifier/ci_high": summary["ci_high"],
        "verifier/num_samples": summary["n"],
        "verifier/pass_at_k": summary["pass_at_k"],
        "verifier/per_sample": summary["per_sample"],
        "verifier/n": len(problems),
        "verifier/temperature": session.eval.temperature,
        # equal hashes: the same answers, word for word (greedy runs reproduce)
        "verifier/answers_hash": stable_hash(answers, 16),
    }


def suite_format(session: Session) -> dict[str, Any]:
    from lmstack.evaluation.formats import compliance

    answers = [a for row in session.problem_answers() for a in row]
    result = compliance(answers, session.eval.format.regex, session.eval.format.json_schema)
    return {f"format/{key}": value for key, value in result.items()}


def suite_lm_eval(session: Session) -> dict[str, Any]:
    from lmstack.evaluation import lm_eval_bridge

    lm_cfg, ctx = session.eval.lm_eval, session.ctx
    if session.target.kind == "served":
        from lmstack.models.loading import resolve_base_path

        tokenizer_path = (
            ""
            if lm_cfg.apply_chat_template
            else resolve_base_path(session.config.model, ctx.cache_dir)
        )
        results = lm_eval_bridge.evaluate_served(
            session.endpoint,
            tokenizer_path,
            lm_cfg,
            ctx.cache_dir,
            session.eval.seed,
            session.eval.concurrency,
        )
    else:
        results = lm_eval_bridge.evaluate_in_process(
            session.target.local, lm_cfg, ctx.cache_dir, session.eval.seed
        )
    samples = lm_eval_bridge.samples_table(results, limit=10_000)
    session.records.jsonl("lm_eval_samples", samples)
    session.records.tables["eval/lm_eval_samples"] = samples[:40]
    versions = {task: str(v) for task, v in (results.get("versions") or {}).items()}
    return {**lm_eval_bridge.flatten(results), "lm_eval/task_versions": versions}


def suite_judge(session: Session) -> dict[str, Any]:
    """Single-answer grades of the model's (first-sample) answers, reference-guided."""
    from lmstack.evaluation.judge import grade
    from lmstack.prompts import load_prompt

    judge_cfg = session.eval.judge
    problems, answers = session.problems(), session.problem_answers()
    items = [
        {"question": p.question, "answer": row[0], "reference": p.solution()}
        for p, row in zip(problems, answers)
    ]
    rubric = load_prompt(judge_cfg.single_prompt)
    result = grade(session.judge(), rubric, items, judge_cfg.max_tokens, judge_cfg.concurrency)
    correct = [arith.verify(row[0], p.answer) for p, row in zip(problems, answers)]
    pairs = [(r >= 0.5, bool(c)) for r, c in zip(result["ratings"], correct) if r is not None]
    session.records.jsonl(
        "judge_grades",
        [
            {**item, "rating": r, "reply": reply, "prompt_version": result["prompt_version"]}
            for item, r, reply in zip(items, result["ratings"], result["replies"])
        ],
    )
    return {
        "judge/score": result["score"],
        "judge/n": result["n"],
        "judge/parse_failures": result["parse_failures"],
        "judge/verifier_agreement": sum(a == b for a, b in pairs) / len(pairs) if pairs else None,
        "judge/prompt_version": result["prompt_version"],
        "judge/model": session.judge().model,
    }


def suite_calibration(session: Session) -> dict[str, Any]:
    from lmstack.evaluation.judge import calibrate

    figures, results = calibrate(session.judge(), session.eval.judge)
    figures |= people_figures(session.eval.judge.calibration_set)
    session.records.jsonl("calibration_verdicts", results)
    if figures["parse_failures"]:
        print(
            f"lmstack: the judge gave {figures['parse_failures']} verdicts that could not be "
            f"parsed ({figures['pairs_unparsed']} of {figures['n']} pairs unscored)",
            flush=True,
        )
    return {f"calibration/{key}": value for key, value in figures.items()} | {
        "calibration/judge_model": session.judge().model
    }


def people_figures(calibration_set: str) -> dict[str, Any]:
    """With people's votes as the labels: how far the people agree among themselves
    (human/alpha, human/kappa for two labellers) and their own first-position rate."""
    from lmstack.evaluation import votes
    from lmstack.evaluation.agreement import labeller_agreement

    if not votes.is_session(calibration_set):
        return {"labels": calibration_set}
    labelled = votes.open_session(calibration_set, "eval.judge.calibration_set")
    people = labeller_agreement(labelled.votes)
    return {"labels": "human"} | {f"human/{key}": value for key, value in people.items()}


def suite_faithfulness(session: Session) -> dict[str, Any]:
    from lmstack.evaluation import faithfulness

    faith_cfg = session.eval.faithfulness
    items = faithfulness.context_qa_set(faith_cfg.num_items)
    answers = [
        row[0]
        for row in session.target.answers([faithfulness.prompt_fields(item) for item in items])
    ]
    if faith_cfg.method == "judge":
        result = faithfulness.judge_report(items, answers, session.judge(), session.eval.judge)
    else:
        result = faithfulness.report(items, answers)
    session.records.jsonl(
        "faithfulness_answers",
        [{**item, "response": answer} for item, answer in zip(items, answers)],
    )
    return {f"faithfulness/{key}": value for key, value in result.items()} | {
        "faithfulness/method": faith_cfg.method
    }


def suite_arena(session: Session) -> dict[str, Any]:
    """Ratings from the machine's battles (verifier or LLM judge) and/or from people's votes
    (eval.arena.human_votes), each fitted and reported on its own."""
    from lmstack.evaluation import arena

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
    """Each arena model (in process, greedy) answers the same prompts; the verifier or the
    judge decides every battle."""
    from lmstack.evaluation import arena

    arena_cfg, config = session.eval.arena, session.config
    models = arena.expand_models(list(arena_cfg.models))
    problems = arena_problems(arena_cfg)
    questions = [p.question for p in problems]
    answers = arena.answer_all(models, questions, config, session.ctx.cache_dir)
    names = [name for name, _ in models]
    unparsed = 0
    if arena_cfg.judge == "verifier":
        correct = {
            n: [arith.verify(a, p.answer) for a, p in zip(answers[n], problems)] for n in names
        }
        battles = arena.verifier_battles(names, correct)
    else:
        battles, unparsed = judge_battles(session, names, problems, answers)
    anchor = arena_cfg.anchor or names[0]
    board = arena.rate(battles, names, anchor, arena_cfg.bootstrap_rounds, session.eval.seed)
    paths = dict(models)
    for row in board:
        row["path"] = paths[row["model"]] or "base"
    return {"leaderboard": board, "anchor": anchor, "battles": battles, "unparsed": unparsed}


def human_board(session: Session) -> dict[str, Any]:
    """One battle per vote of a labelling session (both bad = a tie), fitted the same way."""
    from lmstack.evaluation import arena, votes
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


def arena_problems(arena_cfg: Any) -> list[arith.Problem]:
    """The arena's prompts (phase=label pairs the same answers for people)."""
    return arith.problems(arena_cfg.num_prompts, PROBLEM_SEED + 1, held_out=True)


def judge_battles(session: Session, names, problems, answers):
    from itertools import combinations

    from lmstack.evaluation import arena
    from lmstack.evaluation.judge import compare
    from lmstack.prompts import load_prompt

    judge_cfg = session.eval.judge
    pairs = [
        {"question": p.question, "x": answers[a][i], "y": answers[b][i], "a": a, "b": b}
        for a, b in combinations(names, 2)
        for i, p in enumerate(problems)
    ]
    template = load_prompt(judge_cfg.pairwise_prompt)
    verdicts = compare(
        session.judge(), template, pairs, judge_cfg.max_tokens, judge_cfg.concurrency
    )
    session.records.jsonl("arena_verdicts", verdicts)
    return arena.judged_battles(verdicts)


SUITES = {
    "verifier": suite_verifier,
    "format": suite_format,
    "lm_eval": suite_lm_eval,
    "judge": suite_judge,
    "calibration": suite_calibration,
    "faithfulness": suite_faithfulness,
    "arena": suite_arena,
}

# ---------------------------------------------------------------- summaries

HEADLINE_KEYS = (
    "verifier/score",
    "lm_eval/lmstack_arith_gen/exact_match_answer",
    "judge/score",
    "faithfulness/support_rate",
    "calibration/agreement",
)


def headline(metrics: dict[str, Any]) -> float | None:
    """The one figure a sweeper optimizes: the first of HEADLINE_KEYS present."""
    for key in HEADLINE_KEYS:
        if isinstance(metrics.get(key), int | float):
            return float(metrics[key])
    return None


def scalar_items(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and "stderr" not in k
    }


def write_comparison(folder: Path) -> Path | None:
    """eval_comparison.md in the folder holding evaluation runs (a sweep's, or outputs/runs):
    one row per finished evaluation, one column per figure."""
    rows = []
    for status in sorted(folder.glob("*/status.json")):
        metrics = finished_metrics(status.parent)
        if metrics and "eval/suites" in metrics:
            rows.append((status.parent.name, metrics))
    if not rows:
        return None
    columns = sorted({k for _, m in rows for k in scalar_items(m)} - {"eval/score"})
    header = ["run", "model", "prompt", "target", "eval/score", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows:
        values = [
            name,
            str(m.get("eval/model")),
            str(m.get("prompt/name")),
            str(m.get("eval/target")),
        ]
        values += [_cell(m.get(c)) for c in ("eval/score", *columns)]
        lines.append("| " + " | ".join(values) + " |")
    path = folder / "eval_comparison.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def print_summary(metrics: dict[str, Any]) -> None:
    scalars = scalar_items(metrics)
    width = max((len(k) for k in scalars), default=0)
    for key, value in scalars.items():
        print(f"  {key:<{width}}  {_cell(value)}")
