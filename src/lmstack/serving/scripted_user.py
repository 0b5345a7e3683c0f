"""A scripted user for traffic through the gateway: thumbs on each answer by a rule, sent as
a real user's would be (POST /v1/feedback with the answer's x-lmstack-request-id).

Rules (bench.feedback): correct, up when the answer's number is the prompt's reference
answer (the built-in task's, or a prompt row's "answer"; the arithmetic verifier's reading);
json_key, up when the answer is a JSON object holding bench.feedback_key (the whole answer,
or its one fenced code block, as an application's parser would take it); regex, up when
bench.feedback_regex is found in it; random, up at bench.feedback_rate whatever the answer
says (an indifferent user, seeded). It stands in for
real users in the demo and the tests (phase=bench as the traffic source of the flywheel):
real users send the same feedback from their application.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from lmstack.data.arith import extract_answer


def likes(answer: str, reference: str | None, bench: Any, rng: random.Random) -> bool:
    if bench.feedback == "correct":
        found = extract_answer(answer)
        return found is not None and str(found) == reference
    if bench.feedback == "random":
        return rng.random() < bench.feedback_rate
    if bench.feedback == "regex":
        return re.search(bench.feedback_regex, answer) is not None
    try:
        value = json.loads(unfenced(answer))
    except ValueError:
        return False
    return isinstance(value, dict) and bench.feedback_key in value


FENCED = re.compile(r"^```[\w-]*\s*(.*?)\s*```$", re.DOTALL)


def unfenced(answer: str) -> str:
    """The answer, or the body of the code block that is the whole answer (```json ... ```)."""
    text = answer.strip()
    match = FENCED.match(text)
    return match.group(1) if match else text


def give_feedback(
    results: list[Any], references: list[str | None], endpoint: Any, bench: Any
) -> dict[str, Any]:
    """Thumbs on every answered request (references: each request's reference answer, for
    the correct rule); returns bench/feedback_* figures."""
    import httpx

    rng = random.Random(bench.seed)
    url = f"{endpoint.base_url.rstrip('/')}/feedback"
    headers = {"Authorization": f"Bearer {endpoint.api_key}"}
    up = down = refused = 0
    with httpx.Client(timeout=30) as client:
        for result, reference in zip(results, references, strict=True):
            if not (result.ok and result.request_id):
                continue
            liked = likes(result.text, reference, bench, rng)
            body = {"request_id": result.request_id, "thumbs": "up" if liked else "down"}
            answer = client.post(url, json=body, headers=headers)
            if answer.status_code >= 400:
                refused += 1
                continue
            up, down = up + liked, down + (not liked)
    rated = up + down
    return {
        "bench/feedback_given": rated,
        "bench/feedback_refused": refused,
        "bench/thumbs_up_rate": up / rated if rated else None,
    }
