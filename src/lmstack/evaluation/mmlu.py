"""eval=mmlu: MMLU, offline, as log-likelihood multiple choice through lm-eval.

The data: the 282 MMLU dev questions (57 subjects, 4 or 5 each) that the lm-eval wheel ships
as chain-of-thought few-shot text (`lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json`).
Each question, its options and the answer letter are parsed out of that text; the reasoning
is dropped. One question (college_chemistry, the EPR spectrum of the 13C methyl radical) has
five options there, (E) being the answer; it is kept as written.

The task: lm-eval's own MMLU prompt (`tasks/mmlu/default`): the subject's description, the
question, `A. ...` per option and `Answer:`, scored by the log-likelihood of " A", " B", ...;
zero-shot by default, or `eval.mmlu.shots` solved questions of the same subject (never the
asked one). It is written as a local task (`dataset_path: json` + `data_files`, as
lm_eval_bridge writes its own) and run through the bridge: in process (HFLM on the loaded
model) or served (lm-eval's local-completions, which needs prompt log-probs: vLLM, or an
external server that returns them). No chat template: MMLU scores the raw prompt.

Each subject's group (STEM, humanities, social sciences, other) is read from the harness's
own MMLU task files. Accuracy overall and per group comes with a seeded bootstrap interval.

Deferred imports, for start-up time: lm_eval is imported inside the functions that need it
(the bridge's); the CLI's input checks import this module first.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from lmstack.config.groups.eval import LmEvalConfig
from lmstack.config.groups.eval_mmlu import MMLUConfig
from lmstack.config.groups.serving import ENGINE_RECORDS
from lmstack.errors import ConfigError, DataError
from lmstack.evaluation import lm_eval_bridge
from lmstack.evaluation.suites import Inputs, Session, Suite, register
from lmstack.tracking.identity import stable_hash

SOURCE = "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
GROUP_FILES = "tasks/mmlu/default"
GROUPS = ("stem", "humanities", "social_sciences", "other")
LETTERS = "ABCDE"
# bump when the rows or the task file change: results of two versions are never mixed
TASK_VERSION = 1

QUESTION_START = re.compile(r"(?:^|\n\n)Q: ")
OPTIONS = re.compile(r"\n(\(A\) .*?)\nA: ", re.S)
OPTION = re.compile(r"\(([A-E])\) (.*?)(?=\s*\([A-E]\) |\Z)", re.S)
ANSWER = re.compile(r"[Tt]he answer is \(([A-E])\)")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def harness_dir() -> Path:
    """The installed lm_eval package folder (found without importing it: seconds saved)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "eval=mmlu: the lm-eval wheel is not installed (it ships the MMLU questions and "
            "runs them); install lmstack's dependencies (`make install`, or pip install lm-eval)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def questions() -> tuple[Question, ...]:
    """Every question of the shipped file, subjects in file order."""
    path = harness_dir() / SOURCE
    if not path.is_file():
        raise ConfigError(
            f"eval=mmlu: {path} is missing from the installed lm-eval; lmstack reads the MMLU "
            "dev questions from it (lm-eval 0.4.x ships it: reinstall lm-eval)"
        )
    shipped = json.loads(path.read_text())
    return tuple(q for subject, text in shipped.items() for q in parse_subject(subject, text))


def parse_subject(subject: str, text: str) -> list[Question]:
    """The `Q: ... (A) ... A: ... The answer is (X).` blocks of one subject's few-shot text."""
    parsed = []
    for index, block in enumerate(QUESTION_START.split(text.strip())[1:]):
        options = OPTIONS.search(block)
        answers = ANSWER.findall(block)
        if options is None or len(answers) != 1:
            raise DataError(
                f"{SOURCE}: {subject}, question {index + 1}: no options or answer letter found "
                "(the lm-eval wheel's file has changed shape; pin lm-eval to a 0.4.x release)"
            )
        letters_and_text = OPTION.findall(options.group(1))
        letters = "".join(letter for letter, _ in letters_and_text)
        if letters != LETTERS[: len(letters)] or answers[0] not in letters:
            raise DataError(f"{SOURCE}: {subject}, question {index + 1}: options {letters}")
        parsed.append(
            Question(
                subject,
                block[: options.start()].strip(),
                tuple(option.strip() for _, option in letters_and_text),
                letters.index(answers[0]),
            )
        )
    return parsed


@cache
def subject_groups() -> dict[str, str]:
    """subject -> stem | humanities | social_sciences | other, from the tag of each subject's
    task file in the harness's default MMLU tasks (`tag: mmlu_stem_tasks`)."""
    groups = {}
    for path in sorted((harness_dir() / GROUP_FILES).glob("mmlu_*.yaml")):
        task = yaml.safe_load(path.read_text())
        tag = str(task.get("tag", ""))
        group = tag.removeprefix("mmlu_").removesuffix("_tasks")
        if group in GROUPS and task.get("dataset_name"):
            groups[task["dataset_name"]] = group
    return groups


def selected(mmlu_cfg: Any) -> list[Question]:
    """The questions of eval.mmlu.subjects (all when empty), the first eval.mmlu.limit."""
    every = questions()
    known = list(dict.fromkeys(q.subject for q in every))
    for name in mmlu_cfg.subjects:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise ConfigError(
                f"eval.mmlu.subjects: unknown subject '{name}'"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; the 57 subjects: {', '.join(known)}"
            )
    wanted = set(mmlu_cfg.subjects) or set(known)
    chosen = [q for q in every if q.subject in wanted]
    return chosen[: mmlu_cfg.limit] if mmlu_cfg.limit else chosen


def task_rows(chosen: list[Question], shots: int) -> list[dict[str, Any]]:
    """One lm-eval document per question; `preamble` holds the subject's description and the
    solved questions shown before it (the first `shots` others of its subject, file order)."""
    by_subject: dict[str, list[Question]] = {}
    for q in questions():
        by_subject.setdefault(q.subject, []).append(q)
    groups = subject_groups()
    rows = []
    for q in chosen:
        solved = [other for other in by_subject[q.subject] if other != q][:shots]
        description = (
            "The following are multiple choice questions (with answers) about "
            f"{q.subject.replace('_', ' ')}.\n\n"
        )
        rows.append(
            {
                "subject": q.subject,
                "group": groups.get(q.subject, "other"),
                "preamble": description + "".join(solved_text(s) for s in solved),
                "question": q.question,
                "choices": list(q.choices),
                "letters": list(LETTERS[: len(q.choices)]),
                "answer": q.answer,
            }
        )
    return rows


def prompt_text(q: Question) -> str:
    """lm-eval's MMLU prompt of one question, up to `Answer:`."""
    options = "".join(f"{LETTERS[i]}. {choice}\n" for i, choice in enumerate(q.choices))
    return f"{q.question.strip()}\n{options}Answer:"


def solved_text(q: Question) -> str:
    return f"{prompt_text(q)} {LETTERS[q.answer]}\n\n"


# lm-eval's default MMLU template (tasks/mmlu/default/_default_template_yaml), with a loop for
# the options (one question has five) and the per-row preamble (description, shots)
DOC_TO_TEXT = (
    "{{preamble}}{{question.strip()}}\n"
    "{% for choice in choices %}{{letters[loop.index0]}}. {{choice}}\n{% endfor %}Answer:"
)


def write_task(rows: list[dict[str, Any]], cache_dir: str) -> tuple[Path, str]:
    """(folder, task name) of the local multiple-choice task, keyed by its rows' content."""
    name = f"lmstack_mmlu_{stable_hash([TASK_VERSION, rows], 10)}"
    folder = Path(cache_dir) / "lm_eval_tasks" / "mmlu" / name
    if not (folder / f"{name}.yaml").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "questions.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": DOC_TO_TEXT,
            "doc_to_choice": "letters",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": float(TASK_VERSION)},
        }
        staging = folder / f"{name}.yaml.partial"
        staging.write_text(json.dumps(task, indent=1))  # JSON is YAML
        staging.replace(folder / f"{name}.yaml")
    return folder, name


def harness_settings(eval_cfg: Any, cache_dir: str) -> LmEvalConfig:
    """The bridge's settings for the written task: zero-shot in lm-eval's sense (the shots
    are in each row's preamble), raw text."""
    mmlu_cfg = eval_cfg.mmlu
    folder, name = write_task(task_rows(selected(mmlu_cfg), mmlu_cfg.shots), cache_dir)
    return LmEvalConfig(
        tasks=[name],
        include_paths=[str(folder)],
        num_fewshot=0,
        batch_size=mmlu_cfg.batch_size,
        apply_chat_template=False,
    )


def check_mmlu(eval_cfg: Any, inputs: Inputs) -> None:
    settings = harness_settings(eval_cfg, inputs.cache_dir)
    lm_eval_bridge.task_manager(settings.tasks, settings.include_paths, inputs.cache_dir)


def require_prompt_logprobs(engine: str) -> None:
    # lm-eval's local-completions scores choices with the prompt's log-probs (the engine
    # record's prompt_logprobs); transformers serve and llama.cpp's server return none
    if not ENGINE_RECORDS[engine].prompt_logprobs:
        raise ConfigError(
            f"eval=mmlu with eval.target=served: the {engine} engine (serving={engine}) returns "
            "no log-probabilities of the prompt, which MMLU's multiple choice is scored by; "
            "use eval.target=in_process (the same model in this process) or serving=vllm"
        )


def run_harness(session: Session, settings: LmEvalConfig) -> dict[str, Any]:
    if session.target.kind == "served":
        from lmstack.models.loading import resolve_base_path

        require_prompt_logprobs(session.config.serving.name)
        return lm_eval_bridge.evaluate_served(
            session.endpoint,
            resolve_base_path(session.config.model, session.cache_dir),
            settings,
            session.cache_dir,
            session.eval.seed,
            session.eval.concurrency,
        )
    return lm_eval_bridge.evaluate_in_process(
        session.target.local, settings, session.cache_dir, session.eval.seed
    )


def suite_mmlu(session: Session) -> dict[str, Any]:
    if session.target.kind == "served":
        require_prompt_logprobs(session.config.serving.name)  # before the task is written
    settings = harness_settings(session.eval, session.cache_dir)
    results = run_harness(session, settings)
    task = settings.tasks[0]
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    records = [sample_record(s) for s in samples]
    session.samples("mmlu", records)
    harness_acc = results["results"][task]["acc,none"]
    metrics = accuracy_figures(
        records, session.eval.mmlu.bootstrap_rounds, session.eval.confidence, session.eval.seed
    )
    if abs(metrics["mmlu/acc"] - harness_acc) > 1e-9:  # the same documents, the same scores
        raise AssertionError(f"mmlu: {metrics['mmlu/acc']} != lm-eval's acc {harness_acc}")
    print(summary_line(metrics, session.eval.confidence), flush=True)
    return metrics | {
        "mmlu/shots": session.eval.mmlu.shots,
        "mmlu/task": task,
        "mmlu/task_version": str((results.get("versions") or {}).get(task)),
    }


def sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    """One question's result: the option the model's log-likelihoods pick, and each one."""
    doc = sample["doc"]
    loglikelihoods = [float(response[0]) for response in sample["filtered_resps"]]
    picked = max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__)
    return {
        "subject": doc["subject"],
        "group": doc["group"],
        "prompt": doc["question"],
        "choices": doc["choices"],
        "reference": doc["letters"][doc["answer"]],
        "completion": doc["letters"][picked],
        "score": float(sample["acc"]),
        "loglikelihoods": loglikelihoods,
    }


def accuracy_figures(
    records: list[dict[str, Any]], rounds: int, confidence: float, seed: int
) -> dict[str, Any]:
    """mmlu/acc, mmlu/<group>/acc, each with n and a percentile bootstrap interval."""
    figures: dict[str, Any] = {}
    parts = [("mmlu", records)] + [
        (f"mmlu/{group}", [r for r in records if r["group"] == group]) for group in GROUPS
    ]
    for prefix, part in parts:
        scores = [r["score"] for r in part]
        low, high = bootstrap_interval(scores, rounds, confidence, f"{seed}-{prefix}")
        figures |= {
            f"{prefix}/acc": sum(scores) / len(scores) if scores else None,
            f"{prefix}/ci_low": low,
            f"{prefix}/ci_high": high,
            f"{prefix}/n": len(scores),
        }
    return figures


def bootstrap_interval(
    scores: list[float], rounds: int, confidence: float, seed: str
) -> tuple[float | None, float | None]:
    """Percentile interval of the mean over `rounds` resamples of the questions (seeded)."""
    if not scores:
        return None, None
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(rounds))
    tail = (1 - confidence) / 2
    return means[int(tail * (rounds - 1))], means[round((1 - tail) * (rounds - 1))]


def summary_line(metrics: dict[str, Any], confidence: float) -> str:
    def figure(prefix: str) -> str:
        acc, low, high = (metrics[f"{prefix}/{k}"] for k in ("acc", "ci_low", "ci_high"))
        return f"{acc:.3f} [{low:.3f}, {high:.3f}] (n={metrics[f'{prefix}/n']})"

    groups = [g for g in GROUPS if metrics[f"mmlu/{g}/n"]]
    return f"lmstack: MMLU accuracy {figure('mmlu')}, {confidence:.0%} CI; " + "; ".join(
        f"{g} {figure(f'mmlu/{g}')}" for g in groups
    )


register(
    Suite(
        "mmlu",
        suite_mmlu,
        "mmlu/acc",
        rank=25,
        needs=("answers",),
        check=check_mmlu,
        schema=MMLUConfig,
        options_key="mmlu",
    )
)
