"""phase=eval end to end: lm-eval tasks, in process vs served, arena, sampling, baselines.

One module-scoped sweep trains two short SFT runs (10 and 60 steps, ~20 s each on 2 cores);
the tests evaluate them, the untuned base beside them, through the real run.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CACHE_DIR, run_cli, run_dirs, run_one

QUIET = ("logger=none", "trainer.num_threads=1")


@pytest.fixture(scope="module")
def sft_sweep(tmp_path_factory) -> dict[str, Path]:
    """A 2-point SFT sweep: {"sweep": its folder, 10: the 10-step run, 60: the 60-step run}."""
    output_dir = tmp_path_factory.mktemp("sft")
    run_cli(
        "-m",
        "trainer.max_steps=10,60",
        "trainer.checkpoint_every_n_steps=60",
        "trainer.enable_progress_bar=false",
        "verify.num_prompts=8",
        *QUIET,
        output_dir=output_dir,
    )
    runs = {}
    for run_dir in run_dirs(output_dir):
        steps = json.loads((run_dir / "status.json").read_text())
        assert steps["status"] == "finished"
        config = (run_dir / "config.yaml").read_text()
        runs[60 if "max_steps: 60" in config else 10] = run_dir
    runs["sweep"] = runs[60].parent
    return runs


def evaluate(output_dir: Path, *args: str, check: bool = True):
    return run_cli("phase=eval", *args, output_dir=output_dir, check=check)


def eval_metrics(output_dir: Path) -> dict:
    (run_dir,) = [d for d in run_dirs(output_dir) if d.name.startswith("eval-")]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.e2e
def test_sft_run_scores_above_the_untuned_base_on_the_local_lm_eval_tasks(tmp_path, sft_sweep):
    """Margins measured over seeds (limit 30, `seed=1234,1,2,3,4,5`), on an Intel Xeon with
    AVX-512 and AMX (intel-x86_64-avx512-bf16-amx): exact match 0.00 (base) -> 0.73-0.90 after
    60 SFT steps (worst seed 2; the default seed 1234: 0.87), multiple choice accuracy 0.67 ->
    0.97-1.00. 30 steps were too few to hold across CPU kinds: 0.27-0.43 over the same seeds
    on this Xeon, against 0.77 (default seed) on the machine the test was first measured on
    (base: multiple choice 0.57). The margins (+0.5, +0.2) sit below the worst seed here and
    below that machine's 30-step figures; 60 steps were not yet measured on a second CPU kind."""
    common = ("eval=lm_eval", "eval.lm_eval.limit=30", "trainer.num_threads=1")
    base_run = evaluate(tmp_path / "base", *common, "logger=none")
    # the tasks' own generation length (32) by default; an override says so aloud
    sft_run = evaluate(
        tmp_path / "sft",
        *common,
        "logger=wandb",
        f"model.init_from={sft_sweep[60]}",
        "eval.lm_eval.max_gen_toks=32",
    )
    assert "overrides the generation length" not in base_run.stdout
    assert "eval.lm_eval.max_gen_toks=32 overrides the generation length" in sft_run.stdout
    base, sft = eval_metrics(tmp_path / "base"), eval_metrics(tmp_path / "sft")
    gen, mc = "lm_eval/lmstack_arith_gen/exact_match_answer", "lm_eval/lmstack_arith_mc/acc"
    assert sft[gen] >= base[gen] + 0.5, (base[gen], sft[gen])
    assert sft[mc] >= base[mc] + 0.2, (base[mc], sft[mc])
    assert sft["lm_eval/task_versions"] == {"lmstack_arith_gen": "1.0", "lmstack_arith_mc": "1.0"}
    assert sft["prompt/version"].startswith("p-")
    (run_dir,) = run_dirs(tmp_path / "sft")
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    samples = (run_dir / "lm_eval_samples.jsonl").read_text().splitlines()
    assert len(samples) == 60  # 30 documents of each task, every one recorded
    # the data was generated locally; the task file includes the shipped one
    task_dir = CACHE_DIR / "lm_eval_tasks" / "v1"
    assert len((task_dir / "arith_test.jsonl").read_text().splitlines()) == 200
    assert "include: " in (task_dir / "lmstack_arith_gen.yaml").read_text()


@pytest.mark.slow
def test_greedy_eval_in_process_and_served_agree(tmp_path, sft_sweep):
    """The same run, greedy, in process and behind `serving=hf` (`transformers serve`):
    tolerance one problem in 16 (answers are expected to be identical, word for word).
    Slow: ~160 s on 2 shared cores, most of it starting the engine and its CPU requests."""
    common = (
        "eval=[verifier,lm_eval]",
        "eval.num_prompts=16",
        "eval.lm_eval.tasks=[lmstack_arith_gen]",
        "eval.lm_eval.limit=16",
        f"model.init_from={sft_sweep[60]}",
        *QUIET,
    )
    evaluate(tmp_path / "local", *common)
    served_run = evaluate(tmp_path / "served", *common, "eval.target=served")
    assert "starting hf engine" in served_run.stdout
    local, served = eval_metrics(tmp_path / "local"), eval_metrics(tmp_path / "served")
    assert served["eval/target"] == "served" and served["eval/described"]["path"]
    tolerance = 1 / 16
    for key in ("verifier/score", "lm_eval/lmstack_arith_gen/exact_match_answer"):
        assert abs(local[key] - served[key]) <= tolerance, (key, local[key], served[key])
    answers = [
        [json.loads(line)["responses"][0] for line in path.read_text().splitlines()]
        for path in sorted(tmp_path.glob("*/runs/*/verifier_samples.jsonl"))
    ]
    assert sum(a == b for a, b in zip(*answers)) >= 15, answers


@pytest.mark.e2e
def test_arena_over_a_sweep_writes_ratings_intervals_and_a_plot(tmp_path, sft_sweep):
    evaluate(
        tmp_path,
        "eval=arena",
        f"eval.arena.models=[base,{sft_sweep['sweep']}]",
        "eval.arena.num_prompts=24",
        *QUIET,
    )
    (run_dir,) = run_dirs(tmp_path)
    arena = json.loads((run_dir / "arena.json").read_text())
    board = {row["model"]: row for row in arena["leaderboard"]}
    assert set(board) == {"base", sft_sweep[10].name, sft_sweep[60].name}
    for row in board.values():
        assert row["ci_low"] <= row["rating"] <= row["ci_high"]
        assert row["battles"] == 48  # 24 prompts against each of the two others
    assert board["base"]["rating"] == 1000.0  # the anchor
    # an SFT run ranks first, its whole interval above the base. Which of the two it is
    # depends on the built-in base's exact weights, and so on the CPU kind (measured with a
    # 30-step run: that run on one base build, the 10-step run on another)
    best = next(row for row in board.values() if row["rank"] == 1)
    assert best["model"] != "base" and best["ci_low"] > board["base"]["rating"], board
    assert (run_dir / "arena.png").stat().st_size > 1000
    assert "| rank | model | rating | ci_low | ci_high |" in (run_dir / "arena.md").read_text()


@pytest.mark.slow  # keeps the default suite under its 15-minute budget
def test_sampling_gives_mean_and_ci_and_greedy_reproduces(tmp_path, sft_sweep):
    model = f"model.init_from={sft_sweep[60]}"
    sampled = ("eval=verifier", "eval.temperature=1.0", "eval.num_samples=4")
    evaluate(tmp_path / "sampled", *sampled, "eval.num_prompts=16", model, *QUIET)
    metrics = eval_metrics(tmp_path / "sampled")
    assert metrics["verifier/num_samples"] == 4 and len(metrics["verifier/per_sample"]) == 4
    assert metrics["verifier/ci_low"] <= metrics["verifier/score"] <= metrics["verifier/ci_high"]
    assert metrics["verifier/pass_at_k"] >= max(metrics["verifier/per_sample"])

    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "required": ["answer"]}')
    greedy = (
        "eval=[verifier,format,faithfulness]",
        "eval.num_prompts=16",
        f"eval.format.json_schema={schema}",
        model,
        *QUIET,
    )
    evaluate(tmp_path / "greedy", *greedy)
    first = eval_metrics(tmp_path / "greedy")
    evaluate(tmp_path / "greedy", *greedy, "run.rerun=true")
    again = eval_metrics(tmp_path / "greedy")
    assert first["verifier/answers_hash"] == again["verifier/answers_hash"]
    assert first["verifier/ci_low"] == first["verifier/score"] == first["verifier/ci_high"]
    # format: the trained answer sentence, and no JSON at all
    assert first["format/regex_rate"] >= 0.8 and first["format/json_schema_rate"] == 0.0
    assert 0.0 <= first["faithfulness/support_rate"] <= 1.0
    assert first["faithfulness/n"] == 40


def test_prompting_baselines_are_ordinary_sweep_points(tmp_path):
    """The untuned base with zero-shot and few-shot prompts (plain text, as it was
    pretrained): one sweep, one comparison table."""
    run_cli(
        "-m",
        "phase=eval",
        "eval=[verifier,format]",
        "prompt=zero_shot,few_shot",
        "eval.chat=false",
        "eval.num_prompts=16",
        *QUIET,
        output_dir=tmp_path,
    )
    points = [json.loads((d / "metrics.json").read_text()) for d in run_dirs(tmp_path)]
    assert {p["prompt/name"] for p in points} == {"zero_shot", "few_shot"}
    assert len({p["prompt/version"] for p in points}) == 2
    (table,) = tmp_path.glob("sweeps/*/eval_comparison.md")
    text = table.read_text()
    assert "zero_shot" in text and "few_shot" in text and "verifier/score" in text


def test_unknown_harness_task_lists_where_tasks_were_looked_for(tmp_path):
    result = evaluate(
        tmp_path, "eval=lm_eval", "eval.lm_eval.tasks=[lmstack_arith_genn]", *QUIET, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "unknown task 'lmstack_arith_genn'" in result.stderr
    assert "did you mean lmstack_arith_gen" in result.stderr
    assert "Looked in:" in result.stderr and "lm_eval/tasks" in result.stderr
    assert "lm_eval_tasks/v1" in result.stderr
    assert "Traceback" not in result.stderr


def judge_sft_rows(path: Path, count: int) -> Path:
    """SFT rows teaching a pairwise verdict in the compact template ({prompt, completion})."""
    from lmstack.evaluation.judge import builtin_calibration_set
    from lmstack.prompts import fill, load_prompt

    template = load_prompt("judge_pairwise_compact")
    with open(path, "w") as handle:
        for row in builtin_calibration_set(count, seed=100):
            fields = {"question": row["question"], "answer_a": row["x"], "answer_b": row["y"]}
            verdict = "[[A]]" if row["label"] == "x" else "[[B]]"
            handle.write(json.dumps({"prompt": fill(template, fields), "completion": verdict}))
            handle.write("\n")
    return path


@pytest.mark.slow
def test_calibration_of_a_served_lmstack_judge_reports_the_four_figures(tmp_path):
    """A tiny lmstack model fine-tuned as a pairwise judge (150 SFT steps), served by
    `serving=hf`, judges the labelled pairs. It half learns the verdict format and none of
    the arithmetic, and mostly answers "[[A]]" whatever the order: the calibration catches it.
    Measured (12 pairs): position-bias rate 0.83, first-position rate 0.92, agreement 0.08,
    kappa 0.04, length bias +0.12, 11 of 24 verdicts unparseable ("[[]]]"). ~3 min."""
    data = judge_sft_rows(tmp_path / "judge.jsonl", 1500)
    judge_run, _ = run_one(
        "data=jsonl",
        f"data.path={data}",
        "trainer.max_steps=150",
        "trainer.checkpoint_every_n_steps=150",
        "trainer.enable_progress_bar=false",
        "verify.enabled=false",
        *QUIET,
        output_dir=tmp_path / "judge",
    )
    evaluate(
        tmp_path / "calibration",
        "eval=calibration",
        f"serving.model={judge_run}",
        "eval.judge.pairwise_prompt=judge_pairwise_compact",
        "eval.judge.calibration_size=12",
        *QUIET,
    )
    metrics = eval_metrics(tmp_path / "calibration")
    for name in ("agreement", "kappa", "position_bias_rate", "length_bias"):
        assert isinstance(metrics[f"calibration/{name}"], float), (name, metrics)
    assert metrics["calibration/n"] == 12
    assert metrics["calibration/judge_model"].endswith("merged")  # the served run
    (run_dir,) = run_dirs(tmp_path / "calibration")
    verdicts = [json.loads(line) for line in (run_dir / "calibration_verdicts.jsonl").open()]
    unparsed = sum(v == "unparsed" for row in verdicts for v in row["verdicts"])
    assert metrics["calibration/parse_failures"] == unparsed < 24, metrics  # counted, not dropped
    # it answers "[[A]]" in either order: the calibration catches the position bias
    assert metrics["calibration/position_bias_rate"] >= 0.5, metrics
    assert metrics["calibration/first_position_rate"] >= 0.75, metrics


def test_the_console_shows_a_samples_completion_however_long_its_prompt():
    """A long few-shot prompt used to fill the whole printed line: the completion (what the
    user wants to see) was cut off. The prompt is now cut in the middle, the completion kept."""
    from lmstack.evaluation.suites import console_line

    prompt = "Example: 1 + 1 = 2.\n" * 40 + "Question: what is 12 + 30?"
    line = console_line(
        {"prompt": prompt, "completion": "12 + 30 = 42", "reference": "42", "score": 1.0}
    )
    assert line.startswith("score 1.0 | prompt ")
    assert "what is 12 + 30?" in line and '"12 + 30 = 42"' in line and 'reference "42"' in line
    assert "\n" not in line and len(line) < 200
    assert console_line({"completion": "x" * 1000, "score": 0.0}).count("x") == 237
