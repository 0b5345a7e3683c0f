"""Rows from the built-in task, local jsonl/parquet files or a hub dataset.

Rows are checked before any model is loaded: a missing file, a malformed JSON
line, a row without the fields its format needs and an empty dataset each stop
the run with a message naming the file and line (or row).

Deferred imports, for start-up time: datasets and pyarrow (and the lmstack modules that load
them) are imported inside the functions that need them; the CLI's input checks import this
module first.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.config.objectives import OBJECTIVES
from lmstack.data import arith
from lmstack.errors import DataError

FORMAT_FIELDS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    # TRL's unpaired preference rows (kto): a completion with a thumbs up (true) or down (false)
    "unpaired_preference": ("prompt", "completion", "label"),
    # prompts for online RL (grpo, ppo); an optional "answer" feeds the task verifier
    "prompt": ("prompt",),
}
# fields that hold a string or a list of chat messages (TRL's conversational format)
CHAT_FIELDS = {"prompt", "completion", "chosen", "rejected"}


@dataclass
class Rows:
    """Validated rows of one format, with where they came from (for messages)."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    format: str
    origin: str
    # held-out problems of the built-in task, for the verifier
    problems: list[arith.Problem] = field(default_factory=list)


def load_rows(data: Any, objective: str) -> Rows:
    if data.source == "builtin":
        return _builtin_rows(data, objective)
    if data.source == "jsonl":
        rows, origin = _read_jsonl(Path(data.path)), data.path
    elif data.source == "parquet":
        rows, origin = _read_parquet(Path(data.path)), data.path
    else:
        rows, origin = _read_hub(data.path, data.subset, data.split), f"{data.path}[{data.split}]"
    fmt = _check_rows(rows, data.format, origin, objective)
    if data.source == "hub" and data.eval_split:
        train, held_out = rows, _read_hub(data.path, data.subset, data.eval_split)
        _check_rows(held_out, fmt, f"{data.path}[{data.eval_split}]", objective)
    elif data.eval_path:
        read = _read_jsonl if data.source == "jsonl" else _read_parquet
        train, held_out = rows, read(Path(data.eval_path))
        if held_out:  # a harvest of little traffic may hold nothing out
            _check_rows(held_out, fmt, data.eval_path, objective, evaluation=True)
    else:
        train, held_out = _split(rows, data)
    return Rows(train=train, eval=held_out, format=fmt, origin=origin)


def _builtin_rows(data: Any, objective: str) -> Rows:
    if data.task == "math":
        return _math_rows(data, objective)
    if data.task != "arith":
        raise DataError(f"data.task: unknown built-in task '{data.task}' (available: arith, math)")
    train_problems = arith.problems(data.train_size, data.seed, held_out=False)
    eval_problems = arith.problems(data.eval_size, data.seed, held_out=True)
    fmt = OBJECTIVES[objective].builtin_format if objective in OBJECTIVES else "prompt_completion"
    if fmt == "text":
        train = [{"text": arith.pretraining_text(p)} for p in train_problems]
        held_out = [{"text": arith.pretraining_text(p)} for p in eval_problems]
        return Rows(train, held_out, "text", "builtin:arith", eval_problems)
    if fmt == "preference":
        # separate seeded streams, so the held-out wrong answers do not depend on train_size
        train_rng, eval_rng = random.Random(data.seed), random.Random(data.seed + 1)
        train = [arith.preference_row(p, train_rng) for p in train_problems]
        held_out = [arith.preference_row(p, eval_rng) for p in eval_problems]
        return Rows(train, held_out, "preference", "builtin:arith", eval_problems)
    train = [arith.sft_row(p) for p in train_problems]
    held_out = [arith.sft_row(p) for p in eval_problems]
    return Rows(train, held_out, fmt, "builtin:arith", eval_problems)


def _math_rows(data: Any, objective: str) -> Rows:
    """reasoning-gym prompts with answers from the templates eval=math never asks (online RL)."""
    from lmstack.data import math_problems

    if objective not in OBJECTIVES or OBJECTIVES[objective].builtin_format != "prompt":
        raise DataError(f"data.task=math: gives prompt rows for online RL (objective=grpo), "
                        f"not for objective={objective}")  # fmt: skip
    mix = list(data.math_generators)
    key = "data.math_generators"
    train = math_problems.problems(mix, data.train_size, data.seed, False, key)
    # the validation prompts: more training-template problems, from another seed
    held = math_problems.problems(mix, data.eval_size, data.seed + 1, False, key)
    rows = [math_problems.prompt_rows(train), math_problems.prompt_rows(held)]
    return Rows(rows[0], rows[1], "prompt", "builtin:math")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    _require_file(path)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno}); "
                    "each line of a jsonl file must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}"
                )
            row["_line"] = line_number
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    _require_file(path)
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    rows = table.to_pylist()
    for index, row in enumerate(rows):
        row["_line"] = index + 1
    return rows


def _read_hub(name: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as error:
        raise DataError(
            f"data.path: could not load dataset '{name}' split '{split}': {error}"
        ) from None
    rows = [dict(row) for row in dataset]
    for index, row in enumerate(rows):
        row["_line"] = index + 1
    return rows


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"data.path: no such file: {path} (resolved to {path.resolve()})")


def row_formats(objective: str) -> tuple[str, ...]:
    """The formats an objective trains on (config/objectives.py); any format for others."""
    spec = OBJECTIVES.get(objective)
    return spec.row_formats if spec else tuple(FORMAT_FIELDS)


def detect_format(row: dict[str, Any], objective: str) -> str | None:
    formats = row_formats(objective)
    if len(formats) == 1:
        # the only choice: a row short of its fields then gets "row is missing ..."
        return formats[0]
    for fmt in formats:
        if all(key in row for key in FORMAT_FIELDS[fmt]):
            return fmt
    return None


def _check_rows(
    rows: list[dict[str, Any]], fmt: str, origin: str, objective: str, evaluation: bool = False
) -> str:
    """The rows' format (detected for "auto"), or a DataError naming the file and line;
    `evaluation`: held-out rows, where one label alone is a warning (the loss is still a
    measure; reward accuracy, which compares the labels, is not)."""
    if not rows:
        raise DataError(f"{origin}: the dataset is empty (no rows to train on)")
    if fmt == "auto":
        fmt = detect_format(rows[0], objective) or _no_format(rows[0], origin, objective)
    allowed = row_formats(objective)
    if fmt not in allowed:
        raise DataError(
            f"data.format: objective={objective} trains on {' or '.join(allowed)} rows, "
            f"not format '{fmt}'"
        )
    needed = FORMAT_FIELDS[fmt]
    for row in rows:
        missing = [key for key in needed if key not in row or row[key] in (None, "", [])]
        if missing:
            raise DataError(
                f"{origin}:{row.get('_line', '?')}: row is missing {', '.join(missing)} "
                f"(format '{fmt}' needs {', '.join(needed)})"
            )
        if fmt == "messages":
            _check_messages(row["messages"], origin, row.get("_line", "?"))
        for key in CHAT_FIELDS.intersection(needed):
            _check_chat_field(row[key], key, origin, row.get("_line", "?"))
        if "label" in needed:
            _check_label(row["label"], origin, row.get("_line", "?"))
    if "label" in needed:
        _require_both_labels(rows, origin, warn_only=evaluation)
    return fmt


def _no_format(row: dict[str, Any], origin: str, objective: str) -> str:
    wanted = " or ".join("{" + ", ".join(FORMAT_FIELDS[f]) + "}" for f in row_formats(objective))
    keys = ", ".join(key for key in row if key != "_line") or "none"
    raise DataError(
        f"{origin}:{row.get('_line', 1)}: cannot tell the row format for objective={objective}: "
        f"its fields are {keys}; expected {wanted}"
    )


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value
    )


def _check_messages(messages: Any, origin: str, line: Any) -> None:
    if not _is_message_list(messages):
        raise DataError(f"{origin}:{line}: 'messages' must be a list of {{role, content}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{origin}:{line}: 'messages' has no assistant turn to learn from")


def _check_chat_field(value: Any, key: str, origin: str, line: Any) -> None:
    """A prompt, completion, chosen or rejected answer: a string, or a list of chat
    messages (TRL's conversational format)."""
    if isinstance(value, str) or (value and _is_message_list(value)):
        return
    example = (
        '"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]'
        if key == "prompt"
        else f'"{key}": [{{"role": "assistant", "content": "..."}}]'
    )
    raise DataError(
        f"{origin}:{line}: '{key}' is {type(value).__name__} {str(value)[:60]!r}; it must be a "
        f"string or a list of {{role, content}} chat messages, e.g. {example}"
    )


def _check_label(value: Any, origin: str, line: Any) -> None:
    if not isinstance(value, bool):
        raise DataError(
            f"{origin}:{line}: 'label' is {type(value).__name__} {repr(value)[:60]}; it must be "
            "true (a desirable completion) or false (an undesirable one)"
        )


def _require_both_labels(rows: list[dict[str, Any]], origin: str, warn_only: bool) -> None:
    """KTO weighs desirable against undesirable completions: one kind alone teaches nothing."""
    desirable = sum(row["label"] for row in rows)
    if desirable not in (0, len(rows)):
        return
    counts = f"{desirable} with label true, {len(rows) - desirable} with label false"
    if warn_only:
        print(
            f"lmstack: warning: {origin}: every held-out row has the same label ({counts}): "
            "val/loss is measured, val/reward_accuracy compares nothing",
            flush=True,
        )
        return
    raise DataError(
        f"{origin}: every row has the same label ({counts}); unpaired preference rows need "
        "both desirable (true) and undesirable (false) completions"
    )


def _split(rows: list[dict[str, Any]], data: Any) -> tuple[list[dict], list[dict]]:
    """Hold out a seeded share of the rows for evaluation (at least one, if possible)."""
    if len(rows) < 2 or data.eval_fraction == 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(data.seed).shuffle(order)
    held = max(1, int(len(rows) * data.eval_fraction))
    held_set = set(order[:held])
    return [r for i, r in enumerate(rows) if i not in held_set], [rows[i] for i in sorted(held_set)]
