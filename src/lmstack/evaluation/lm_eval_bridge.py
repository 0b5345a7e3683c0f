"""lm-evaluation-harness through its Python API, in process or against a served endpoint.

lmstack's own tasks (`lmstack_arith_gen`, `lmstack_arith_mc`) ship as task YAMLs in
`lm_eval_tasks/`; their data is generated locally from the built-in task and written, with a
task file that includes the shipped one, to `<cache_dir>/lm_eval_tasks/v<N>/`, so they load
offline (`dataset_path: json` + `data_files`). Any other harness task works where its data is
reachable. In process the harness gets the loaded model object (HFLM); a served model goes
through the harness's own OpenAI-compatible backends (local-chat-completions for chat
prompts, local-completions for raw text).

Deferred imports, for start-up time: lm_eval (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import difflib
import json
import logging
import random
from pathlib import Path
from typing import Any

import yaml

from lmstack.data import arith
from lmstack.errors import ConfigError, LmstackError
from lmstack.tracking.identity import stable_hash

log = logging.getLogger(__name__)

SHIPPED_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
# bump when the generated data changes: results of two versions are never mixed
DATA_VERSION = 1
TASK_SIZE = 200
TASK_SEED = 12345


def task_rows(count: int = TASK_SIZE, seed: int = TASK_SEED) -> list[dict[str, Any]]:
    """Held-out problems with the right solution among three distinct wrong ones."""
    rng = random.Random(f"lm-eval-{seed}")
    rows = []
    for problem in arith.problems(count, seed, held_out=True):
        right = problem.solution()
        choices = {right}
        while len(choices) < 4:
            choices.add(arith.wrong_solution(problem, rng))
        ordered = sorted(choices - {right})
        ordered.insert(rng.randrange(4), right)
        rows.append(
            {
                "question": problem.question,
                "answer": str(problem.answer),
                "solution": right,
                "choices": ordered,
                "label": ordered.index(right),
            }
        )
    return rows


def local_task_dir(cache_dir: str) -> Path:
    """The folder of lmstack's task files with absolute data paths (written once)."""
    target = Path(cache_dir) / "lm_eval_tasks" / f"v{DATA_VERSION}"
    data = target / "arith_test.jsonl"
    if not data.is_file():
        target.mkdir(parents=True, exist_ok=True)
        staging = data.with_suffix(".partial")
        staging.write_text("".join(json.dumps(row) + "\n" for row in task_rows()))
        staging.replace(data)
    for shipped in sorted(SHIPPED_TASKS.glob("*.yaml")):
        task_file = target / shipped.name
        text = (
            f"# written by lmstack: {shipped.name} with its local data file\n"
            f"include: {shipped}\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        )
        if not task_file.is_file() or task_file.read_text() != text:
            task_file.write_text(text)
    return target


def user_task(rows: list[Any], cache_dir: str, max_gen_toks: int) -> tuple[Path, str]:
    """(folder, task name) of a generative exact-match task written from the user's eval rows
    (their prompt text, their reference as text), keyed by the rows' content."""

    records = [{"prompt": row.text(), "reference": row.reference_text()} for row in rows]
    name = f"lmstack_user_{stable_hash([records, max_gen_toks], 10)}"
    folder = Path(cache_dir) / "lm_eval_tasks" / "user" / name
    if not (folder / f"{name}.yaml").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{reference}}",
            "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": max_gen_toks},
            "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
            ],
            "metadata": {"version": 1.0},
        }
        staging = folder / f"{name}.yaml.partial"
        staging.write_text(json.dumps(task, indent=1))  # JSON is YAML
        staging.replace(folder / f"{name}.yaml")
    return folder, name


def task_manager(tasks: list[str], include_paths: list[str], cache_dir: str):
    """A TaskManager that knows every requested task, or a ConfigError listing where the
    tasks were looked for. The harness's own (thousands of) tasks are indexed only when a
    requested task is not among lmstack's and the include paths'."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise ConfigError(f"eval.lm_eval.include_paths: '{path}' is not a folder")
    paths = [str(local_task_dir(cache_dir)), *include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(task in manager.all_tasks for task in tasks):
        return check_task_files(manager, tasks)
    manager = TaskManager(include_path=paths, include_defaults=True)
    missing = [task for task in tasks if task not in manager.all_tasks]
    if missing:
        import lm_eval.tasks

        searched = [*paths, f"{Path(lm_eval.tasks.__file__).parent} (the harness's own tasks)"]
        hints = []
        for task in missing:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hints.append(f"'{task}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        broken = unreadable_task_files(include_paths)
        raise ConfigError(
            f"eval.lm_eval.tasks: unknown task {'; '.join(hints)}. Looked in: "
            + "; ".join(searched)
            + ". Add a folder of task YAMLs with eval.lm_eval.include_paths=[...]"
            + (f". These task files cannot be read: {'; '.join(broken)}" if broken else "")
        )
    return check_task_files(manager, tasks)


def unreadable_task_files(folders: list[str]) -> list[str]:
    """`file: line N: problem` for each task YAML in the folders that does not parse (the
    harness skips such a file, so its task looks unknown)."""

    class TagTolerantLoader(yaml.SafeLoader):
        pass

    # harness task files use tags such as !function; their values do not matter here
    TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    broken = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                yaml.load(path.read_text(), Loader=TagTolerantLoader)  # a safe loader
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                line = f"line {mark.line + 1}: " if mark else ""
                problem = getattr(error, "problem", None) or str(error).splitlines()[0]
                broken.append(f"{path}: {line}{problem}")
    return broken


def check_task_files(manager: Any, tasks: list[str]) -> Any:
    """Builds every requested task once, so a broken task file fails here, before any model
    loads, with a message naming the file and what in it is wrong (the harness's own last
    complaint, which names the key, when it logged one)."""
    for task in tasks:
        complaints = HarnessComplaints()
        logging.getLogger("lm_eval").addHandler(complaints)
        try:
            manager.load([task])
        except Exception as error:  # the harness raises many kinds for a bad task file
            entry = manager.task_index.get(task)
            where = getattr(entry, "yaml_path", None) or (
                entry.get("yaml_path") if isinstance(entry, dict) else None
            )
            detail = f"{type(error).__name__}: {error}"
            if complaints.messages:
                detail += f"; lm-eval said: {complaints.messages[-1]}"
            raise ConfigError(
                f"eval.lm_eval.tasks: task '{task}' in {where or 'its task file'} cannot be "
                f"built ({detail})"
            ) from None
        finally:
            logging.getLogger("lm_eval").removeHandler(complaints)
    return manager


class HarnessComplaints(logging.Handler):
    """The harness's warnings while a task is built (they name the offending key)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def generation_override(lm_cfg: Any) -> dict[str, Any]:
    """The harness's gen_kwargs: none unless eval.lm_eval.max_gen_toks overrides the tasks'
    own generation length (said aloud, so it is never a silent override)."""
    if lm_cfg.max_gen_toks is None:
        return {}
    print(
        f"lmstack: eval.lm_eval.max_gen_toks={lm_cfg.max_gen_toks} overrides the generation "
        "length of every generative task (null keeps each task's own)",
        flush=True,
    )
    return {"max_gen_toks": lm_cfg.max_gen_toks}


def output_types(manager: Any, tasks: list[str]) -> dict[str, str]:
    """task name -> output_type (generate_until, multiple_choice, ...), for leaf tasks."""
    loaded = manager.load(tasks)
    return {name: task.OUTPUT_TYPE for name, task in loaded["tasks"].items()}


def evaluate_in_process(local: Any, lm_cfg: Any, cache_dir: str, seed: int) -> dict[str, Any]:
    """The harness on the loaded model object (base + adapter, any quantization)."""
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(list(lm_cfg.tasks), list(lm_cfg.include_paths), cache_dir)
    model = HFLM(
        pretrained=local.model,
        tokenizer=local.tokenizer,
        batch_size=lm_cfg.batch_size,
        max_length=local.model.config.max_position_embeddings,
    )
    # the harness asks for max_length = prompt + the task's max_gen_toks; a max_new_tokens in
    # the model's own generation config would win over it silently and cut every answer short
    generation = getattr(local.model, "generation_config", None)
    saved = getattr(generation, "max_new_tokens", None)
    if generation is not None:
        generation.max_new_tokens = None
    try:
        return _evaluate(model, manager, lm_cfg, seed)
    finally:
        if generation is not None:
            generation.max_new_tokens = saved


def evaluate_served(
    endpoint: Any, tokenizer_path: str, lm_cfg: Any, cache_dir: str, seed: int, concurrency: int
) -> dict[str, Any]:
    """The harness's OpenAI-compatible backends against a served model.

    Chat prompts (`apply_chat_template`) go to /chat/completions, which cannot score
    log-likelihoods: multiple-choice tasks are refused with a clear message, not skipped.
    """
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    manager = task_manager(list(lm_cfg.tasks), list(lm_cfg.include_paths), cache_dir)
    types = output_types(manager, list(lm_cfg.tasks))
    scored = sorted(name for name, kind in types.items() if kind != "generate_until")
    if scored and lm_cfg.apply_chat_template:
        raise ConfigError(
            f"eval.lm_eval.tasks: {', '.join(scored)} need prompt log-probabilities, which a "
            "chat endpoint does not return; evaluate them with eval.target=in_process "
            "(or eval.lm_eval.apply_chat_template=false on an engine whose /v1/completions "
            "echoes logprobs)"
        )
    headers = {"Authorization": f"Bearer {endpoint.api_key}"}
    if lm_cfg.apply_chat_template:
        model = LocalChatCompletion(
            base_url=f"{endpoint.base_url}/chat/completions",
            model=endpoint.model,
            num_concurrent=concurrency,
            max_retries=1,
            header=headers,
        )
    else:
        model = LocalCompletionsAPI(
            base_url=f"{endpoint.base_url}/completions",
            model=endpoint.model,
            tokenizer=tokenizer_path,
            tokenizer_backend="huggingface",
            num_concurrent=concurrency,
            max_retries=1,
            header=headers,
        )
    return _evaluate(model, manager, lm_cfg, seed)


def _evaluate(model: Any, manager: Any, lm_cfg: Any, seed: int) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    try:
        results = simple_evaluate(
            model=model,
            tasks=list(lm_cfg.tasks),
            task_manager=manager,
            num_fewshot=lm_cfg.num_fewshot,
            limit=lm_cfg.limit,
            apply_chat_template=lm_cfg.apply_chat_template,
            gen_kwargs=generation_override(lm_cfg) or None,
            bootstrap_iters=1000,
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (ConnectionError, OSError) as error:
        raise LmstackError(f"lm-eval could not reach the model: {error}") from None
    return results


def flatten(results: dict[str, Any]) -> dict[str, float]:
    """`lm_eval/<task>/<metric>[,<filter>]` -> value, for metrics.json and W&B."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, int | float) and key != "alias":
                metric, _, filter_name = key.partition(",")
                name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
                flat[f"lm_eval/{task}/{name}"] = float(value)
    return flat


def samples_table(results: dict[str, Any], limit: int = 20) -> list[dict[str, Any]]:
    """A few logged samples per task: prompt, target, response, score (for W&B and review)."""
    rows = []
    for task, samples in results.get("samples", {}).items():
        for sample in samples[:limit]:
            responses = sample.get("filtered_resps") or sample.get("resps") or []
            doc = sample.get("doc", {})
            row = {
                "task": task,
                "prompt": doc.get("question", doc.get("prompt")) or _context(sample),
                "reference": str(sample.get("target")),
                "completion": str(responses[0] if responses else ""),
                "score": sample.get("exact_match", sample.get("acc")),
            }
            if (reply := _raw_reply(sample)) is not None:
                row["reply"] = reply  # before the task's filters (completion is after them)
            rows.append(row)
    return rows


def _context(sample: dict[str, Any]) -> str:
    """The prompt the harness sent (a user task's documents have no `question` field)."""
    arguments = sample.get("arguments") or []
    if isinstance(arguments, dict):  # the harness's saved form: {"gen_args_0": {"arg_0": ...}}
        arguments = [list(args.values()) for args in arguments.values() if isinstance(args, dict)]
    first = arguments[0] if arguments else None
    context = first[0] if isinstance(first, list | tuple) and first else None
    return context if isinstance(context, str) else ""


def _raw_reply(sample: dict[str, Any]) -> str | None:
    """A generative task's reply as the model gave it; None for scored (loglikelihood) ones."""
    responses = sample.get("resps") or []
    first = responses[0] if responses else None
    if isinstance(first, list) and first and isinstance(first[0], str):
        return first[0]
    return None
