"""eval=mmlu: the shipped MMLU dev questions, parsed; an answer-key control through a served
endpoint; lmstack's accuracy against the lm-eval CLI's on the same model; bad input."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from lmstack.evaluation import mmlu

from conftest import CACHE_DIR, REPO, assert_rejected, assert_rejected_early, openai_server, run_cli

EVAL = ["phase=eval", "eval=mmlu", "logger=none"]


def test_the_shipped_file_gives_282_questions_over_57_subjects():
    questions = mmlu.questions()
    assert len(questions) == 282
    assert len({q.subject for q in questions}) == 57
    # four options each, but one: the flan CoT file gives the EPR question a fifth, its answer
    assert Counter(len(q.choices) for q in questions) == {4: 281, 5: 1}
    assert all(0 <= q.answer < len(q.choices) for q in questions)
    assert all(q.question and all(q.choices) for q in questions)
    assert Counter(mmlu.LETTERS[q.answer] for q in questions).keys() <= set("ABCDE")
    first = questions[0]
    assert first.subject == "abstract_algebra"
    assert first.choices == ("True, True", "False, False", "True, False", "False, True")
    assert mmlu.LETTERS[first.answer] == "C"
    # every subject has its group from the harness's own task files
    groups = mmlu.subject_groups()
    assert {q.subject for q in questions} <= groups.keys()
    assert Counter(groups.values()) == {
        "stem": 19,
        "humanities": 13,
        "social_sciences": 12,
        "other": 13,
    }


def test_shots_are_other_questions_of_the_same_subject():
    anatomy = [q for q in mmlu.questions() if q.subject == "anatomy"]
    rows = mmlu.task_rows(anatomy, shots=3)
    for question, row in zip(anatomy, rows):
        assert row["preamble"].startswith(
            "The following are multiple choice questions (with answers) about anatomy.\n\n"
        )
        assert row["preamble"].count("\nAnswer: ") == 3
        assert question.question not in row["preamble"]


def answer_key_server(tokenizer):
    """/v1/completions with echo+logprobs, as vLLM answers lm-eval: every token certain,
    except the last one of a wrong option (the answer key as the model)."""
    key = {mmlu.prompt_text(q): mmlu.LETTERS[q.answer] for q in mmlu.questions()}
    seen = []

    def reply(body, headers):
        assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 1
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        choices = []
        for index, ids in enumerate(prompts):
            text = tokenizer.decode(ids)
            asked, _, letter = text.rpartition(" ")
            matches = [prompt for prompt in key if asked.endswith(prompt)]
            right = max(matches, key=len) if matches else None
            seen.append(letter)
            logprobs = [0.0] * len(ids) + [0.0]  # the prompt's tokens and one generated
            if right is None or key[right] != letter:
                logprobs[len(ids) - 1] = -5.0
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": {
                        "token_logprobs": logprobs,
                        "top_logprobs": [{"x": 0.0}] * len(logprobs),
                    },
                }
            )
        return {"choices": choices}

    return reply, seen


def test_the_answer_key_as_the_model_scores_one(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    reply, seen = answer_key_server(AutoTokenizer.from_pretrained(tiny_base))
    with openai_server("answer-key", reply) as base_url:
        run_cli(
            *EVAL,
            "eval.target=served",
            "serving=external",
            f"serving.base_url={base_url}",
            "serving.served_model_name=answer-key",
            "eval.concurrency=8",
            output_dir=tmp_path,
        )
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["mmlu/acc"] == 1.0 and metrics["mmlu/n"] == 282
    assert metrics["eval/score"] == 1.0
    for group, n in {"stem": 94, "humanities": 64, "social_sciences": 60, "other": 64}.items():
        assert metrics[f"mmlu/{group}/acc"] == 1.0 and metrics[f"mmlu/{group}/n"] == n
    assert metrics["mmlu/ci_low"] == metrics["mmlu/ci_high"] == 1.0
    assert sorted(set(seen)) == list("ABCDE")  # every option was scored, not only the key's
    samples = [json.loads(line) for line in metrics_file.with_name("mmlu_samples.jsonl").open()]
    assert len(samples) == 282 and all(s["completion"] == s["reference"] for s in samples)


@pytest.mark.e2e
def test_accuracy_equals_the_lm_eval_cli_on_the_same_model(tmp_path, tiny_base):
    run_cli(*EVAL, "eval.mmlu.batch_size=16", output_dir=tmp_path / "lmstack")
    (metrics_file,) = (tmp_path / "lmstack").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    task = metrics["mmlu/task"]
    folder = CACHE_DIR / "lm_eval_tasks" / "mmlu" / task
    cli = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "lm_eval"),
            "--model", "hf",
            "--model_args", f"pretrained={tiny_base}",
            "--tasks", task,
            "--include_path", str(folder),
            "--batch_size", "16",
            "--device", "cpu",
            "--output_path", str(tmp_path / "cli"),
        ],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    (results_file,) = (tmp_path / "cli").rglob("results_*.json")
    harness = json.loads(results_file.read_text())["results"][task]
    assert harness["acc,none"] == metrics["mmlu/acc"]
    assert 0.0 < metrics["mmlu/acc"] < 1.0  # a real model's figure, not a degenerate one


def test_an_unknown_subject_is_named(tmp_path):
    result = run_cli(
        *EVAL, "eval.mmlu.subjects=[astronomy,astronmy]", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, "eval.mmlu.subjects", "'astronmy'", "did you mean astronomy")


def test_an_engine_without_prompt_logprobs_is_refused(tmp_path):
    started = time.monotonic()
    result = run_cli(*EVAL, "eval.target=served", "serving=hf", output_dir=tmp_path, check=False)
    assert_rejected(result, "eval=mmlu", "serving=hf", "log-probabilities", "serving=vllm",
                    "eval.target=in_process")  # fmt: skip
    assert not list(Path(tmp_path).rglob("mmlu_samples.jsonl"))
    assert time.monotonic() - started < 120


@pytest.mark.real_model
def test_smollm2_prints_its_accuracy_with_an_interval(tmp_path):
    result = run_cli(*EVAL, "model=smollm2_135m", output_dir=tmp_path, timeout=1800)
    assert "MMLU accuracy" in result.stdout and "95% CI" in result.stdout
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["mmlu/n"] == 282
    assert metrics["mmlu/ci_low"] <= metrics["mmlu/acc"] <= metrics["mmlu/ci_high"]
    print(f"SmolLM2-135M-Instruct MMLU (282 dev questions, 0-shot): {metrics['mmlu/acc']:.4f} "
          f"[{metrics['mmlu/ci_low']:.4f}, {metrics['mmlu/ci_high']:.4f}]")  # fmt: skip
