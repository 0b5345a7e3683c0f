"""People's votes feed the arena and judge calibration: planted labellers, planted judges.

A labelling session (what phase=label leaves: label_items.jsonl and votes.sqlite) is written
through the real VoteStore; run.py (a real subprocess) rates it and calibrates real HTTP
judges against it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_eval_judge import judge_server

from lmstack.evaluation import votes
from lmstack.evaluation.agreement import krippendorff_alpha, labeller_agreement
from lmstack.evaluation.judge import builtin_calibration_set

from conftest import run_cli, run_dirs, run_one


def write_session(folder: Path, items: list[votes.Item], ballots) -> Path:
    """A session as phase=label leaves it; `ballots(labeller, item)` -> winner x|y|tie|both_bad
    (or None: no vote), turned into the choice the page would have sent for its order."""
    folder.mkdir(parents=True, exist_ok=True)
    votes.save_items(items, folder / votes.ITEMS_FILE_NAME)
    store = votes.VoteStore(folder / votes.VOTES_DB_NAME)
    for labeller in ("ann", "ben", "cat"):
        for item in votes.labeller_sequence(items, labeller):
            winner = ballots(labeller, item)
            if winner is None:
                continue
            order = votes.order_shown(labeller, item.id)
            choice = {order[0]: "A", order[1]: "B"}.get(winner, winner)
            assert store.add(labeller, item.id, order, choice)
    store.close()
    return folder


def model_items(models: list[str], prompts: int) -> list[votes.Item]:
    answers = {m: [f"{m} answers question {i}" for i in range(prompts)] for m in models}
    return votes.arena_items([f"question {i}" for i in range(prompts)], answers, models)


def test_planted_labeller_ranks_the_preferred_model_first(tmp_path):
    """ann always prefers X; ben and cat vote at random: X first, its interval above the rest."""
    rng = random.Random(0)

    def ballots(labeller: str, item: votes.Item) -> str:
        if labeller == "ann" and "X" in (item.model_x, item.model_y):
            return "x" if item.model_x == "X" else "y"
        return rng.choice(["x", "y", "tie", "both_bad"])

    session = write_session(tmp_path / "label", model_items(["Y", "X", "Z"], 20), ballots)
    run_dir, metrics = run_one(
        "phase=eval",
        "eval=arena",
        "eval.arena.judge=none",
        f"eval.arena.human_votes={session}",
        "eval.arena.bootstrap_rounds=200",
        "eval.arena.anchor=Y",  # X gets a real interval (the anchor's is a point)
        "logger=none",
        output_dir=tmp_path / "out",
    )
    board = {row["model"]: row for row in metrics["arena/human/leaderboard"]}
    assert board["X"]["rank"] == 1 and board["Y"]["rating"] == 1000.0
    assert board["X"]["ci_low"] > max(board["Y"]["ci_high"], board["Z"]["ci_high"])
    assert metrics["arena/human/battles"] == 3 * 60 and metrics["arena/human/labellers"] == 3
    assert "arena/X/rating" not in metrics  # no machine battles: nothing under arena/<model>
    assert "## human" in (run_dir / "arena.md").read_text()
    assert (run_dir / "arena.png").stat().st_size > 5000


def arithmetic_items(count: int) -> tuple[list[votes.Item], dict[str, str]]:
    """The built-in calibration pairs (right vs wrong solution, lengths shuffled) as items."""
    rows = builtin_calibration_set(count)
    items = [
        votes.Item(
            votes.item_id(r["question"], r["x"], r["y"], "", ""), r["question"], r["x"], r["y"]
        )
        for r in rows
    ]
    return items, {item.id: row["label"] for item, row in zip(items, rows)}


def calibrate_against(session: Path, judge: str, output_dir: Path) -> dict:
    with judge_server(judge) as (url, _):
        run_cli(
            "phase=eval",
            "eval=calibration",
            f"eval.judge.base_url={url}",
            f"eval.judge.calibration_set={session}",
            "logger=none",
            output_dir=output_dir,
        )
    (run_dir,) = run_dirs(output_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def test_judge_that_agrees_with_people_gets_kappa_1_and_a_position_biased_one_is_caught(
    tmp_path,
):
    items, right = arithmetic_items(20)
    # ann and ben pick the right answer; cat too, but calls 4 items a tie: people mostly agree
    ties = {item.id for item in items[:4]}

    def ballots(labeller: str, item: votes.Item) -> str:
        return "tie" if labeller == "cat" and item.id in ties else right[item.id]

    session = write_session(tmp_path / "label", items, ballots)
    oracle = calibrate_against(session, "oracle", tmp_path / "oracle")
    assert oracle["calibration/labels"] == "human" and oracle["calibration/n"] == 20
    assert oracle["calibration/kappa"] == 1.0 and oracle["calibration/agreement"] == 1.0
    assert oracle["calibration/human/labellers"] == 3 and oracle["calibration/human/votes"] == 60
    assert 0.5 < oracle["calibration/human/alpha"] < 1.0  # cat's ties
    assert oracle["calibration/human/items_multi"] == 20

    biased = calibrate_against(session, "first", tmp_path / "first")
    assert biased["calibration/position_bias_rate"] == 1.0
    assert biased["calibration/first_position_rate"] == 1.0
    assert biased["calibration/agreement"] == 0.0 and biased["calibration/kappa"] <= 0.0


def test_krippendorff_alpha_by_hand():
    # units [a,a], [a,b], [b,b]: D_o = 2/6, D_e = 2*3*3/(6*5) = 0.6, alpha = 1 - (1/3)/0.6
    assert krippendorff_alpha([["a", "a"], ["a", "b"], ["b", "b"]]) == pytest.approx(4 / 9)
    assert krippendorff_alpha([["a", "a"], ["b", "b"], ["a"]]) == 1.0
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) is None  # no variation


def test_two_labellers_get_cohens_kappa():
    rows = [("i1", "x", "x"), ("i2", "y", "y"), ("i3", "x", "y"), ("i4", "tie", "tie")]
    cast = [
        {"item_id": item, "labeller": who, "winner": w, "choice": "A"}
        for item, a, b in rows
        for who, w in (("ann", a), ("ben", b))
    ]
    figures = labeller_agreement(cast)
    # p_o = 3/4; p_e = (2*1 + 1*2 + 1*1)/16 = 5/16; kappa = (12/16 - 5/16) / (11/16)
    assert figures["kappa"] == pytest.approx(7 / 11)
    assert figures["pair_agreement"] == 0.75 and figures["items_multi"] == 4


def test_a_session_without_model_names_cannot_rate_models(tmp_path):
    items, right = arithmetic_items(4)
    session = write_session(tmp_path / "label", items, lambda who, item: right[item.id])
    result = run_cli(
        "phase=eval",
        "eval=arena",
        "eval.arena.judge=none",
        f"eval.arena.human_votes={session}",
        "logger=none",
        output_dir=tmp_path / "out",
        check=False,
    )
    assert result.returncode == 2
    assert "names no models" in result.stdout + result.stderr
