"""The tracing gateway in front of a real `transformers serve` engine on the tiny model.

Requests go through the real gateway process with the `openai` client; traces are
read back from the real SQLite store. The trace store is broken on purpose (locked,
corrupt) to show that serving goes on and the traces are written later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from hydra import compose, initialize_config_dir

from lmstack.config.store import register_configs
from lmstack.launch import validate
from lmstack.prompts import PROMPT_VERSION_HEADER
from lmstack.serving.gateway_process import gateway
from lmstack.serving.relay import is_usage_only
from lmstack.serving.sse import parse_event, payloads, split_events
from lmstack.serving.traces import TRACE_DB_NAME, TraceStore, read_traces

CONF = Path(__file__).resolve().parents[1] / "conf"
QUESTION = "Ann has 3 apples and gets 4 more. How many apples does Ann have?"


def make_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return validate(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture(scope="module")
def engine(tiny_base, tmp_path_factory):
    """One real engine for the module (no gateway): tests put their own gateways in front."""
    from lmstack.serving.engines import serve

    config = make_config(f"serving.model={tiny_base}", "logger=none")
    log_dir = tmp_path_factory.mktemp("engine")
    with serve(config, str(tiny_base.parent), log_dir, gateway=False) as upstream:
        yield upstream


def chat(endpoint, stream: bool, **extra):
    client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0)
    return client.chat.completions.create(
        model=endpoint.model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=6,
        temperature=0.0,
        stream=stream,
        **extra,
    )


def streamed(endpoint, **extra) -> tuple[str, str, object]:
    """Text, finish reason and usage of one streamed answer."""
    text, finish, usage = [], "", None
    for chunk in chat(endpoint, stream=True, **extra):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def health(endpoint) -> dict:
    return httpx.get(endpoint.base_url.removesuffix("/v1") + "/health").json()


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_every_request_is_traced_and_answers_pass_through_unchanged(engine, tmp_path):
    """lmstack's promise, not the engine's: whether or not the engine's own stream carries
    usage unasked (transformers serve stopped sending it in 5.25), a client that asks for it
    through the gateway gets the count of the tokens relayed, the same as the trace's."""
    config = make_config("logger=none")
    served = {**engine.served, "run_id": "sft-lora-0123456789"}
    upstream = dataclasses.replace(engine, served=served)
    direct_text, direct_finish, _ = streamed(engine)
    with gateway(upstream, config, tmp_path) as proxied:
        assert proxied.base_url != engine.base_url and proxied.model == engine.model
        headers = {PROMPT_VERSION_HEADER: "p-0123456789"}
        asked = {"include_usage": True}
        text, finish, usage = streamed(proxied, extra_headers=headers, stream_options=asked)
        whole = chat(proxied, stream=False, extra_headers=headers)
    # greedy decoding: through the gateway, the same stream as from the engine itself
    assert (text, finish) == (direct_text, direct_finish)
    # the same greedy answer unstreamed: its usage counts the tokens the stream relayed
    assert whole.choices[0].message.content == text
    assert usage.completion_tokens == whole.usage.completion_tokens > 0
    rows = read_traces(tmp_path / TRACE_DB_NAME)
    assert len(rows) == 2
    stream_row, whole_row = rows
    for row in rows:
        assert row["prompt_version"] == "p-0123456789"
        assert row["run_id"] == "sft-lora-0123456789"
        assert row["artifact_hash"] == engine.served["artifact_hash"]
        assert row["status"] == 200 and row["error"] == ""
        assert QUESTION in json.loads(row["prompt"])[0]["content"]
        assert row["latency_ms"] > 0 and row["prompt_tokens"] > 0
    assert stream_row["stream"] == 1 and 0 < stream_row["ttft_ms"] <= stream_row["latency_ms"]
    assert stream_row["response"] == text and stream_row["finish_reason"] == finish
    assert stream_row["completion_tokens"] == usage.completion_tokens
    assert stream_row["usage_source"] == "upstream"
    assert whole_row["response"] == whole.choices[0].message.content
    assert whole_row["prompt_tokens"] == whole.usage.prompt_tokens
    assert whole_row["completion_tokens"] == whole.usage.completion_tokens
    assert json.loads(whole_row["params"])["max_tokens"] == 6


def test_upstream_errors_pass_through_with_their_body(engine, tmp_path):
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    direct = httpx.post(f"{engine.base_url}/chat/completions", json=body)
    with gateway(engine, make_config("logger=none"), tmp_path) as proxied:
        answer = httpx.post(f"{proxied.base_url}/chat/completions", json=body)
        assert health(proxied)["status"] == "ok"  # and it keeps serving
    assert direct.status_code == answer.status_code == 400
    assert answer.json() == direct.json()
    (row,) = read_traces(tmp_path / TRACE_DB_NAME)
    assert row["status"] == 400 and "Server is pinned" in row["error"]


def test_client_that_hangs_up_mid_stream_is_recorded(engine, tmp_path):
    # 200 tokens whatever the model says (transformers serve's generation config: no end of
    # sequence): the answer is still streaming when the client hangs up, however busy the
    # machine (an answer that ended early was recorded whole before the hang-up was seen)
    generation = {"max_new_tokens": 200, "eos_token_id": -1, "do_sample": False}
    body = {
        "model": engine.model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 200,
        "stream": True,
        "generation_config": json.dumps(generation),
    }
    with gateway(engine, make_config("logger=none"), tmp_path) as proxied:
        with httpx.stream("POST", f"{proxied.base_url}/chat/completions", json=body) as answer:
            next(answer.iter_raw())  # the first event, then hang up
        assert chat(proxied, stream=False).choices  # the gateway serves on
    rows = read_traces(tmp_path / TRACE_DB_NAME)
    assert sorted(row["error"] for row in rows) == ["", "client disconnected mid-stream"]


def read_response(connection: socket.socket) -> tuple[bytes, bytes]:
    """Head and body of one content-length answer, however the bytes arrive."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        body += connection.recv(4096)
    return head, body


def test_plain_http_edge_cases_are_answered(engine, tmp_path):
    """What curl and other plain HTTP clients send: Expect: 100-continue with a large body,
    other /v1 routes, unknown routes, bytes that are not HTTP."""
    # a large body whose prompt still fits the tiny model's 256-token context ("user" is an
    # OpenAI field the engine ignores)
    messages = [{"role": "user", "content": QUESTION}]
    request = {"model": engine.model, "messages": messages, "max_tokens": 2, "user": "x" * 2000}
    body = json.dumps(request).encode()
    with gateway(engine, make_config("logger=none"), tmp_path) as proxied:
        address = ("127.0.0.1", int(proxied.base_url.rsplit(":", 1)[1].split("/")[0]))
        with socket.create_connection(address, timeout=30) as connection:
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "expect: 100-continue\r\n\r\n"
            )
            connection.sendall(head.encode())
            assert connection.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            connection.sendall(body)
            head, answer = read_response(connection)
        assert head.startswith(b"HTTP/1.1 200 OK") and json.loads(answer)["choices"]
        models = httpx.get(f"{proxied.base_url}/models")
        assert models.json() == httpx.get(f"{engine.base_url}/models").json()
        missing = httpx.get(proxied.base_url.removesuffix("/v1") + "/v2/models")
        assert missing.status_code == 404 and "no route '/v2/models'" in missing.text
        with socket.create_connection(address, timeout=30) as connection:
            connection.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert connection.recv(4096).startswith(b"HTTP/1.1 400 Bad Request")
    (row,) = read_traces(tmp_path / TRACE_DB_NAME)  # only the completion is traced
    assert row["status"] == 200 and json.loads(row["params"])["user"] == "x" * 2000


def test_unreachable_upstream_is_a_502_with_a_trace(engine, tmp_path):
    from lmstack.serving.engines import free_port

    dead_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    dead = dataclasses.replace(engine, base_url=dead_url)
    with gateway(dead, make_config("logger=none"), tmp_path) as proxied:
        body = {"model": engine.model, "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(f"{proxied.base_url}/chat/completions", json=body)
    assert answer.status_code == 502
    assert f"upstream {dead_url} unreachable" in answer.json()["error"]["message"]
    (row,) = read_traces(tmp_path / TRACE_DB_NAME)
    assert row["status"] == 502 and "unreachable" in row["error"]


@pytest.fixture
def https_engine(engine, tmp_path):
    """The engine behind a TLS-terminating server with its own certificate, as an external
    API is reached: https, a certificate the gateway must verify."""
    import http.server
    import ssl
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip

    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            url = engine.base_url + self.path.removeprefix("/v1")
            headers = {"content-type": "application/json"}
            with httpx.stream("POST", url, content=body, headers=headers) as answer:
                self.send_response(answer.status_code)
                self.send_header("content-type", answer.headers["content-type"])
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for piece in answer.iter_raw():
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"https://127.0.0.1:{server.server_address[1]}/v1"
    yield dataclasses.replace(engine, base_url=base_url, engine="external"), cert
    server.shutdown()


def test_gateway_verifies_and_relays_an_https_upstream(https_engine, engine, tmp_path, monkeypatch):
    upstream, cert = https_engine
    direct = streamed(engine)[:2]  # text and finish reason
    direct_tokens = chat(engine, stream=False).usage.completion_tokens
    with gateway(upstream, make_config("logger=none"), tmp_path / "untrusted") as proxied:
        body = {"model": engine.model, "messages": [{"role": "user", "content": QUESTION}]}
        answer = httpx.post(f"{proxied.base_url}/chat/completions", json=body)
    assert answer.status_code == 502 and "CERTIFICATE_VERIFY_FAILED" in answer.text
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the gateway now trusts that certificate
    with gateway(upstream, make_config("logger=none"), tmp_path) as proxied:
        assert streamed(proxied)[:2] == direct
    (row,) = read_traces(tmp_path / TRACE_DB_NAME)
    assert row["status"] == 200 and row["response"] == direct[0] and row["engine"] == "external"
    assert row["completion_tokens"] == direct_tokens


def test_redaction_keeps_prompts_out_of_the_store(engine, tmp_path):
    secret = "Zork has 11 secret marbles and gets 2 more."
    config = make_config("logger=none", "trace.redaction=prompts")
    with gateway(engine, config, tmp_path) as proxied:
        client = openai.OpenAI(base_url=proxied.base_url, api_key="EMPTY", max_retries=0)
        answer = client.chat.completions.create(
            model=proxied.model, messages=[{"role": "user", "content": secret}], max_tokens=4
        )
    (row,) = read_traces(tmp_path / TRACE_DB_NAME)
    assert row["prompt"] == "[redacted]" and row["response"] == answer.choices[0].message.content
    stored = b"".join(p.read_bytes() for p in tmp_path.glob(f"{TRACE_DB_NAME}*"))
    assert b"Zork" not in stored and b"marbles" not in stored


def test_locked_store_buffers_traces_and_writes_them_when_free(engine, tmp_path):
    db = tmp_path / TRACE_DB_NAME
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the store
    config = make_config("logger=none", "trace.retry_s=0.2")
    with gateway(engine, config, tmp_path) as proxied:
        for _ in range(3):
            assert streamed(proxied)[0]  # serving goes on
        wait_for(lambda: "locked" in health(proxied)["traces"]["error"])
        assert health(proxied)["traces"]["buffered"] == 3
        lock.execute("ROLLBACK")
        lock.close()
        wait_for(lambda: health(proxied)["traces"]["written"] == 3)
        assert health(proxied)["traces"]["error"] == ""
    assert len(read_traces(db)) == 3
    log = (tmp_path / "gateway.log").read_text()
    assert f"trace store {db}: locked by another process" in log
    assert re.search(r"serving goes on, \d+ traces are buffered and will be written again", log)


def test_corrupt_store_keeps_traces_and_writes_them_again(engine, tmp_path):
    db = tmp_path / TRACE_DB_NAME
    db.write_bytes(b"this is not a database " * 100)
    config = make_config("logger=none", "trace.retry_s=0.2")
    with gateway(engine, config, tmp_path) as proxied:
        for _ in range(2):
            assert chat(proxied, stream=False).choices[0].message.content is not None
        wait_for(lambda: "corrupt" in health(proxied)["traces"]["error"])
    log = (tmp_path / "gateway.log").read_text()
    assert "not a valid SQLite database (corrupt file?)" in log
    pending = tmp_path / f"{TRACE_DB_NAME}.pending.jsonl"
    assert len(pending.read_text().splitlines()) == 2  # saved on shutdown, nothing lost
    shutil.move(db, tmp_path / "corrupt.sqlite")  # the user moves the bad file away
    TraceStore(db).close()  # the next store on that path writes the pending traces
    assert len(read_traces(db)) == 2 and not pending.exists()


def test_usage_event_added_by_the_gateway_is_removed_again():
    stream = (
        b'data: {"choices": [{"delta": {"content": "4"}, "index": 0}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}\r\n\r\n'
        b"data: [DONE]\n\npartial"
    )
    events, rest = split_events(stream)
    assert rest == b"partial" and b"".join(e + s for e, s in events) + rest == stream
    payloads = [parse_event(event) for event, _ in events]
    assert [p is not None and is_usage_only(p) for p in payloads] == [False, True, False]


def test_the_one_sse_parser_reads_a_stream_cut_anywhere():
    """The load client and the gateway read streams with serving/sse.py: events that span
    pieces, CRLF separators, comments, multi-line data, [DONE] and an unterminated end."""
    stream = (
        b'data: {"a": 1}\n\n: keep-alive comment\n\n'
        b'data: {"b":\ndata: 2}\r\n\r\ndata: [DONE]\n\ndata: {"c": 3}'
    )

    async def read(size: int) -> list:
        async def pieces():
            for start in range(0, len(stream), size):
                yield stream[start : start + size]

        return [payload async for payload in payloads(pieces())]

    for size in (1, 5, len(stream)):
        assert asyncio.run(read(size)) == [{"a": 1}, {"b": 2}, {"c": 3}], size
