"""The gateway under unlucky and hostile traffic: its limits answer with HTTP's own status
codes and it goes on serving; pooled engine connections the engine closed are retried;
an engine that dies half way through an answer ends it in a way the client reads.

A real gateway process in front of a real HTTP engine process (tests/fast_engine.py, which
answers at once and closes keep-alive connections rudely when asked); raw sockets for what
no well-behaved client sends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmstack.serving.exchange import hash_of_prompt
from lmstack.serving.processes import free_port, start_process, stop_process, wait_until_healthy
from lmstack.serving.traces import read_traces

FAST_ENGINE = Path(__file__).with_name("fast_engine.py")
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@contextlib.contextmanager
def engine_process(tmp_path: Path, *options: str):
    port = free_port()
    log = tmp_path / f"engine-{port}.log"
    process = start_process([sys.executable, str(FAST_ENGINE), f"--port={port}", *options], log)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}/health", 30, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(process)


@contextlib.contextmanager
def gateway_process(tmp_path: Path, upstream: str, **limits):
    port = free_port()
    log = tmp_path / f"gateway-{port}.log"
    command = [sys.executable, "-m", "lmstack.serving.gateway", f"--upstream={upstream}"]
    command += [f"--trace-db={tmp_path / 'traces.sqlite'}", f"--port={port}"]
    command += ["--served-name=fast", f"--limits={json.dumps(limits)}"]
    process = start_process(command, log)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}/health", 30, log, "the gateway")
        yield port, process
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with engine_process(tmp_path_factory.mktemp("engine")) as url:
        yield url


@pytest.fixture(scope="module")
def strict_gateway(engine, tmp_path_factory):
    """Tight limits, so each is reached with a few bytes or seconds."""
    limits = {
        "max_request_line_bytes": 1024,
        "max_header_bytes": 4096,
        "max_headers": 20,
        "max_body_bytes": 100_000,
        "header_timeout_s": 0.5,
        "body_timeout_s": 0.5,
        "keep_alive_timeout_s": 1.0,
        "max_connections": 8,
        "retry_after_s": 3,
    }
    with gateway_process(tmp_path_factory.mktemp("gateway"), engine, **limits) as (port, _):
        yield port


def raw_exchange(port: int, data: bytes, wait_s: float = 5.0, half_close: bool = False) -> bytes:
    """Send `data` on a new connection; everything the gateway answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def assert_still_serves(port: int) -> None:
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"].startswith("w0")


def chat_request(body: bytes, extra_headers: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + extra_headers
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


def test_too_many_headers_and_one_huge_header_get_431(strict_gateway):
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(2000))
    answer = raw_exchange(strict_gateway, chat_request(json.dumps(CHAT).encode(), many))
    assert status_of(answer) == 431
    assert b"serving.limits.max_headers" in answer
    huge = b"x-big: " + b"a" * 1_000_000 + b"\r\n"
    started = time.monotonic()
    answer = raw_exchange(strict_gateway, chat_request(json.dumps(CHAT).encode(), huge))
    assert status_of(answer) == 431
    assert b"serving.limits.max_header_bytes" in answer
    assert time.monotonic() - started < 3  # refused as it arrived, not after buffering it all
    assert_still_serves(strict_gateway)


def test_a_pipelined_request_over_a_limit_is_refused_after_the_answer_before_it(strict_gateway):
    good = chat_request(json.dumps(CHAT).encode(), b"connection: keep-alive\r\n")
    bad = chat_request(b"{}", b"".join(b"x-h%d: v\r\n" % i for i in range(50)))
    answer = raw_exchange(strict_gateway, good + good + bad)
    statuses = [int(part[:3]) for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 200, 431], answer[-400:]
    assert_still_serves(strict_gateway)


def test_a_long_request_line_gets_414(strict_gateway):
    answer = raw_exchange(strict_gateway, b"GET /v1/models?q=" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 414
    assert b"max_request_line_bytes" in answer
    assert_still_serves(strict_gateway)


def test_a_body_over_the_limit_gets_413_from_its_content_length_alone(strict_gateway):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 67108864\r\n\r\n"
    started = time.monotonic()
    answer = raw_exchange(strict_gateway, head)  # not one byte of the 64 MB body is sent
    assert status_of(answer) == 413
    assert time.monotonic() - started < 1.0
    assert b"max_body_bytes" in answer
    chunked = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    piece = b"a" * 60_000
    body = (b"%x\r\n%b\r\n" % (len(piece), piece)) * 2 + b"0\r\n\r\n"
    assert status_of(raw_exchange(strict_gateway, chunked + body)) == 413  # counted as it came
    assert_still_serves(strict_gateway)


def test_slow_headers_and_a_short_body_get_408(strict_gateway):
    started = time.monotonic()
    answer = raw_exchange(strict_gateway, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    assert status_of(answer) == 408
    assert b"header_timeout_s" in answer
    short = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{"
    answer = raw_exchange(strict_gateway, short)
    assert status_of(answer) == 408
    assert b"body_timeout_s" in answer
    assert time.monotonic() - started < 4  # two 0.5 s timeouts, not forever
    assert_still_serves(strict_gateway)


def test_an_idle_keep_alive_connection_is_closed(strict_gateway):
    with socket.create_connection(("127.0.0.1", strict_gateway), timeout=5) as sock:
        sock.sendall(chat_request(json.dumps(CHAT).encode()))
        time.sleep(0.3)
        assert status_of(sock.recv(65536)) == 200
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # closed quietly, nothing was asked
        assert 0.5 < time.monotonic() - started < 3  # keep_alive_timeout_s=1


def test_connections_over_the_limit_get_503_with_retry_after(strict_gateway):
    held = [socket.create_connection(("127.0.0.1", strict_gateway)) for _ in range(8)]
    try:
        time.sleep(0.2)  # all 8 accepted
        answer = raw_exchange(strict_gateway, b"")
        assert status_of(answer) == 503
        assert b"retry-after: 3" in answer.lower()
        assert b"max_connections" in answer
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)  # their slots are free again
    assert_still_serves(strict_gateway)


def test_no_request_is_lost_to_an_engine_that_closes_pooled_connections(tmp_path):
    """The engine closes a third of its connections 0-3 ms after answering, unannounced (and
    the gateway's own idle limit is set longer, so it pools them): 0 failures in 500."""
    with (
        engine_process(tmp_path, "--close-after-answer=0.33", "--close-delay-ms=3") as url,
        gateway_process(tmp_path, url, upstream_idle_s=30.0) as (port, _),
    ):
        base = f"http://127.0.0.1:{port}/v1/chat/completions"
        limits = httpx.Limits(max_connections=8)
        with httpx.Client(timeout=10, limits=limits) as client:

            def ask(index: int) -> int:
                time.sleep((index % 7) / 1000)  # spread, so pooled connections get reused late
                body = {**CHAT, "stream": index % 2 == 1}
                reply = client.post(base, json=body, headers={"x-request-id": f"r{index}"})
                return reply.status_code

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(ask, range(500)))
    failed = [status for status in statuses if status != 200]
    assert failed == [], f"{len(failed)} of 500 failed: {failed[:10]}"
    traces = read_traces(tmp_path / "traces.sqlite")
    assert len(traces) == 500
    retried = sum(row["upstream_retries"] for row in traces)
    assert retried > 0, "the engine's closes never hit a pooled connection: the test is moot"
    print(f"500 requests, 0 failed, {retried} sent again on a fresh connection")


def test_an_engine_dying_mid_answer_gives_a_502_or_a_last_sse_error_event(engine, tmp_path):
    dying = {**CHAT, "messages": [{"role": "user", "content": "die-mid-answer"}]}
    with gateway_process(tmp_path, engine) as (port, _):
        base = f"http://127.0.0.1:{port}/v1/chat/completions"
        whole = httpx.post(base, json=dying, timeout=10)
        assert whole.status_code == 502, whole.text
        assert "lmstack gateway" in whole.json()["error"]["message"]
        with httpx.stream("POST", base, json={**dying, "stream": True}, timeout=10) as reply:
            assert reply.status_code == 200
            events = [line for line in reply.iter_lines() if line.startswith("data:")]
        assert len(events) == 3, events  # two tokens, then the error event
        error = json.loads(events[-1][5:])["error"]
        assert "stream ended" in error["message"]
        assert_still_serves(port)
    traces = read_traces(tmp_path / "traces.sqlite")
    assert [row["status"] for row in traces[:2]] == [502, 200]
    assert "stream broken" in traces[1]["error"]


def test_the_default_body_limit_follows_the_models_context_length():
    from lmstack.config.groups.gateway import MIN_BODY_BYTES, GatewayLimits

    assert GatewayLimits().body_limit(None) == 16 << 20
    assert GatewayLimits().body_limit(2048) == MIN_BODY_BYTES
    assert GatewayLimits().body_limit(131072) == 131072 * 64
    assert GatewayLimits(max_body_bytes=10).body_limit(131072) == 10


def test_limits_are_checked_at_composition():
    result = subprocess.run(
        [sys.executable, "run.py", "phase=serve", "serving.limits.max_connections=0"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode != 0
    assert "serving.limits.max_connections: must be > 0" in result.stderr + result.stdout


def test_serve_restarts_an_engine_that_died_or_fails_naming_how(tmp_path):
    """serving.on_engine_exit: `restart` brings the engine back on its port (the gateway in
    front reconnects); `fail` (and a restart budget spent) ends serving with how it ended
    and the engine's last log lines."""
    from lmstack.serving.engines import EngineError, EngineWatch

    port = free_port()
    log = tmp_path / "engine.log"
    command = [sys.executable, str(FAST_ENGINE), f"--port={port}"]
    watch = EngineWatch(
        name="fast",
        start=lambda: start_process(command, log),
        process=start_process(command, log),
        health_url=f"http://127.0.0.1:{port}/health",
        log_path=log,
        startup_timeout_s=30,
        on_exit="restart",
        max_restarts=1,
    )
    try:
        wait_until_healthy(watch.process, watch.health_url, 30, log)
        with gateway_process(tmp_path, f"http://127.0.0.1:{port}/v1") as (gateway_port, _):
            assert_still_serves(gateway_port)  # a pooled connection to the first engine
            watch.check()  # alive: nothing to do
            watch.process.kill()
            watch.process.wait()
            watch.check()  # restarted, healthy again
            assert watch.restarts == 1
            assert_still_serves(gateway_port)
        watch.process.kill()
        watch.process.wait()
        with pytest.raises(EngineError, match=r"SIGKILL.*after 1 restarts") as error:
            watch.check()
        assert str(log) in str(error.value) and "fast_engine.py" in str(error.value)
    finally:
        stop_process(watch.process)


def test_a_large_body_is_prepared_in_the_worker_which_comes_back_if_it_dies(engine, tmp_path):
    """A body over preparing.OFFLOAD_BYTES goes to the worker process: answered, and traced
    with its prompt capped (its hash of the whole); a killed worker is replaced."""
    from lmstack.serving.preparing import OFFLOAD_BYTES, TRACE_PROMPT_CHARS

    content = "lorem ipsum " * (2 * TRACE_PROMPT_CHARS // 12)
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    assert len(json.dumps(body)) > OFFLOAD_BYTES
    with gateway_process(tmp_path, engine, max_body_bytes=64 << 20) as (port, process):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        assert httpx.post(url, json=body, timeout=60).status_code == 200
        (worker,) = [
            pid
            for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        subprocess.run(["kill", "-9", worker], check=True)
        time.sleep(0.2)
        answers = [httpx.post(url, json=body, timeout=60).status_code for _ in range(2)]
        assert answers[-1] == 200 and set(answers) <= {200, 500}  # the one in flight may fail
    first = read_traces(tmp_path / "traces.sqlite")[0]
    assert first["prompt"].endswith("more characters not traced]")
    assert len(first["prompt"]) < TRACE_PROMPT_CHARS + 100
    assert first["prompt_hash"] == hash_of_prompt(json.dumps(body["messages"], ensure_ascii=False))
