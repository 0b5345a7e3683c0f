"""The user's own evaluation rows (`eval.data`): prompts, optional references and contexts.

A row of a jsonl/parquet file or hub split is one of

- ``{"prompt": "...", "reference": ..., "context": "...", "metadata": {...}}`` (``question``
  may stand for ``prompt``; ``answer`` or ``completion`` for ``reference``);
- ``{"prompt": [chat messages]}``: the messages are the prompt as they are;
- ``{"messages": [...]}``, an SFT row: the turns before the last assistant turn are the
  prompt and that turn is the reference (a chat ending in a user turn has no reference).

A reference may be text or any JSON value (a dict for JSON answers). Other fields go into
``metadata`` and are available to the prompt template and a user's scorer. Rows are checked
when loaded: a malformed line, a row without a prompt, a bad message list each stop the run
naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.data.scoring import reference_text
from lmstack.data.sources import _read_hub, _read_jsonl, _read_parquet
from lmstack.errors import DataError

PROMPT_KEYS = ("prompt", "question")
REFERENCE_KEYS = ("reference", "answer", "completion")
KNOWN_KEYS = {*PROMPT_KEYS, *REFERENCE_KEYS, "messages", "context", "metadata", "_line"}


@dataclass
class EvalRow:
    # a string (filled into the prompt group's template as {question}) or chat messages
    prompt: str | list[dict[str, str]]
    reference: Any = None
    context: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int | str = "?"

    def text(self) -> str:
        """The prompt as one text: the string, or the last user message of a chat."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else self.prompt[-1]["content"]

    def fields(self) -> dict[str, Any]:
        """What the target renders: template fields, or the messages themselves."""
        if isinstance(self.prompt, list):
            return {"messages": self.prompt, "question": self.text()}
        return {**self.metadata, "question": self.prompt}

    def reference_text(self) -> str:
        return "" if self.reference is None else reference_text(self.reference)

    def record(self) -> dict[str, Any]:
        """The row as it goes into a samples file."""
        return {
            "line": self.line,
            "prompt": self.prompt,
            "reference": self.reference,
            **({"context": self.context} if self.context else {}),
            **({"metadata": self.metadata} if self.metadata else {}),
        }


def resolve_source(path: str, source: str) -> str:
    if source != "auto":
        return source
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "hub"


def read_raw_rows(path: str, source: str, subset: str | None, split: str) -> tuple[list[dict], str]:
    source = resolve_source(path, source)
    if source == "jsonl":
        return _read_jsonl(Path(path)), path
    if source == "parquet":
        return _read_parquet(Path(path)), path
    return _read_hub(path, subset, split), f"{path}[{split}]"


def load_eval_rows(data_cfg: Any, key: str = "eval.data.path") -> tuple[list[EvalRow], str]:
    """(rows, origin) of `eval.data`; every row checked, the first `limit` kept."""
    is_file = resolve_source(data_cfg.path, data_cfg.source) != "hub"
    if is_file and not Path(data_cfg.path).is_file():
        raise DataError(f"{key}: no such file: {data_cfg.path}")
    raw, origin = read_raw_rows(data_cfg.path, data_cfg.source, data_cfg.subset, data_cfg.split)
    rows = [parse_row(row, origin) for row in raw]
    if data_cfg.limit is not None:
        rows = rows[: data_cfg.limit]
    if not rows:
        raise DataError(f"{origin}: no evaluation rows ({key})")
    return rows, origin


def parse_row(row: dict[str, Any], origin: str) -> EvalRow:
    line = row.get("_line", "?")
    where = f"{origin}:{line}"
    reference = next((row[k] for k in REFERENCE_KEYS if row.get(k) is not None), None)
    if "messages" in row and not any(k in row for k in PROMPT_KEYS):
        prompt, from_chat = split_chat(row["messages"], where)
        reference = reference if reference is not None else from_chat
    else:
        prompt = next((row[k] for k in PROMPT_KEYS if row.get(k) not in (None, "")), None)
        if prompt is None:
            keys = ", ".join(k for k in row if k != "_line") or "none"
            raise DataError(
                f"{where}: row has no 'prompt' (its fields are {keys}); an eval row needs "
                "'prompt' (text or chat messages) or 'messages'"
            )
        if isinstance(prompt, list):
            check_messages(prompt, where)
        elif not isinstance(prompt, str):
            raise DataError(f"{where}: 'prompt' must be text or a list of chat messages")
    context = row.get("context")
    if context is not None and not isinstance(context, str):
        raise DataError(f"{where}: 'context' must be text, got {type(context).__name__}")
    metadata = dict(row.get("metadata") or {})
    metadata |= {k: v for k, v in row.items() if k not in KNOWN_KEYS}
    return EvalRow(prompt, reference, context or None, metadata, line)


def check_messages(messages: Any, where: str) -> None:
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
            for m in messages
        )
    ):
        raise DataError(f"{where}: chat messages must be a non-empty list of {{role, content}}")


def split_chat(messages: Any, where: str) -> tuple[list[dict[str, str]], str | None]:
    """(prompt turns, reference): a chat ending in an assistant turn has that as reference."""
    check_messages(messages, where)
    if messages[-1]["role"] == "assistant":
        if len(messages) == 1:
            raise DataError(f"{where}: 'messages' has only an assistant turn, no prompt")
        return messages[:-1], messages[-1]["content"]
    return messages, None


def require_references(rows: list[EvalRow], origin: str, why: str) -> None:
    for row in rows:
        if row.reference is None:
            raise DataError(
                f"{origin}:{row.line}: row has no 'reference' (or 'answer', 'completion', a "
                f"final assistant turn), which {why} compares against"
            )


def few_shot_turns(rows: list[EvalRow], count: int, origin: str) -> list[dict[str, Any]]:
    """The first `count` rows as solved examples: [{question, answer}] for the prompt group."""
    shots = rows[:count]
    if len(shots) < count:
        raise DataError(f"{origin}: eval.data.shots={count} but the file has {len(shots)} rows")
    require_references(shots, origin, "a few-shot example")
    return [{"question": row.text(), "answer": row.reference_text()} for row in shots]
