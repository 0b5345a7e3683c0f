"""eval=arena: models answer the same prompts and a judge (or people's votes) rates them pairwise
into a leaderboard.

Deferred imports, for start-up time: openai and torch (and the lmstack modules that load them)
are imported inside the functions that need them; the CLI's input checks import this module
first.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

from lmstack.config.groups import eval as eval_group
from lmstack.data.eval_rows import EvalRow, require_references
from lmstack.data.scoring import needs_reference
from lmstack.evaluation import arena, votes
from lmstack.evaluation.arena import expand_models
from lmstack.evaluation.judge_suite import answers_of, rubric_name, warn_unparsed
from lmstack.evaluation.suites import Inputs, Session, Suite, builtin_rows, register
from lmstack.prompts import load_prompt
from lmstack.tracking.run_dir import write_json


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


def needs_of_arena(cfg: Any) -> tuple[str, ...]:
    return ("judge",) if cfg.arena.judge == "judge" else ()


register(
    Suite(
        "arena",
        suite_arena,
        None,
        needs=needs_of_arena,
        check=check_arena,
        schema=eval_group.ArenaConfig,
        options_key="arena",
    )
)
