"""LLM-as-judge: calibration figures against planted judges (real HTTP servers), bad input.

The planted judges are tiny OpenAI-compatible HTTP servers in this process: one always
answers "[[A]]" (pure position bias), one picks the longer answer, one knows arithmetic (an
oracle), one answers prose that holds no verdict. run.py (a real subprocess) calls them.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest

from lmstack import judging
from lmstack.evaluation import judge
from lmstack.evaluation.arena import fit_bradley_terry, rate
from lmstack.evaluation.faithfulness import context_qa_set, supported
from lmstack.evaluation.sampling import mean_ci

from conftest import assert_rejected_early, chat_answer, openai_server, run_cli, run_dirs

PAIRWISE = re.compile(
    r"\[Question\]\n(?P<q>.*?)\n\n\[Assistant A's answer\]\n(?P<a>.*?)\n\n"
    r"\[Assistant B's answer\]\n(?P<b>.*)",
    re.S,
)
PROBLEM = re.compile(r"has (\d+) \w+ and (gets|gives away) (\d+)")


def right_solution(question: str) -> str:
    a, verb, b = PROBLEM.search(question).groups()
    a, b = int(a), int(b)
    op, value = ("+", a + b) if verb == "gets" else ("-", a - b)
    return f"{a} {op} {b} = {value}. The answer is {value}."


SINGLE = re.compile(
    r"\[Reference solution\]\n(?P<ref>.*?)\n\n\[The assistant's answer\]\n(?P<a>.*)", re.S
)


def verdict(mode: str, user: str) -> str:
    if mode == "first":
        return "[[A]]"
    if mode == "prose":
        return "Both answers look reasonable to me."
    if user.startswith("[Context]"):  # faithfulness: supported numbers only
        context, answer = user.split("[Answer]")
        numbers = re.findall(r"\d+", answer)
        return "[[yes]]" if numbers and all(n in context for n in numbers) else "[[no]]"
    if single := SINGLE.search(user):  # single-answer grading, reference-guided
        return "Rating: [[10]]" if single["ref"] in single["a"] else "Rating: [[1]]"
    fields = PAIRWISE.search(user)
    question, first, second = fields["q"], fields["a"], fields["b"]
    if mode == "longer":
        return "[[A]]" if len(first) >= len(second) else "[[B]]"
    right = right_solution(question)
    return "[[A]]" if right in first else "[[B]]" if right in second else "[[C]]"


@contextlib.contextmanager
def judge_server(mode: str):
    """A real OpenAI-compatible HTTP judge on a free port; its requests are recorded."""
    seen: list[dict] = []

    def reply(request: dict, headers: dict) -> dict:
        seen.append({"body": request, "version": headers.get("X-Lmstack-Prompt-Version")})
        return chat_answer(verdict(mode, request["messages"][-1]["content"]))

    with openai_server(f"planted-{mode}", reply) as url:
        yield url, seen


def calibrate_cli(base_url: str, output_dir, *extra: str, check: bool = True):
    return run_cli(
        "phase=eval",
        "eval=calibration",
        f"eval.judge.base_url={base_url}",
        "eval.judge.calibration_size=24",
        "logger=none",
        *extra,
        output_dir=output_dir,
        check=check,
    )


def metrics_of(output_dir) -> dict:
    (run_dir,) = run_dirs(output_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def test_position_biased_judge_is_caught_and_the_oracle_is_not(tmp_path):
    with judge_server("first") as (url, seen):
        calibrate_cli(url, tmp_path / "biased")
    biased = metrics_of(tmp_path / "biased")
    # "[[A]]" in both orders names x once and y once: every pair flips with the order
    assert biased["calibration/position_bias_rate"] == 1.0
    assert biased["calibration/first_position_rate"] == 1.0
    assert biased["calibration/ties"] == 24 and biased["calibration/agreement"] == 0.0
    assert biased["calibration/parse_failures"] == 0
    assert len(seen) == 48  # both orders of each of the 24 pairs
    assert {s["version"] for s in seen} == {biased["calibration/prompt_version"]}

    with judge_server("oracle") as (url, _):
        calibrate_cli(url, tmp_path / "oracle")
    oracle = metrics_of(tmp_path / "oracle")
    assert oracle["calibration/position_bias_rate"] == 0.0
    assert oracle["calibration/agreement"] == 1.0 and oracle["calibration/kappa"] == 1.0
    assert abs(oracle["calibration/length_bias"]) < 1e-9  # follows the labels, not length


def test_length_biased_judge_shows_length_bias(tmp_path):
    with judge_server("longer") as (url, _):
        calibrate_cli(url, tmp_path)
    metrics = metrics_of(tmp_path)
    # it always picks the longer answer; the labels pick it about half the time
    assert metrics["calibration/longer_picked_rate"] == 1.0
    assert metrics["calibration/length_bias"] > 0.3, metrics
    assert metrics["calibration/kappa"] < 0.5


def test_unparseable_verdicts_are_counted_and_reported(tmp_path):
    with judge_server("prose") as (url, _):
        result = calibrate_cli(url, tmp_path)
    metrics = metrics_of(tmp_path)
    assert metrics["calibration/parse_failures"] == 48
    assert metrics["calibration/pairs_unparsed"] == 24
    assert metrics["calibration/agreement"] == 0.0  # unparsed agrees with no label
    assert metrics["calibration/position_bias_rate"] is None  # nothing judged in both orders
    assert "48 verdicts that could not be parsed" in result.stdout
    (run_dir,) = run_dirs(tmp_path)
    verdicts = (run_dir / "calibration_verdicts.jsonl").read_text().splitlines()
    assert len(verdicts) == 24 and json.loads(verdicts[0])["winner"] == "unparsed"


def test_unreachable_judge_fails_clearly_without_results(tmp_path):
    from lmstack.serving.engines import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    result = calibrate_cli(url, tmp_path, "eval.judge.model=some-judge", check=False)
    assert result.returncode == 2, result.stderr
    assert "cannot be reached" in result.stderr and url in result.stderr
    assert "no judge results were written" in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_calibration_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "labels.jsonl"
    bad.write_text(
        '{"question": "q", "answer_a": "a", "answer_b": "b", "label": "A"}\n{"question": 1}\n'
    )
    with judge_server("first") as (url, seen):
        result = calibrate_cli(
            url, tmp_path / "out", f"eval.judge.calibration_set={bad}", check=False
        )
    assert result.returncode == 2 and f"{bad}:2" in result.stderr, result.stderr
    assert not seen  # rejected before any request


@pytest.mark.slow  # the pairwise unparseable-verdict test covers the counting
def test_single_answer_grading_counts_parse_failures(tmp_path):
    """The untuned base answers 8 problems; an oracle grader rates them, a prose one fails."""
    args = (
        "phase=eval",
        "eval=judge",
        "eval.num_prompts=8",
        "logger=none",
        "trainer.num_threads=1",
    )
    with judge_server("oracle") as (url, seen):
        run_cli(*args, f"eval.judge.base_url={url}", output_dir=tmp_path / "oracle")
    graded = metrics_of(tmp_path / "oracle")
    assert graded["judge/n"] == 8 and graded["judge/parse_failures"] == 0
    assert graded["judge/verifier_agreement"] == 1.0  # the oracle and the verifier agree
    assert graded["judge/model"] == "planted-oracle"
    assert {s["version"] for s in seen} == {graded["judge/prompt_version"]}
    with judge_server("prose") as (url, _):
        run_cli(*args, f"eval.judge.base_url={url}", output_dir=tmp_path / "prose")
    prose = metrics_of(tmp_path / "prose")
    assert prose["judge/parse_failures"] == 8 and prose["judge/score"] is None


def test_arena_and_faithfulness_through_the_judge(tmp_path, tiny_base):
    """The same weights under two names: every judged battle is a tie, so equal ratings."""
    with judge_server("oracle") as (url, seen):
        run_cli(
            "phase=eval",
            "eval=[arena,faithfulness]",
            f"eval.arena.models=[base,{tiny_base}]",
            "eval.arena.judge=judge",
            "eval.arena.num_prompts=6",
            "eval.arena.bootstrap_rounds=100",
            "eval.faithfulness.method=judge",
            "eval.faithfulness.num_items=6",
            f"eval.judge.base_url={url}",
            "logger=none",
            "trainer.num_threads=1",
            output_dir=tmp_path,
        )
    metrics = metrics_of(tmp_path)
    assert metrics["arena/battles"] == 6 and metrics["arena/unparsed"] == 0
    ratings = [row["rating"] for row in metrics["arena/leaderboard"]]
    assert ratings == [1000.0, 1000.0]
    assert all(row["ties"] == 6 for row in metrics["arena/leaderboard"])
    assert metrics["faithfulness/method"] == "judge" and metrics["faithfulness/n"] == 6
    assert metrics["faithfulness/parse_failures"] == 0
    assert len(seen) == 2 * 6 + 6  # both orders of 6 battles, 6 faithfulness checks


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["eval.num_samples=3"], "eval.num_samples: greedy decoding"),
        (["eval=arena"], "eval.arena.models"),
        (["eval.judge.base_url=ftp://judge"], "eval.judge.base_url"),
        (["+eval.suites.bleu=true"], "eval.suites.bleu"),
    ],
)
def test_eval_config_errors_name_the_key(tmp_path, overrides, fragment):
    result = run_cli("phase=eval", *overrides, output_dir=tmp_path, check=False)
    assert_rejected_early(result, fragment)


# ---------------------------------------------------------------- the figures themselves


def test_parsers():
    assert judging.parse_verdict("I pick [[B]].") == "B"
    assert judging.parse_verdict("[[A]] no wait [[B]]") is None  # contradicts itself
    assert judging.parse_verdict("A is better") is None
    assert judging.parse_rating("Rating: [[7]]") == 0.7
    assert judging.parse_rating("Rating: 3") == 0.3
    assert judging.parse_rating("[[11]]") is None and judging.parse_rating("great") is None


def test_cohen_kappa_by_hand():
    # p_o = 0.75; p_e = 0.5*0.75 + 0.5*0.25 = 0.5 -> kappa 0.5
    assert judge.cohen_kappa(["x", "x", "y", "y"], ["x", "x", "y", "x"]) == pytest.approx(0.5)
    assert judge.cohen_kappa(["x", "y"], ["x", "y"]) == 1.0


def test_builtin_calibration_set_is_balanced():
    rows = judge.builtin_calibration_set(200)
    assert 0.35 < sum(r["label"] == "x" for r in rows) / 200 < 0.65
    longer_right = [len(r[r["label"]]) > len(r["y" if r["label"] == "x" else "x"]) for r in rows]
    assert 0.4 < sum(longer_right) / 200 < 0.6  # length says nothing about the label


def test_bradley_terry_recovers_the_order_and_elo_scale():
    # a beats b 3 of 4 times: Elo gap 400 * log10(3) = 190.8 (without the weak prior)
    battles = [("a", "b", 1.0)] * 300 + [("a", "b", 0.0)] * 100
    ratings = fit_bradley_terry(battles, ["a", "b"], anchor="b")
    assert ratings["b"] == 1000.0
    assert ratings["a"] - 1000.0 == pytest.approx(190.8, abs=1.0)
    board = rate(battles + [("b", "c", 0.5)] * 50, ["a", "b", "c"], "b", rounds=100)
    assert board[0]["model"] == "a"
    for row in board:
        assert row["ci_low"] <= row["rating"] <= row["ci_high"]


def test_support_check():
    context = "Ana has 7 books and gets 4 more. Ben has 3 coins."
    assert supported("7 + 4 = 11. The answer is 11.", context)
    assert supported("7 + 3 = 10. The answer is 10.", context)  # supported, though wrong
    assert not supported("7 + 5 = 12. The answer is 12.", context)  # 5 is not in the context
    assert not supported("7 + 4 = 12. The answer is 12.", context)  # miscalculated
    assert not supported("7 + 4 = 11. The answer is 9.", context)  # never derived
    assert not supported("7 + 4 = 11.", context)  # no answer stated
    assert len(context_qa_set(10)) == 10


def test_mean_ci():
    summary = mean_ci([0.5, 0.6, 0.7])
    assert summary["ci_low"] < 0.6 < summary["ci_high"]
    assert mean_ci([0.4])["ci_low"] == 0.4
