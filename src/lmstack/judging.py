"""Asking an LLM judge through any OpenAI-compatible endpoint: its endpoint, one greedy
question, single-answer grades and their parsing. Shared by the evaluation (lmstack.evaluation.
judge: pairwise verdicts, calibration, the judge suite) and the training objectives that take
the judge's grade as a reward (objective.rewards: name=judge), which sit beside the evaluation
and may not import it.

Deferred imports, for start-up time: openai loads inside lmstack.util.openai_api's calls.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lmstack.errors import ConfigError, LmstackError
from lmstack.prompts import PROMPT_VERSION_HEADER, prompt_version, render_messages
from lmstack.util import openai_api

RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]|Rating:\s*(\d+(?:\.\d+)?)")
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# what a pairwise verdict means for the pair (x, y) asked as (A, B) or as (B, A)
UNPARSED = "unparsed"


@dataclass
class JudgeEndpoint:
    base_url: str
    model: str
    api_key: str = "EMPTY"
    timeout_s: float = 60.0
    max_retries: int = 1
    # the config block it came from, named by errors: eval.judge, objective.rewards[0].judge
    key: str = "eval.judge"


def connect(judge_cfg: Any, served: Any = None, key: str = "eval.judge") -> JudgeEndpoint:
    """The judge's endpoint: `key`.base_url (a JudgeConfig's), or the served model under test."""
    if judge_cfg.base_url:
        base_url = judge_cfg.base_url.rstrip("/")
        api_key = os.environ.get(judge_cfg.api_key_env, "") if judge_cfg.api_key_env else ""
        if judge_cfg.api_key_env and not api_key:
            raise ConfigError(
                f"{key}.api_key_env: the environment variable {judge_cfg.api_key_env} is not set"
            )
        model = judge_cfg.model or first_model(
            base_url, api_key or "EMPTY", judge_cfg.timeout_s, key
        )
        return JudgeEndpoint(
            base_url, model, api_key or "EMPTY", judge_cfg.timeout_s, judge_cfg.max_retries, key
        )
    if served is None:
        raise ConfigError(
            f"{key}.base_url: no judge endpoint; give one (…/v1) or let the served model "
            "judge (leave it empty with a `serving` group that starts one)"
        )
    return JudgeEndpoint(
        served.base_url.rstrip("/"),
        judge_cfg.model or served.model,
        served.api_key,
        judge_cfg.timeout_s,
        judge_cfg.max_retries,
        key,
    )


def first_model(base_url: str, api_key: str, timeout_s: float, key: str = "eval.judge") -> str:
    url = f"{base_url}/models"
    try:
        models = openai_api.model_ids(base_url, api_key, timeout_s)
    except openai_api.Unreachable as error:
        raise LmstackError(
            f"{key}.base_url: the judge at {url} cannot be reached ({error}); "
            "no judge results were written"
        ) from None
    except openai_api.ErrorAnswer as error:
        models, answer = [], f"HTTP {error.status_code}"
    else:
        answer = "HTTP 200"
    if not models:
        raise LmstackError(
            f"{key}.model: {url} lists no model ({answer}); name one with {key}.model"
        )
    return models[0]


def ask(endpoint: JudgeEndpoint, messages: list[dict[str, str]], version: str, max_tokens: int):
    """The judge's reply text (greedy). Unreachable or failing after retries: LmstackError."""
    url = f"{endpoint.base_url}/chat/completions"
    judge = openai_api.client(endpoint.base_url, endpoint.api_key, endpoint.timeout_s)
    problem = ""
    for _ in range(endpoint.max_retries + 1):
        try:
            reply = judge.chat.completions.create(
                model=endpoint.model,
                messages=messages,
                max_tokens=max_tokens,
                temperature=0.0,
                extra_headers={PROMPT_VERSION_HEADER: version},
            )
        except openai_api.Unreachable as error:
            problem = f"cannot be reached ({type(error).__name__}: {error})"
            continue
        except openai_api.ErrorAnswer as error:
            problem = f"answered {openai_api.describe(error)}"
            if error.status_code < 500:
                break
            continue
        try:
            return reply.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            problem = f"answered something that is not a chat completion: {str(reply)[:200]}"
    raise LmstackError(
        f"{endpoint.key}.base_url: the judge at {url} {problem}; no judge results were written"
    )


def parse_rating(text: str) -> float | None:
    """N/10 for "Rating: [[N]]" with N in 1..10; None when there is no such rating."""
    match = RATING.search(text)
    if not match:
        return None
    value = float(match.group(1) or match.group(2))
    return value / 10 if 1 <= value <= 10 else None


def parse_verdict(text: str) -> str | None:
    """ "A", "B" or "C" (tie); None when the reply holds no verdict or contradicts itself."""
    found = set(VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


def grade(
    endpoint: JudgeEndpoint,
    rubric: Any,
    items: list[dict[str, Any]],
    max_tokens: int,
    concurrency: int,
) -> dict[str, Any]:
    """Single-answer grades of items {question, answer, reference}."""

    version = prompt_version(rubric)
    replies = run_concurrently(
        [
            lambda item=item: ask(endpoint, render_messages(rubric, item), version, max_tokens)
            for item in items
        ],
        concurrency,
    )
    ratings = [parse_rating(reply) for reply in replies]
    parsed = [r for r in ratings if r is not None]
    return {
        "ratings": ratings,
        "replies": replies,
        "score": sum(parsed) / len(parsed) if parsed else None,
        "n": len(items),
        "parse_failures": len(items) - len(parsed),
        "prompt_version": version,
    }


def run_concurrently(calls: list[Any], concurrency: int) -> list[Any]:
    """Results in call order; the first failure is raised (no partial results returned)."""

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(call) for call in calls]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
