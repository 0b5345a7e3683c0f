"""Scores of a completion against a row's reference answer, shared by eval and RL rewards.

A scorer maps ``(completion, reference, row)`` to a float in [0, 1]:

- ``exact``: the stripped completion equals the reference text;
- ``normalized``: equal after lower-casing, dropping punctuation, articles and extra spaces;
- ``numeric``: the last number in the completion is within ``tolerance`` of the reference
  (relative to ``max(1, |reference|)``);
- ``json_fields``: the share of the reference's fields (or of ``fields``) that the first JSON
  object in the completion has with equal values;
- ``pkg.module:function``: the user's own function with that signature (a bool counts 0/1).
"""

from __future__ import annotations

import importlib
import json
import re
import string
from collections.abc import Callable
from typing import Any

from lmstack.errors import ConfigError, DataError

Scorer = Callable[[str, Any, dict[str, Any]], float]
REFERENCE_SCORERS = ("exact", "normalized", "numeric", "json_fields")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?")
ARTICLES = re.compile(r"\b(a|an|the)\b")


def reference_text(reference: Any) -> str:
    """The reference as the text a model would write (JSON for structured references)."""
    if isinstance(reference, str):
        return reference
    return json.dumps(reference, ensure_ascii=False)


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact(completion: str, reference: Any, row: dict[str, Any] | None = None) -> float:
    return float(completion.strip() == reference_text(reference).strip())


def normalized(completion: str, reference: Any, row: dict[str, Any] | None = None) -> float:
    return float(normalize(completion) == normalize(reference_text(reference)))


def numeric_scorer(tolerance: float) -> Scorer:
    def numeric(completion: str, reference: Any, row: dict[str, Any] | None = None) -> float:
        numbers = NUMBER.findall(completion)
        target = NUMBER.findall(reference_text(reference))
        if not numbers or not target:
            return 0.0
        want = float(target[-1])
        return float(abs(float(numbers[-1]) - want) <= tolerance * max(1.0, abs(want)))

    return numeric


def first_json_object(text: str) -> Any:
    """The first JSON value that starts at a '{' in the text; None when there is none."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def json_fields_scorer(fields: list[str]) -> Scorer:
    def json_fields(completion: str, reference: Any, row: dict[str, Any] | None = None) -> float:
        expected = reference if isinstance(reference, dict) else first_json_object(str(reference))
        got = first_json_object(completion)
        if not isinstance(expected, dict) or got is None:
            return 0.0
        keys = list(fields) or list(expected)
        if not keys:
            return float(got == expected)
        return sum(k in got and got[k] == expected.get(k) for k in keys) / len(keys)

    return json_fields


def import_scorer(spec: str, key: str) -> Scorer:
    """`pkg.module:function`, imported now so a wrong path fails before any model loads."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(
            f"{key}: '{spec}' is neither a built-in scorer ({', '.join(REFERENCE_SCORERS)}) "
            "nor an import path 'pkg.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{key}: cannot import module '{module_name}' ({error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{key}: module '{module_name}' has no function '{attribute}'")

    def user_scorer(completion: str, reference: Any, row: dict[str, Any] | None = None) -> float:
        value = function(completion, reference, row or {})
        if not isinstance(value, int | float):
            raise DataError(
                f"{key}: the scorer '{spec}' returned {type(value).__name__}, not a number"
            )
        return float(value)

    return user_scorer


def build_scorer(
    name: str, key: str, tolerance: float = 1e-6, fields: list[str] | None = None
) -> Scorer:
    """The scorer `name` (a built-in one or an import path); `key` is the config key to name."""
    if name == "exact":
        return exact
    if name == "normalized":
        return normalized
    if name == "numeric":
        return numeric_scorer(tolerance)
    if name == "json_fields":
        return json_fields_scorer(list(fields or []))
    return import_scorer(name, key)


def needs_reference(name: str) -> bool:
    """Built-in scorers compare with the reference; a user's function may not need one."""
    return name in REFERENCE_SCORERS
