"""A/B tests through the real gateway: traffic split, sticky users, feedback, the report.

The default test puts the gateway (its own process, as always) in front of two small
OpenAI-compatible HTTP servers, one per variant (`serving.ab.variants[*].base_url`: any
OpenAI-compatible deployment), so 400 requests take seconds. The slow test serves two real
`transformers serve` engines (the built-in tiny models) through `run.py phase=serve`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest
from hydra import compose, initialize_config_dir

from lmstack.config.store import register_configs
from lmstack.errors import ConfigError
from lmstack.launch import validate
from lmstack.serving.traces import TRACE_DB_NAME, read_feedback, read_traces

from conftest import CACHE_DIR, REPO, chat_answer, openai_server, run_cli, run_dirs, run_one

CONF = REPO / "conf"
REQUESTS = 400
SPLIT_TOLERANCE = 0.075  # 3 standard deviations of a fair 50/50 split of 400 requests


def variants_override(key: str, a, b) -> str:
    """serving.ab.variants: A and B, 50/50, each with its `key` (model or base_url)."""
    return f"serving.ab.variants=[{{name: A, {key}: '{a}'}},{{name: B, {key}: '{b}'}}]"


def make_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return validate(compose(config_name="config", overrides=list(overrides)))


@contextlib.contextmanager
def variant_server(name: str):
    """An OpenAI-compatible server whose every answer says which variant it is."""

    def reply(request: dict, headers: dict) -> dict:
        assert request["model"] == f"model-{name}"  # the gateway put the variant's name
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        answer = chat_answer(f"I am {name}.", finish_reason="stop")
        return {"id": "x", "object": "chat.completion", **answer, "usage": usage}

    with openai_server(f"model-{name}", reply, protocol_version="HTTP/1.1") as url:
        yield url


def scripted_client(
    base_url: str, requests: int, user: str | None = None, feedback: bool = True
) -> dict:
    """Asks, reads the variant off the answer, and gives feedback on 9 requests in 10: thumbs
    up on 7 in 10 of B's answers and 5 in 10 of A's, in a fixed pattern."""
    seen: Counter[str] = Counter()
    rated: Counter[str] = Counter()
    ids: dict[str, str] = {}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for index in range(requests):
            headers = {"X-Lmstack-User": user} if user else {}
            body = {
                "model": "anything",
                "messages": [{"role": "user", "content": f"question {index}"}],
                "max_tokens": 2,
            }
            answer = client.post("/chat/completions", json=body, headers=headers)
            assert answer.status_code == 200, answer.text
            variant = answer.headers["x-lmstack-variant"]
            request_id = answer.headers["x-lmstack-request-id"]
            ids[request_id] = variant
            seen[variant] += 1
            if index % 10 == 9 or not feedback:
                continue  # no feedback on this one
            up = rated[variant] % 10 < (7 if variant == "B" else 5)
            rated[variant] += 1
            given = client.post(
                "/feedback", json={"request_id": request_id, "thumbs": "up" if up else "down"}
            )
            assert given.status_code == 200, given.text
    return {"counts": seen, "ids": ids, "rated": rated}


def bad_feedback(base_url: str, known_id: str) -> None:
    cases = [
        (b"{not json", 400, "body: not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"thumbs": "up"}).encode(), 400, "request_id: missing"),
        (json.dumps({"request_id": known_id}).encode(), 400, "thumbs or score"),
        (json.dumps({"request_id": known_id, "thumbs": "sideways"}).encode(), 400, "thumbs"),
        (json.dumps({"request_id": known_id, "score": "high"}).encode(), 400, "score"),
        (json.dumps({"request_id": "no-such-id", "thumbs": "up"}).encode(), 404, "no-such-id"),
    ]
    for body, status, fragment in cases:
        answer = httpx.post(f"{base_url}/feedback", content=body)
        assert answer.status_code == status, (body, answer.text)
        assert fragment in answer.json()["error"]["message"], (fragment, answer.text)


def test_ab_split_feedback_and_report_through_the_gateway(tmp_path):
    from lmstack.serving.engines import serve

    db = tmp_path / "store" / TRACE_DB_NAME
    with variant_server("A") as url_a, variant_server("B") as url_b:
        config = make_config(
            variants_override("base_url", url_a, url_b),
            f"trace.path={db}",
            "logger=none",
        )
        with serve(config, str(CACHE_DIR), tmp_path / "serving") as endpoint:
            scripted = scripted_client(endpoint.base_url, REQUESTS)
            # a user id keeps its user with one variant
            sticky = {
                user: set(scripted_client(endpoint.base_url, 5, user, feedback=False)["counts"])
                for user in ("u1", "u2", "u3", "u4", "u5", "u6")
            }
            bad_feedback(endpoint.base_url, next(iter(scripted["ids"])))
            # still serving after the bad input
            assert httpx.get(endpoint.base_url.removesuffix("/v1") + "/health").status_code == 200
    assert all(len(variants) == 1 for variants in sticky.values())
    assert len(set().union(*sticky.values())) == 2  # users land on both sides
    # the same store under another rule: refused before anything starts
    changed = make_config(
        variants_override("base_url", "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"),
        f"trace.path={db}",
        "logger=none",
        "serving.ab.promotion.min_effect=0.3",
    )
    with (
        pytest.raises(ConfigError, match="registered another rule"),
        serve(changed, str(CACHE_DIR), tmp_path / "serving-again"),
    ):
        pass

    traces = read_traces(db)
    by_id = {row["request_id"]: row for row in traces}
    assert len(traces) == REQUESTS + 6 * 5
    assert all(by_id[rid]["variant"] == variant for rid, variant in scripted["ids"].items())
    assert all(row["response"] == f"I am {row['variant']}." for row in traces)
    feedback = read_feedback(db)  # good feedback only: the bad bodies stored nothing
    assert sum(scripted["rated"].values()) == REQUESTS * 9 // 10
    assert len(feedback) == REQUESTS * 9 // 10 and feedback[0]["thumbs"] in (0, 1)

    run_dir, metrics = run_one(
        "phase=report", f"report.source={db}", "logger=none", output_dir=tmp_path / "out"
    )
    check_ab_report(metrics, run_dir)


def check_ab_report(metrics: dict, run_dir: Path) -> None:
    requests = metrics["ab/A/requests"] + metrics["ab/B/requests"]
    assert abs(metrics["ab/A/requests"] / requests - 0.5) < SPLIT_TOLERANCE
    assert metrics["ab/srm_p"] > 1e-3
    assert metrics["ab/B/feedback_mean"] > metrics["ab/A/feedback_mean"]
    assert metrics["ab/B_vs_A/diff_ci_low"] > 0  # the difference's interval excludes zero
    assert metrics["ab/B_vs_A/p"] < 0.01
    assert 0.75 < metrics["ab/A/feedback_rate"] < 0.92  # 9 in 10 (less the sticky users)
    for variant in ("A", "B"):
        assert metrics[f"ab/{variant}/latency_ms_p50"] <= metrics[f"ab/{variant}/latency_ms_p99"]
    text = (run_dir / "report.md").read_text()
    assert "## A/B test: per variant" in text and "peeking" in text
    # the rule registered when serving started (the default: thumbs, 100 per arm, one look)
    decision = json.loads((run_dir / "promotion.json").read_text())
    assert (decision["decision"], decision["winner"]) == ("promote", "B"), decision
    assert decision["ci"][0] > 0 and decision["p"] < 0.05
    assert decision["comparisons"][0]["have"][0] >= decision["rule"]["min_samples_per_arm"]
    assert metrics["ab/promotion/decision"] == "promote" and "**Decision: promote**" in text
    assert "Served as: A: " in text and metrics["ab/A/served_as"] in ("external", "own engine")
    assert (run_dir / "report_ab_feedback.png").stat().st_size > 5000


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("serving.ab.variants=[{name: A}]", "serving.ab.variants: an A/B test needs two"),
        ("serving.ab.variants=[{name: A},{name: A}]", "names repeat"),
        ("serving.ab.variants=[{name: A, weight: 0},{name: B}]", "variants[0].weight"),
        ("serving.ab.variants=[{name: A},{name: B}]", "serving.gateway"),
    ],
)
def test_ab_config_errors_name_the_key(override, fragment):
    extra = ["serving.gateway=false"] if fragment == "serving.gateway" else []
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        make_config("phase=serve", override, *extra)


@pytest.mark.slow  # two real engines start (~1 min on 2 cores) and answer 400 requests
def test_ab_between_two_served_tiny_models_400_requests(tmp_path, tiny_base, tiny_random):
    """phase=serve with two variants (the built-in base and random models, 50/50), a scripted
    client giving B thumbs up 70% of the time and A 50%, then phase=report."""
    command = [
        sys.executable,
        str(REPO / "run.py"),
        "phase=serve",
        variants_override("model", tiny_base, tiny_random),
        "logger=none",
        f"paths.output_dir={tmp_path / 'out'}",
    ]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        endpoint_file = wait_for_file(tmp_path / "out", "endpoint.json", server, tmp_path)
        base_url = json.loads(endpoint_file.read_text())["base_url"]
        scripted = scripted_client(base_url, REQUESTS)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(60)
        log.close()
    (serve_dir,) = run_dirs(tmp_path / "out")
    traces = read_traces(serve_dir / TRACE_DB_NAME)
    assert len(traces) == REQUESTS
    assert {row["request_id"]: row["variant"] for row in traces} == scripted["ids"]
    paths = defaultdict(set)
    for row in traces:
        paths[row["variant"]].add(row["served_path"])
    assert paths == {"A": {str(tiny_base)}, "B": {str(tiny_random)}}
    run_cli(
        "phase=report", f"report.source={serve_dir}", "logger=none", output_dir=tmp_path / "rep"
    )
    (report_dir,) = run_dirs(tmp_path / "rep")
    check_ab_report(json.loads((report_dir / "metrics.json").read_text()), report_dir)


def wait_for_file(folder: Path, name: str, process, tmp_path: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        found = list(folder.rglob(name))
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])


def test_a_store_from_before_ab_tests_gains_the_variant_column(tmp_path):
    import sqlite3
    from dataclasses import fields

    from lmstack.serving.traces import TraceRecord, TraceStore

    db = tmp_path / TRACE_DB_NAME
    old_columns = [f.name for f in fields(TraceRecord) if f.name != "variant"]
    with sqlite3.connect(db) as connection:
        columns = ", ".join(old_columns)
        connection.execute(f"CREATE TABLE traces (id INTEGER PRIMARY KEY, {columns})")
    values = {f.name: 0 if f.type in ("float", "int", "bool") else "" for f in fields(TraceRecord)}
    store = TraceStore(db)
    store.add(TraceRecord(**(values | {"request_id": "r1", "variant": "B"})))
    store.close()
    assert [(row["request_id"], row["variant"]) for row in read_traces(db)] == [("r1", "B")]


def test_two_proportion_test_by_hand():
    from lmstack.serving.ab import difference

    # 50/100 vs 70/100: pooled p = 0.6, se = sqrt(0.24 * 0.02) = 0.06928, z = 0.2 / se = 2.887
    result = difference([1.0] * 50 + [0.0] * 50, [1.0] * 70 + [0.0] * 30, binary=True)
    assert result["diff"] == pytest.approx(0.2) and result["z"] == pytest.approx(2.8868, abs=1e-3)
    assert result["p"] == pytest.approx(0.00389, abs=1e-4)
    # Newcombe's interval from the two Wilson intervals, 50/100: [0.4038, 0.5962] and 70/100:
    # [0.6042, 0.7810]: 0.2 - sqrt(0.0958^2 + 0.0962^2) and 0.2 + sqrt(0.0810^2 + 0.0962^2)
    assert result["diff_ci_low"] == pytest.approx(0.0642, abs=1e-3)
    assert result["diff_ci_high"] == pytest.approx(0.3258, abs=1e-3)
