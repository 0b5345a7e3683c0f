"""The openai client for every call lmstack makes to an OpenAI-compatible server: a judge, a
served model under evaluation, an external engine's model list. One place builds it; it does
no retries of its own, so each caller decides how often to try and what a failure means."""

from __future__ import annotations

from functools import lru_cache

import openai

# what a caller catches: the server did not answer (refused, timed out) / answered an error
Unreachable = openai.APIConnectionError
ErrorAnswer = openai.APIStatusError


@lru_cache(maxsize=32)
def client(base_url: str, api_key: str, timeout_s: float) -> openai.OpenAI:
    """One client (one connection pool, thread-safe) per server, key and timeout."""
    return openai.OpenAI(
        base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=0
    )


def model_ids(base_url: str, api_key: str, timeout_s: float) -> list[str]:
    """The ids GET /models lists."""
    return [model.id for model in client(base_url, api_key, timeout_s).models.list()]


def describe(error: Exception) -> str:
    """`HTTP 503: <body>` for an error answer, `<kind>: <message>` for no answer."""
    if isinstance(error, ErrorAnswer):
        return f"HTTP {error.status_code}: {error.response.text[:200]}"
    return f"{type(error).__name__}: {error}"
