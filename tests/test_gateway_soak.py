"""Soak: mixed good and bad traffic at concurrency 64 through one real gateway process.

The gateway (its own process, as always) stands in front of a real engine that streams
(tests/gateway_test_engine.py). 64 clients send, for LMSTACK_SOAK_SECONDS (20 by default),
a fixed mix: chat and text completions, streamed (with and without usage) and not, feedback
on earlier answers; and client mistakes: bodies that are not JSON, out-of-range fields,
unknown routes, oversized headers, bodies cut short, clients that hang up mid-stream.

Then, with the gateway stopped: every completion request that arrived whole was traced
exactly once, with the status its client saw; no client mistake got a 5xx; the gateway's
memory stayed bounded; once the clients closed, the gateway held no connection open, to
clients or to the engine. The figures are printed (past pytest's capture), and as one
SOAK_RESULT JSON line that benchmarks/gateway_soak.py reads for its long run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
from gateway_test_engine import MODEL, WORDS, fast_engine, gateway_process, socket_inodes

from lmstack.serving.exchange import REQUEST_TAG_HEADER
from lmstack.serving.gateway_process import gateway
from lmstack.serving.traces import TRACE_DB_NAME, WARMUP_TAG, read_traces

SECONDS = float(os.environ.get("LMSTACK_SOAK_SECONDS", "20"))
CONCURRENCY = int(os.environ.get("LMSTACK_SOAK_CONCURRENCY", "64"))
SEED = 0
RSS_GROWTH_BOUND_MB = 48.0  # per-request state is freed: growth past this is a leak
SETTLE_S = 8.0  # for connections to close: idle engine connections go after 2 s
TOKEN_DELAY_S = 0.002  # between streamed events, so that a client can hang up mid-stream
STREAM_TOKENS = 16

# each kind of request and its share of the traffic
MIX = {
    "chat": 25,
    "chat_stream_usage": 15,
    "chat_stream": 15,
    "completion": 8,
    "feedback": 7,
    "not_json": 5,
    "bad_field": 5,
    "unknown_route": 5,
    "oversized_headers": 5,
    "cut_body": 5,
    "hang_up_mid_stream": 5,
}
# the status each kind is answered with (None: no answer is expected)
EXPECTED = {
    "chat": 200,
    "chat_stream_usage": 200,
    "chat_stream": 200,
    "completion": 200,
    "feedback": 200,
    "not_json": 400,
    "bad_field": 400,
    "unknown_route": 404,
    "oversized_headers": 431,
    "cut_body": None,
    "hang_up_mid_stream": 200,
}
COMPLETIONS = {"chat", "chat_stream_usage", "chat_stream", "completion", "not_json", "bad_field"}
COMPLETIONS |= {"hang_up_mid_stream"}  # arrive whole, so the gateway traces each of them


@dataclass
class Sent:
    """One request and what became of it."""

    kind: str
    request_id: str
    status: int | None = None  # None: no answer (by design, or a connection reset)
    problem: str = ""  # what the client found wrong with the answer


@dataclass
class Soak:
    """The traffic's record, and the gateway's figures over the run."""

    sent: list[Sent] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds in, MiB)
    good_ids: list[str] = field(default_factory=list)  # answered 200: feedback names them


def chat_body(stream: bool = False, usage: bool = False, **fields) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is 3 + 4?"}]}
    body["max_tokens"] = STREAM_TOKENS if stream else 4
    if stream:
        body["stream"] = True
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body | fields


def streamed_text(tokens: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(tokens))


@dataclass
class Traffic:
    """What every sender uses: the shared HTTP client, the record, the gateway's address."""

    client: httpx.AsyncClient
    soak: Soak
    address: tuple[str, int]


async def send_chat(sent: Sent, traffic: Traffic) -> None:
    body = chat_body(stream=sent.kind != "chat", usage=sent.kind == "chat_stream_usage")
    await completion(traffic, "/chat/completions", body, sent)


async def send_completion(sent: Sent, traffic: Traffic) -> None:
    body = {"model": MODEL, "prompt": "3 + 4 =", "max_tokens": 4}
    await completion(traffic, "/completions", body, sent)


async def completion(traffic: Traffic, route: str, body: dict, sent: Sent) -> None:
    """A completion, streamed or not; the answer checked against what the engine sends."""
    headers = {"x-request-id": sent.request_id}
    async with traffic.client.stream("POST", route, json=body, headers=headers) as answer:
        raw = await answer.aread()
    sent.status = answer.status_code
    if sent.status != 200:
        return
    traffic.soak.good_ids.append(sent.request_id)
    if answer.headers.get("x-lmstack-request-id") != sent.request_id:
        sent.problem = "the answer names another request id"
    elif body.get("stream"):
        events = [json.loads(line[6:]) for line in raw.split(b"\n") if line[6:7] == b"{"]
        usage = [e for e in events if e.get("usage")]
        if bool(usage) != bool(body.get("stream_options")):
            sent.problem = f"usage events: {len(usage)}, asked: {'stream_options' in body}"


async def send_feedback(sent: Sent, traffic: Traffic) -> None:
    """Thumbs up on an earlier answer (as a user clicks on what they were shown)."""
    if not traffic.soak.good_ids:
        sent.kind, sent.status = "feedback_skipped", 200
        return
    rated = random.Random(sent.request_id).choice(traffic.soak.good_ids)
    body = {"request_id": rated, "thumbs": "up"}
    sent.status = (await traffic.client.post("/feedback", json=body)).status_code


async def send_not_json(sent: Sent, traffic: Traffic) -> None:
    headers = {"x-request-id": sent.request_id}
    answer = await traffic.client.post("/chat/completions", content=b"{not", headers=headers)
    sent.status = answer.status_code


async def send_bad_field(sent: Sent, traffic: Traffic) -> None:
    body, headers = chat_body(temperature=-1), {"x-request-id": sent.request_id}
    answer = await traffic.client.post("/chat/completions", json=body, headers=headers)
    sent.status = answer.status_code


async def send_unknown_route(sent: Sent, traffic: Traffic) -> None:
    sent.status = (await traffic.client.get("/no-such-route")).status_code


async def send_oversized_headers(sent: Sent, traffic: Traffic) -> None:
    head = f"GET /health HTTP/1.1\r\nhost: soak\r\nx-request-id: {sent.request_id}\r\n"
    request = (head + "x-big: " + "v" * 20_000 + "\r\n\r\n").encode()
    sent.status = await raw_request(traffic.address, request)


async def raw_request(address: tuple[str, int], request: bytes) -> int | None:
    """The status of the answer to raw bytes; None when the connection ended without one
    (a refusal can reset the connection before our bytes were read)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    except ConnectionError:
        return None
    finally:
        writer.close()
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else None


async def send_cut_body(sent: Sent, traffic: Traffic) -> None:
    """Headers that promise 100 bytes of body, 40 of them, then the client is gone."""
    head = "POST /v1/chat/completions HTTP/1.1\r\nhost: soak\r\ncontent-length: 100\r\n"
    head += f"x-request-id: {sent.request_id}\r\n\r\n"
    _, writer = await asyncio.open_connection(*traffic.address)
    writer.write(head.encode() + b'{"model": "' + b"x" * 29)
    await writer.drain()
    writer.close()


async def send_and_hang_up(sent: Sent, traffic: Traffic) -> None:
    """A streamed chat whose client reads the first piece and closes the connection."""
    body, headers = chat_body(stream=True), {"x-request-id": sent.request_id}
    async with traffic.client.stream(
        "POST", "/chat/completions", json=body, headers=headers
    ) as answer:
        sent.status = answer.status_code
        async for _ in answer.aiter_raw():
            break


SENDERS = {
    "chat": send_chat,
    "chat_stream_usage": send_chat,
    "chat_stream": send_chat,
    "completion": send_completion,
    "feedback": send_feedback,
    "not_json": send_not_json,
    "bad_field": send_bad_field,
    "unknown_route": send_unknown_route,
    "oversized_headers": send_oversized_headers,
    "cut_body": send_cut_body,
    "hang_up_mid_stream": send_and_hang_up,
}


async def client_loop(worker: int, deadline: float, traffic: Traffic) -> None:
    """One of the concurrent clients: requests drawn from MIX, one after another."""
    draw = random.Random(SEED * 1000 + worker)
    kinds, weights = list(MIX), list(MIX.values())
    count = 0
    while time.monotonic() < deadline:
        sent = Sent(draw.choices(kinds, weights)[0], f"soak-{worker}-{count}")
        count += 1
        traffic.soak.sent.append(sent)
        try:
            await SENDERS[sent.kind](sent, traffic)
        except (TimeoutError, httpx.HTTPError, OSError) as error:
            sent.problem = f"{type(error).__name__}: {error}"


async def sample_rss(process, soak: Soak, started: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        soak.rss_mb.append((time.monotonic() - started, process.rss_mb()))
        await asyncio.sleep(1.0)


async def run_traffic(base_url: str, process, seconds: float, concurrency: int) -> Soak:
    soak, started = Soak(), time.monotonic()
    address = (process.host, process.port)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(process, soak, started, stop))
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        traffic, deadline = Traffic(client, soak, address), started + seconds
        await asyncio.gather(*(client_loop(w, deadline, traffic) for w in range(concurrency)))
    stop.set()
    await sampler
    soak.rss_mb.append((time.monotonic() - started, process.rss_mb()))
    return soak


def wait_for_connections_to_close(process, engine_port: int) -> dict[str, float]:
    """Seconds until the gateway held no client and no engine connection (or what is left)."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_S:
        clients, engine = process.connections(), process.connections(engine_port)
        if clients == 0 and engine == 0:
            break
        time.sleep(0.1)
    return {
        "client_connections": clients,
        "engine_connections": engine,
        "closed_after_s": round(time.monotonic() - started, 2),
    }


def trace_check(soak: Soak, db: Path) -> dict[str, int]:
    """Every completion request that arrived whole traced exactly once, with its status."""
    rows = read_traces(db)
    traced = Counter(row["request_id"] for row in rows)
    by_id = {row["request_id"]: row for row in rows}
    expected = {s.request_id: s for s in soak.sent if s.kind in COMPLETIONS}
    missing = [rid for rid in expected if traced[rid] == 0]
    twice = [rid for rid, n in traced.items() if n > 1]
    stray = [rid for rid in traced if rid not in expected]
    wrong_status = [
        rid
        for rid, s in expected.items()
        if rid in by_id and s.status is not None and by_id[rid]["status"] != s.status
    ]
    wrong_text = [
        rid
        for rid, s in expected.items()
        if s.kind in ("chat_stream", "chat_stream_usage") and rid in by_id
        if by_id[rid]["response"] != streamed_text(STREAM_TOKENS)
        or by_id[rid]["completion_tokens"] != STREAM_TOKENS
    ]
    hung_up = [by_id[s.request_id] for s in soak.sent if s.kind == "hang_up_mid_stream"]
    return {
        "traces": len(rows),
        "expected_traces": len(expected),
        "missing": len(missing),
        "traced_twice": len(twice),
        "stray": len(stray),
        "wrong_status": len(wrong_status),
        "wrong_stream_text": len(wrong_text),
        "hang_ups_traced_as_such": sum("client disconnected" in r["error"] for r in hung_up),
        "examples": {"missing": missing[:3], "twice": twice[:3], "status": wrong_status[:3]},
    }


def figures(soak: Soak, seconds: float, connections: dict, traces: dict) -> dict:
    statuses = Counter(s.status for s in soak.sent)
    rss = [mb for _, mb in soak.rss_mb]
    return {
        "seconds": seconds,
        "concurrency": CONCURRENCY,
        "sent": len(soak.sent),
        "answered": sum(s.status is not None for s in soak.sent),
        "requests_per_s": round(len(soak.sent) / seconds, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "server_errors": sum(s.status is not None and s.status >= 500 for s in soak.sent),
        "unexpected_status": sum(unexpected(s) for s in soak.sent),
        # refused while its bytes still arrived: the reset can beat the 431 to the client
        "oversized_unanswered": sum(
            s.kind == "oversized_headers" and s.status is None for s in soak.sent
        ),
        "client_problems": sum(bool(s.problem) for s in soak.sent),
        "rss_start_mb": round(rss[0], 1),
        "rss_middle_mb": round(rss[len(rss) // 2], 1),
        "rss_end_mb": round(rss[-1], 1),
        "rss_max_mb": round(max(rss), 1),
        **connections,
        **{k: v for k, v in traces.items() if k != "examples"},
    }


def unexpected(sent: Sent) -> bool:
    if sent.kind not in EXPECTED or (sent.kind == "oversized_headers" and sent.status is None):
        return False
    return sent.status != EXPECTED[sent.kind]


def print_figures(result: dict) -> None:
    print("\ngateway soak:")
    for key, value in result.items():
        print(f"  {key:24} {value}")
    print("SOAK_RESULT " + json.dumps(result), flush=True)


def test_mixed_traffic_at_concurrency_64_is_answered_traced_and_cleaned_up(tmp_path, capsys):
    with fast_engine(token_delay_s=TOKEN_DELAY_S) as engine:
        engine_port = int(engine.base_url.rsplit(":", 1)[1].split("/")[0])
        with gateway(engine, SimpleNamespace(), tmp_path) as proxied:
            process = gateway_process(proxied.base_url)
            warm_up(proxied.base_url)
            sockets_before = len(socket_inodes(process.pid))
            soak = asyncio.run(run_traffic(proxied.base_url, process, SECONDS, CONCURRENCY))
            connections = wait_for_connections_to_close(process, engine_port)
            connections["sockets_before"] = sockets_before
            connections["sockets_after"] = len(socket_inodes(process.pid))
            assert process.alive()
        traces = trace_check(soak, tmp_path / TRACE_DB_NAME)  # the gateway has stopped
    result = figures(soak, SECONDS, connections, traces)
    with capsys.disabled():  # in the suite's log even when the test passes (CI's record)
        print_figures(result)

    problems = [s for s in soak.sent if s.problem]
    assert not problems, problems[:5]
    assert result["server_errors"] == 0, result["statuses"]
    assert result["unexpected_status"] == 0, Counter((s.kind, s.status) for s in soak.sent)
    assert result["rss_end_mb"] < result["rss_start_mb"] + RSS_GROWTH_BOUND_MB
    assert result["client_connections"] == 0 and result["engine_connections"] == 0
    assert result["sockets_after"] <= result["sockets_before"]
    assert traces["missing"] == traces["traced_twice"] == traces["stray"] == 0, traces
    assert traces["wrong_status"] == traces["wrong_stream_text"] == 0, traces
    assert result["answered"] > 10 * CONCURRENCY  # the run did carry traffic


def warm_up(base_url: str) -> None:
    """The first requests pay for imports and caches; the soak's figures start after them
    (tagged as warm-up, which read_traces leaves out)."""
    headers = {REQUEST_TAG_HEADER: WARMUP_TAG}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for stream in (False, True) * 5:
            answer = client.post("/chat/completions", json=chat_body(stream), headers=headers)
            assert answer.status_code == 200, answer.text
