"""eval=math and data.task=math: reasoning-gym's problems split by template, scored by the final
number; the score cross-checked against reasoning-gym's own score_answer; right/wrong controls
through a served endpoint; bad input; and (slow) the GRPO recipe's lift on SmolLM2-135M."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from lmstack.config.groups.eval_math import DEFAULT_MATH_GENERATORS
from lmstack.data import math_problems
from lmstack.data.sources import load_rows
from lmstack.errors import ConfigError
from lmstack.objectives.reward_functions import math_scores

from conftest import (
    REPO,
    assert_rejected_early,
    chat_answer,
    data_config,
    openai_server,
    run_cli,
    run_dirs,
    run_one,
)

EVAL = ["phase=eval", "eval=math", "logger=none"]
# the recipe test's asked lift in held-out accuracy (measured: see its docstring)
MARGIN = 0.1
# every generator, each with its own options: the cross-check covers them all
ALL_GENERATORS = [
    {"name": "gsm_symbolic", "weight": 1.0},
    {"name": "basic_arithmetic", "weight": 1.0},
    {"name": "chain_sum", "weight": 1.0, "options": {"max_terms": 4, "max_digits": 4}},
]


def decorated(answer: str, rng: random.Random) -> str:
    """The right number, written as models write it: in a sentence, bold, with thousands
    commas or a zero decimal part, after some working whose numbers are not the answer."""
    value = float(answer)
    with_commas = f"{int(value):,}" if value.is_integer() else answer
    return rng.choice(
        [
            f"The answer is {answer}.",
            f"**{with_commas}**",
            f"So 3 + 4 = 7, and 7 * 2 = 14. Final answer: {answer}",
            f"{answer}.00" if value.is_integer() else f"#### {answer}",
            f"The total is {with_commas} apples.",
        ]
    )


def wrong(answer: str, rng: random.Random) -> str:
    """A wrong final number (an off-by-some, or the answer followed by another number), or
    no number at all."""
    value = float(answer)
    off = value + rng.choice([1, -1, 10, 100])
    return rng.choice(
        [
            f"The answer is {math_problems.canonical(str(off))}.",
            f"{answer} is close; I say {math_problems.canonical(str(off))}",
            f"{answer}{rng.randint(0, 9)}",  # the answer's digits, then one more
            "I cannot tell.",
        ]
    )


def reasoning_gym_verdict(problem: math_problems.MathProblem, completion: str) -> float:
    """reasoning-gym's own score_answer of the number lmstack extracts, written as its answers
    are (its scorers expect a bare answer; 0 where there is none)."""
    import reasoning_gym

    number = math_problems.final_number(completion)
    dataset = reasoning_gym.create_dataset(problem.generator, size=1, seed=0)
    answer = None if number is None else math_problems.canonical(number)
    return dataset.score_answer(answer, problem.entry)


def test_score_equals_reasoning_gyms_own_score_answer_on_the_same_completions():
    """Over 300 problems of every generator (both sides of the split) and right, decorated and
    wrong completions: lmstack's score is 1 exactly where reasoning-gym's score_answer gives
    full marks. (Its scorers give partial credit below 1: gsm_symbolic 0.01 for any wrong
    number, chain_sum len(answer)/len(given) for a number containing the answer.)"""
    rng = random.Random(0)
    problems = math_problems.problems(ALL_GENERATORS, 150, seed=3, held_out=True)
    problems += math_problems.problems(ALL_GENERATORS, 150, seed=4, held_out=False)
    verdicts = []
    for problem in problems:
        for completion in (decorated(problem.answer, rng), wrong(problem.answer, rng)):
            ours = math_problems.score(completion, problem.answer)
            theirs = reasoning_gym_verdict(problem, completion)
            assert ours == float(theirs == 1.0), (problem.generator, completion, problem.answer)
            verdicts.append((ours, theirs))
    assert sum(ours for ours, _ in verdicts) == len(problems)  # each right one, and no wrong one
    assert any(0 < theirs < 1 for _, theirs in verdicts)  # partial credit seen, and not taken
    assert {p.generator for p in problems} == {g["name"] for g in ALL_GENERATORS}


def test_the_one_known_disagreement_a_sign_gsm_symbolic_ignores():
    """reasoning-gym's gsm_symbolic scorer reads its number with r"\\b-?\\d+", and the word
    boundary drops a leading minus: "-5" gets full marks for 5. lmstack keeps the sign. No
    GSM-Symbolic answer was negative in 3,000 drawn, so the cross-check never meets it."""
    import reasoning_gym

    gsm = reasoning_gym.create_dataset("gsm_symbolic", size=1, seed=0)
    assert gsm.score_answer("-5", {"answer": "5"}) == 1.0
    assert math_problems.score("-5", "5") == 0.0


def test_the_final_number_is_the_one_scored():
    assert math_problems.final_number("3 + 4 = 7, so the answer is -1,234.5.") == "-1234.5"
    assert math_problems.final_number("no digits") is None
    assert math_problems.score("**1,000**", "1000") == 1.0
    assert math_problems.score("1000, then 7", "1000") == 0.0
    assert math_problems.canonical("12.0") == "12" and math_problems.canonical("2.5") == "2.5"
    assert math_scores(["q", "q", "q"], ["it is 5", "it is 6", "it is 5"], ["5", "5", None]) == [
        1.0,
        0.0,
        0.0,
    ]


def templates(problems: list[math_problems.MathProblem]) -> set[tuple[str, str]]:
    return {(p.generator, p.template) for p in problems}


def test_the_template_split_is_disjoint_and_the_same_for_every_seed_and_count():
    held = [math_problems.problems(ALL_GENERATORS, 60, seed, held_out=True) for seed in (0, 1)]
    train = [math_problems.problems(ALL_GENERATORS, 60, seed, held_out=False) for seed in (0, 1)]
    for side in held:
        assert all(math_problems.is_held_out(g, t) for g, t in templates(side))
    for side in train:
        assert not any(math_problems.is_held_out(g, t) for g, t in templates(side))
    assert not (templates(held[0]) | templates(held[1])) & (
        templates(train[0]) | templates(train[1])
    )
    # a larger count draws more problems, the first ones unchanged (per generator)
    more = math_problems.problems(ALL_GENERATORS, 90, 0, held_out=True)
    for name in ("gsm_symbolic", "chain_sum"):
        fewer = [p.question for p in held[0] if p.generator == name]
        assert [p.question for p in more if p.generator == name][: len(fewer)] == fewer
    # the same arguments, the same problems; another seed, other problems
    again = math_problems.problems(ALL_GENERATORS, 60, 0, held_out=True)
    assert [p.question for p in again] == [p.question for p in held[0]]
    assert [p.question for p in held[1]] != [p.question for p in held[0]]


def test_options_that_leave_the_eval_no_template_are_refused():
    """Chain sums of two terms have two templates, `N + N` and `N - N`, both for training."""
    two_terms = [{"name": "chain_sum", "options": {"min_terms": 2, "max_terms": 2}}]
    with pytest.raises(ConfigError, match=r"eval.math.generators: generator 'chain_sum'.*no temp"):
        math_problems.problems(two_terms, 5, 0, held_out=True)
    assert len(math_problems.problems(two_terms, 5, 0, held_out=False)) == 5


def test_grpo_rows_come_from_the_training_templates_only():
    rows = load_rows(data_config(source="builtin", task="math", train_size=40, eval_size=8), "grpo")
    assert rows.format == "prompt" and len(rows.train) == 40 and len(rows.eval) == 8
    drawn = [row["_line"].split("#", 1) for row in rows.train + rows.eval]
    assert {generator for generator, _ in drawn} == {g["name"] for g in DEFAULT_MATH_GENERATORS}
    assert not any(math_problems.is_held_out(generator, t) for generator, t in drawn)
    assert all(row["answer"] and row["prompt"] for row in rows.train)


def test_data_math_generators_choose_the_training_mix():
    """data.math_generators: chain sums of one-digit numbers only, still on the training side
    of the split; an unknown generator is named by its key."""
    one_digit = [
        {"name": "chain_sum", "options": {"min_terms": 2, "max_terms": 3, "max_digits": 1}}
    ]
    config = data_config(source="builtin", task="math", train_size=30, math_generators=one_digit)
    rows = load_rows(config, "grpo")
    drawn = [row["_line"].split("#", 1) for row in rows.train + rows.eval]
    assert {generator for generator, _ in drawn} == {"chain_sum"}
    assert not any(math_problems.is_held_out(generator, t) for generator, t in drawn)
    assert all(int(n) < 10 for row in rows.train for n in re.findall(r"\d+", row["prompt"]))
    misspelt = data_config(source="builtin", task="math", math_generators=[{"name": "chain"}])
    with pytest.raises(ConfigError, match=r"data.math_generators\[0\].name"):
        load_rows(misspelt, "grpo")


def answering_server(problems: list[math_problems.MathProblem], right: bool):
    """reply() of an engine that knows every answer, and gives it (right) or one more."""
    answers = {p.question: p.answer for p in problems}

    def reply(body, headers):
        asked = body["messages"][-1]["content"]
        (answer,) = [a for question, a in answers.items() if question in asked]
        said = answer if right else math_problems.canonical(str(float(answer) + 1))
        return chat_answer(f"Working it out step by step, the result is {said}.")

    return reply


@pytest.mark.parametrize("right", [True, False], ids=["right", "wrong"])
def test_an_engine_with_the_right_numbers_scores_one_and_wrong_ones_zero(tmp_path, right):
    count = 16
    problems = math_problems.problems(DEFAULT_MATH_GENERATORS, count, 0, held_out=True)
    with openai_server("oracle", answering_server(problems, right)) as base_url:
        run_cli(
            *EVAL,
            f"eval.math.count={count}",
            "eval.target=served",
            "serving=external",
            f"serving.base_url={base_url}",
            "serving.served_model_name=oracle",
            "serving.gateway=false",
            "eval.concurrency=8",
            output_dir=tmp_path,
        )
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    want = 1.0 if right else 0.0
    assert metrics["math/accuracy"] == metrics["eval/score"] == want
    assert metrics["math/n"] == count
    assert metrics["math/accuracy/gsm_symbolic"] == metrics["math/accuracy/chain_sum"] == want
    assert metrics["math/ci_low"] <= want <= metrics["math/ci_high"]
    samples = [json.loads(line) for line in metrics_file.with_name("math_samples.jsonl").open()]
    assert [s["prompt"] for s in samples] == [p.question for p in problems]
    # each saved sample carries reasoning-gym's own verdict on the same extraction
    assert all(s["score"] == want and (s["reasoning_gym_score"] == 1.0) == right for s in samples)


def test_an_unknown_generator_is_named(tmp_path):
    result = run_cli(
        *EVAL,
        "eval.math.generators=[{name: chain_sum}, {name: gsm_symbolc}]",
        output_dir=tmp_path,
        check=False,
    )
    assert_rejected_early(result, "eval.math.generators[1].name", "gsm_symbolc", "gsm_symbolic")


def test_a_missing_reasoning_gym_wheel_is_named(tmp_path):
    """run.py in a Python where `import reasoning_gym` fails, as it does without the wheel."""
    blocked = (
        "import runpy, sys; sys.modules['reasoning_gym'] = None; "  # None: ImportError on import
        f"sys.argv = ['run.py', *sys.argv[1:]]; runpy.run_path({str(REPO / 'run.py')!r}, "
        "run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked, *EVAL, f"paths.output_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_rejected_early(result, "eval.math", "reasoning-gym", "pip install")
    assert not list(tmp_path.rglob("math_samples.jsonl"))


def test_math_rows_for_sft_are_refused(tmp_path):
    result = run_cli(
        "data.task=math", "objective=sft", "logger=none", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, "data.task=math", "objective=grpo", "objective=sft")


@pytest.mark.e2e
def test_grpo_trains_on_math_rows_with_the_math_reward(tmp_path):
    """data.task=math rows and the `math` reward through run.py on the built-in model: the
    reward is computed and logged, and the sampled completions are scored against the rows'
    answers."""
    run_dir, metrics = run_one(
        "objective=grpo",
        "data.task=math",
        "objective.rewards=[{name: math, weight: 1.0}]",
        "objective.reward_check_steps=0",  # the built-in model may get none right
        "trainer.max_steps=2",
        "data.train_size=16",
        "data.eval_size=4",
        "data.batch_size=4",
        "objective.group_size=2",
        "trainer.num_threads=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        output_dir=tmp_path,
    )
    assert "train/reward_math" in metrics and 0.0 <= metrics["train/reward_math"] <= 1.0
    (samples_file,) = run_dir.rglob("grpo.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert samples and all(sample["reference"] for sample in samples)
    for sample in samples:
        assert sample["reward"] == math_problems.score(sample["completion"], sample["reference"])


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.xfail(
    reason="no lift measured yet: 0.07 -> 0.04 on 100 held-out chain sums after 12 GRPO updates "
    "(28 min of CPU, 2 shared cores); chain sums alone, one-digit, 40 updates: 0.17 -> 0.18 "
    "(docs/evaluation.md); the recipe needs more updates than a CPU test affords",
    strict=True,  # a lift makes this fail: then drop the mark and record the figure
)
def test_the_grpo_recipe_lifts_held_out_math_accuracy_of_smollm2(tmp_path):
    """recipe=smollm2_grpo_math: SmolLM2-135M-Instruct's greedy accuracy on 100 held-out chain
    sums ("N + N + N", numbers under 100) before and after GRPO (LoRA) on the training
    templates. Asked: after >= before + MARGIN. Measured with the recipe as shipped (seed 0):
    0.07 before, 0.04 after (the 95% intervals overlap); training rewards rose from ~0.03 to
    ~0.17 in steps 5-8, then fell back. Expected to fail until the recipe lifts it."""
    result = run_cli(
        "recipe=smollm2_grpo_math",
        "logger=none",
        "trainer.enable_progress_bar=false",
        output_dir=tmp_path,
        timeout=3600,
    )
    (pipeline,) = [d for d in run_dirs(tmp_path) if d.name.startswith("pipeline")]
    metrics = json.loads((pipeline / "metrics.json").read_text())
    before, after = metrics["base/math/accuracy"], metrics["grpo_eval/math/accuracy"]
    print(f"held-out math accuracy: {before:.2f} -> {after:.2f}")
    assert metrics["base/math/n"] == metrics["grpo_eval/math/n"] == 100
    assert after >= before + MARGIN, (before, after)
    assert "lmstack: the pipeline's evaluations" in result.stdout
