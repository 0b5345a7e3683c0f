"""Output format checks: the share of answers that match a regex or satisfy a JSON schema.

Deferred imports, for start-up time: jsonschema (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError


def compile_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(
            f"eval.format.regex: '{pattern}' is not a valid regex ({error})"
        ) from None


def load_schema(spec: str) -> dict[str, Any]:
    """A JSON schema given inline (starts with '{') or as a file path."""
    import jsonschema

    text = spec if spec.lstrip().startswith("{") else _read(spec)
    try:
        schema = json.loads(text)
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except (json.JSONDecodeError, jsonschema.SchemaError) as error:
        raise ConfigError(f"eval.format.json_schema: not a valid JSON schema ({error})") from None
    return schema


def _read(path: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"eval.format.json_schema: no file '{path}' (give a path or inline JSON)")
    return Path(path).read_text()


def json_compliant(answer: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(answer), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def compliance(
    answers: list[str], regex: str = "", json_schema: str = ""
) -> tuple[dict[str, Any], dict[str, list[bool]]]:
    """(compliance rates (0..1) with a few failing examples, each check's per-answer pass)."""
    result: dict[str, Any] = {}
    checks = []
    if regex:
        pattern = compile_regex(regex)
        checks.append(("regex", lambda a: pattern.search(a) is not None))
    if json_schema:
        schema = load_schema(json_schema)
        checks.append(("json_schema", lambda a: json_compliant(a, schema)))
    passes: dict[str, list[bool]] = {}
    for name, check in checks:
        passed = [check(answer) for answer in answers]
        passes[f"{name}_ok"] = passed
        result[f"{name}_rate"] = sum(passed) / len(answers) if answers else None
        result[f"{name}_failures"] = [a for a, ok in zip(answers, passed) if not ok][:3]
    every = [all(p[i] for p in passes.values()) for i in range(len(answers))]
    result["rate"] = sum(every) / len(answers) if answers else None
    result["n"] = len(answers)
    return result, passes
