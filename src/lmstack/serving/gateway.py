"""The tracing gateway: a thin OpenAI-compatible reverse proxy in front of any engine.

    python -m lmstack.serving.gateway --upstream http://127.0.0.1:8000/v1 \
        --trace-db outputs/runs/x/traces.sqlite --port 9000

Every request to /v1/* is forwarded to the upstream engine unchanged and its answer
relayed back unchanged (streams piece by piece as they arrive, errors with their status
and body); on the side the gateway records a trace (see `traces.TraceRecord`): time,
prompt and response (redacted when asked), latency, TTFT, tokens, what is served, the
prompt version the client sent in `X-Lmstack-Prompt-Version`, status and error.

For streams whose client did not ask for usage, the gateway asks upstream for it
(`stream_options.include_usage`) and removes the extra usage-only event again, so
token counts come from the engine yet the client sees what the engine would send.

It runs as its own process, so that it never competes with a benchmark client, or the
caller's Python, for the GIL; `gateway()` starts it. The relay is asyncio protocols with
httptools' HTTP parser (on uvloop when installed): it writes each piece of an answer to
the client as it arrives and parses the events only when the answer has ended, so the
gateway costs little CPU per streamed token (see `benchmarks/gateway_overhead.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hashlib
import http
import itertools
import json
import logging
import os
import re
import signal
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmstack.prompts import PROMPT_VERSION_HEADER
from lmstack.serving import ab
from lmstack.serving.ab import REQUEST_ID_HEADER, VARIANT_HEADER
from lmstack.serving.openai_compat import (
    Plan,
    RequestRejected,
    ServedModel,
    as_events,
    combine,
    models_listing,
    normalise,
)
from lmstack.serving.processes import free_port, start_process, stop_process, wait_until_healthy
from lmstack.serving.traces import TRACE_DB_NAME, FeedbackRecord, TraceRecord, stored_request

log = logging.getLogger("lmstack.gateway")

REQUEST_TAG_HEADER = "X-Lmstack-Request-Tag"
UPSTREAM_KEY_ENV = "LMSTACK_GATEWAY_UPSTREAM_KEY"
EVENT_END = re.compile(rb"\r?\n\r?\n")
ENDPOINTS = {"/chat/completions": "chat", "/completions": "completions"}
MAX_REMEMBERED_IDS = 200_000


# ---------------------------------------------------------------- starting it


@contextlib.contextmanager
def gateway(
    upstream: Any,
    config: Any,
    log_dir: Path,
    variants: list[dict] | None = None,
    name: str = "",
) -> Iterator[Any]:
    """Start the gateway in front of `upstream` (an Endpoint); yield the gateway's Endpoint,
    whose model is `name` (the engine's own name when empty). With `variants`
    (serving/ab.py) it splits completions between them instead.

    The trace store is `config.trace.path`, or `<log_dir>/traces.sqlite`. The gateway
    process is always stopped, and its buffered traces written, on the way out.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    trace = getattr(config, "trace", None)
    db = Path(trace.path) if trace is not None and trace.path else log_dir / TRACE_DB_NAME
    host = "127.0.0.1"
    port = free_port(host)
    served = dict(getattr(upstream, "served", None) or {})
    command = [
        sys.executable,
        "-m",
        "lmstack.serving.gateway",
        f"--upstream={upstream.base_url}",
        f"--trace-db={db}",
        f"--host={host}",
        f"--port={port}",
        f"--engine={getattr(upstream, 'engine', '')}",
        f"--served={json.dumps(served, default=str)}",
        f"--served-name={name or upstream.model}",
        f"--upstream-model={upstream.model}",
    ]
    if trace is not None:
        command += [f"--redaction={trace.redaction}", f"--retry-s={trace.retry_s}"]
        if trace.otlp_endpoint:
            command.append(f"--otlp-endpoint={trace.otlp_endpoint}")
    if variants:
        ab_cfg = config.serving.ab
        command += [f"--variants={json.dumps(variants, default=str)}"]
        command += [f"--user-header={ab_cfg.user_header}", f"--ab-seed={ab_cfg.seed}"]
    env = {UPSTREAM_KEY_ENV: getattr(upstream, "api_key", "") or ""}
    log_path = log_dir / "gateway.log"
    timeout_s = float(getattr(getattr(config, "serving", None), "startup_timeout_s", 60.0))
    process = start_process(command, log_path, env)
    try:
        base = f"http://{host}:{port}"
        wait_until_healthy(process, f"{base}/health", timeout_s, log_path, what="the gateway")
        log.info("gateway %s/v1 -> %s (traces: %s)", base, upstream.base_url, db)
        yield replace(upstream, base_url=f"{base}/v1", model=name or upstream.model)
    finally:
        stop_process(process)


# ---------------------------------------------------------------- what one request records


@dataclass
class Exchange:
    """One request in flight: what was asked, and what has come back so far."""

    request_id: str
    started: float  # time.time()
    started_perf: float
    endpoint: str
    body: dict[str, Any]
    prompt_version: str
    tag: str
    stream: bool
    first_token_perf: float | None = None
    text: list[str] = field(default_factory=list)
    finish_reason: str = ""
    usage: dict[str, Any] | None = None
    token_chunks: int = 0
    status: int = 200
    error: str = ""
    variant: str = ""  # the A/B variant chosen (serving.ab), and what it serves
    served: dict[str, Any] | None = None

    def take_chunk(self, chunk: dict[str, Any], now: float) -> None:
        """Fold one streamed event (a parsed `data:` payload) into the exchange."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if "error" in chunk and not chunk.get("choices"):
            self.error = f"stream error: {json.dumps(chunk['error'])[:500]}"
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            if piece:
                self.text.append(piece)
                self.token_chunks += 1
                if self.first_token_perf is None:
                    self.first_token_perf = now
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def take_stream(self, pieces: list[tuple[float, bytes]]) -> None:
        """Fold a streamed answer, as (arrival time, bytes) pieces, into the exchange.

        Runs once, after the answer has been relayed: the events' JSON is decoded in
        one call, and each event gets the arrival time of the piece that completed it.
        """
        body = b"".join(piece for _, piece in pieces)
        piece_ends = list(itertools.accumulate(len(piece) for _, piece in pieces))
        spans = event_spans(body)
        rest = spans[-1][2] if spans else 0  # an unterminated last event counts too
        event_ends, datas = [], []
        for start, stop, end in [*spans, (rest, len(body), len(body))]:
            if data := event_data(body[start:stop]):
                event_ends.append(end)
                datas.append(data)
        for end, payload in zip(event_ends, decode_all(datas)):
            if isinstance(payload, dict):
                self.take_chunk(payload, pieces[bisect.bisect_left(piece_ends, end)][0])

    def take_whole(self, content: bytes) -> None:
        """Fold a whole answer (not streamed, or an error) into the exchange."""
        if self.status >= 400:
            detail = content[:500].decode(errors="replace")
            self.error = self.error or f"upstream {self.status}: {detail}"
        elif isinstance(payload := _json_or_none(content), dict):
            self.take_response(payload)

    def take_response(self, payload: dict[str, Any]) -> None:
        """Fold a whole (non-streamed) answer into the exchange."""
        self.usage = payload.get("usage") or None
        for choice in payload.get("choices") or []:
            message = choice.get("message") or {}
            self.text.append(message.get("content") or choice.get("text") or "")
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def record(self, served: dict[str, Any], engine: str, now: float) -> TraceRecord:
        served = self.served or served
        latency_ms = (now - self.started_perf) * 1000
        first = self.first_token_perf
        usage = self.usage or {}
        prompt = prompt_of(self.body)
        return TraceRecord(
            request_id=self.request_id,
            time=self.started,
            endpoint=self.endpoint,
            model=str(self.body.get("model", "")),
            engine=engine,
            run_id=str(served.get("run_id") or ""),
            artifact_hash=str(served.get("artifact_hash") or ""),
            served_path=str(served.get("path") or ""),
            prompt_version=self.prompt_version,
            tag=self.tag,
            stream=self.stream,
            status=self.status,
            error=self.error,
            latency_ms=round(latency_ms, 3),
            ttft_ms=round((first - self.started_perf) * 1000, 3) if first else None,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens", self._counted_tokens()),
            usage_source="upstream" if self.usage else "counted",
            finish_reason=self.finish_reason,
            prompt=prompt,
            prompt_hash=hashlib.sha256(prompt.encode()).hexdigest()[:16],
            response="".join(self.text),
            params=json.dumps({k: v for k, v in self.body.items() if k not in PROMPT_FIELDS}),
            variant=self.variant,
        )

    def _counted_tokens(self) -> int | None:
        # without usage from upstream: one streamed content event per token (vLLM, transformers)
        return self.token_chunks if self.stream and self.status < 400 else None


PROMPT_FIELDS = ("messages", "prompt")


def prompt_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        return json.dumps(body["messages"], ensure_ascii=False)
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def wants_usage(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def with_usage_requested(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}


def is_usage_only(chunk: dict[str, Any]) -> bool:
    """The extra event `include_usage` adds: usage and no choices."""
    return bool(chunk.get("usage")) and not chunk.get("choices")


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def event_spans(buffer: bytes) -> list[tuple[int, int, int]]:
    """(start, stop, end) of each complete SSE event: its text is buffer[start:stop] and its
    separator ends at `end`. A plain find when the stream has no CR (engines send bare
    newlines): the CR-or-not regex costs ~4 us per event, a tenth of the gateway's budget."""
    spans, start = [], 0
    if b"\r" in buffer:
        for match in EVENT_END.finditer(buffer):
            spans.append((start, match.start(), match.end()))
            start = match.end()
        return spans
    while (stop := buffer.find(b"\n\n", start)) >= 0:
        spans.append((start, stop, stop + 2))
        start = stop + 2
    return spans


def split_events(buffer: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Complete SSE events with their exact separators, and the incomplete rest."""
    spans = event_spans(buffer)
    events = [(buffer[start:stop], buffer[stop:end]) for start, stop, end in spans]
    return events, buffer[spans[-1][2] :] if spans else buffer


def event_data(event: bytes) -> bytes:
    """The `data:` payload of one SSE event; b"" for `[DONE]` and comment-only events."""
    if event.startswith(b"data: ") and b"\n" not in event:  # one data line: the usual event
        data = event[6:].strip()
    else:
        data = b"".join(
            line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")
        ).strip()
    return b"" if data == b"[DONE]" else data


def parse_event(event: bytes) -> dict[str, Any] | None:
    """The JSON payload of one SSE event (None for `[DONE]`, comments, non-JSON)."""
    payload = _json_or_none(event_data(event) or b"null")
    return payload if isinstance(payload, dict) else None


def decode_all(datas: list[bytes]) -> list[Any]:
    """JSON-decode many event payloads: one call for all, one each if any is not JSON."""
    try:
        decoded = json.loads(b"[" + b",".join(datas) + b"]")
    except ValueError:
        decoded = None
    if isinstance(decoded, list) and len(decoded) == len(datas):  # not `1,2` in one event
        return decoded
    return [_json_or_none(data) for data in datas]


# ---------------------------------------------------------------- HTTP/1.1 plumbing
#
# The relay path is plain asyncio protocols with httptools' C parser: an upstream body
# piece is written to the client from the parser's callback, and only appended, with its
# arrival time, to the exchange; events are parsed once, when the answer has ended. On a
# CPU box the engine, the client and the gateway share the same cores, so every
# microsecond per streamed token the gateway spends is taken from the engine (Starlette +
# httpx cost ~83 us per token here; this path ~35 us, tracing and syscalls included).

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"expect",
}
# authorization is replaced by the upstream key when the gateway has one; accept-encoding is
# dropped so that answers come back uncompressed and can be traced
DROP_REQUEST_HEADERS = HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding"}
DROP_RESPONSE_HEADERS = HOP_BY_HOP | {b"content-length"}
CONNECT_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 5.0  # streams still open on SIGTERM get this long before the store closes


def reason_phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def response_head(status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, reason_phrase(status))]
    lines += [name + b": " + value for name, value in headers]
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def json_answer(status: int, payload: Any, keep_alive: bool) -> bytes:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return response_head(status, headers, keep_alive) + body


def error_payload(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": f"lmstack gateway: {message}", "type": kind}}


@dataclass
class Incoming:
    """One request as the client sent it."""

    method: bytes = b""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    keep_alive: bool = True

    def header(self, name: bytes) -> str:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return ""


class Upstream:
    """The engine's …/v1 URL, and a pool of idle keep-alive connections to it."""

    def __init__(self, base_url: str, api_key: str = "") -> None:
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"--upstream: '{base_url}' is not an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.encode()  # "/v1": the gateway's /v1/x goes to <prefix>/x
        self.host_header = url.netloc.rsplit("@", 1)[-1].encode()
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.api_key = api_key
        self.idle: list[UpstreamConnection] = []

    async def connection(self) -> tuple[UpstreamConnection, bool]:
        """An idle connection (reused=True) or a new one."""
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection, True
        loop = asyncio.get_running_loop()
        opening = loop.create_connection(UpstreamConnection, self.host, self.port, ssl=self.ssl)
        _, connection = await asyncio.wait_for(opening, CONNECT_TIMEOUT_S)
        return connection, False

    def release(self, connection: UpstreamConnection) -> None:
        if not connection.closed:
            self.idle.append(connection)

    def request_bytes(self, incoming: Incoming, path: bytes, body: bytes) -> bytes:
        lines = [incoming.method + b" " + self.prefix + path + b" HTTP/1.1"]
        lines.append(b"host: " + self.host_header)
        for name, value in incoming.headers:
            if name in DROP_REQUEST_HEADERS or (name == b"authorization" and self.api_key):
                continue
            lines.append(name + b": " + value)
        if self.api_key:
            lines.append(b"authorization: Bearer " + self.api_key.encode())
        lines.append(b"content-length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def close(self) -> None:
        for connection in self.idle:
            connection.transport.close()
        self.idle.clear()


class UpstreamConnection(asyncio.Protocol):
    """One connection to the engine: parses its answers and hands them to the waiting Relay."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.parse_error = httptools.HttpParserError
        self.transport: Any = None
        self.relay: Relay | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, relay: Relay, request: bytes) -> None:
        self.relay, self.headers = relay, []
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.relay is None:  # bytes nobody asked for: this connection is not reusable
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except self.parse_error as error:
            relay, self.relay = self.relay, None
            self.transport.close()
            if relay is not None:
                relay.upstream_broken(f"invalid HTTP from upstream: {error}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.upstream_lost(exc)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.relay is not None:
            self.relay.upstream_head(self.parser.get_status_code(), self.headers)

    def on_body(self, body: bytes) -> None:
        if self.relay is not None:
            self.relay.upstream_body(body)

    def on_message_complete(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.upstream_done(self, self.parser.should_keep_alive())


class UsageStripper:
    """Removes the usage-only event the gateway asked for and the client did not."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, piece: bytes) -> bytes:
        events, self.pending = split_events(self.pending + piece)
        return b"".join(e + s for e, s in events if not _is_usage_event(e))

    def finish(self) -> bytes:
        rest, self.pending = self.pending, b""
        return b"" if not rest.strip() or _is_usage_event(rest) else rest


def _is_usage_event(event: bytes) -> bool:
    if b'"usage"' not in event:  # cheap test first: most events are tokens
        return False
    payload = parse_event(event)
    return payload is not None and is_usage_only(payload)


class Relay:
    """One client request: forwarded upstream, its answer written back piece by piece as it
    arrives and, for completions, traced when it has ended."""

    def __init__(self, gateway: Gateway, client: ClientConnection, incoming: Incoming) -> None:
        self.gateway, self.client, self.incoming = gateway, client, incoming
        self.upstream = gateway.upstream  # an A/B variant's engine when the gateway routes
        self.exchange: Exchange | None = None
        self.stripper: UsageStripper | None = None
        self.connection: UpstreamConnection | None = None
        self.request = b""
        self.reused = self.retried = self.head_sent = self.chunked = self.done = False
        self.framed = True  # upstream marks the body's end (length or chunks), not by closing
        self.whole = True  # trace the body as one JSON answer, not as a stream of events
        self.pieces: list[tuple[float, bytes]] = []

    # ---- the request

    def start(self) -> None:
        path = self.incoming.url
        route = path.split(b"?", 1)[0].decode("latin-1")
        if route == "/health":
            self.answer(200, self.gateway.health())
        elif route == "/v1/feedback" and self.incoming.method == b"POST":
            self.answer(*self.gateway.feedback(b"".join(self.incoming.body)))
        elif not route.startswith("/v1/"):
            self.answer(404, error_payload(f"no route {route!r}", "not_found"))
        elif route == "/v1/models" and self.incoming.method == b"GET" and self.gateway.renames:
            self.answer(200, models_listing(self.gateway.model))
        else:
            body = b"".join(self.incoming.body)
            if self.incoming.method == b"POST" and route[3:] in ENDPOINTS:
                body = self.begin_exchange(route[3:], body)
                if body is None:  # answered by the gateway (a 400, or an adapted request)
                    return
            self.request = self.upstream.request_bytes(self.incoming, path[3:], body)
            self.gateway.track(asyncio.ensure_future(self.send()))

    def begin_exchange(self, route: str, raw: bytes) -> bytes | None:
        """Start the trace of a completion request; the body to send upstream, or None when
        the gateway answers it itself (see `normalised`)."""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        self.exchange = Exchange(
            request_id=self.incoming.header(b"x-request-id") or uuid.uuid4().hex,
            started=time.time(),
            started_perf=time.perf_counter(),
            endpoint=ENDPOINTS[route],
            body=body,
            prompt_version=self.incoming.header(PROMPT_VERSION_HEADER.lower().encode()),
            tag=self.incoming.header(REQUEST_TAG_HEADER.lower().encode()),
            stream=bool(body.get("stream")),
        )
        if self.gateway.router is not None:  # an A/B test: the variant's engine and model name
            variant = self.gateway.route(self.incoming, self.exchange)
            self.upstream = self.gateway.upstreams[variant.name]
            body = {**body, "model": variant.model}
            raw = json.dumps(body).encode()
        plan = self.normalised(route, body)
        if plan is None:
            return None
        if plan.body != body:  # re-encoded only when normalising changed it
            body, raw = plan.body, json.dumps(plan.body).encode()
        if not (self.exchange.stream and not wants_usage(body)):
            return raw
        self.stripper = UsageStripper()
        return json.dumps(with_usage_requested(body)).encode()

    def normalised(self, route: str, body: dict[str, Any]) -> Plan | None:
        """The request as the engine takes it (openai_compat.normalise); None when the gateway
        answers it itself: a 400 naming the field the engine cannot honour, or an adapted
        request (fanned out, stop strings trimmed) whose answer the gateway builds."""
        if not body:
            return Plan(body, ENDPOINTS[route])  # not JSON: the engine says what is wrong
        try:
            plan = normalise(body, ENDPOINTS[route], self.gateway.model)
        except RequestRejected as rejected:
            self.reject(rejected)
            return None
        if plan.adapted:
            self.gateway.track(asyncio.ensure_future(self.adapted(plan, route)))
            return None
        return plan

    def reject(self, rejected: RequestRejected) -> None:
        message = str(rejected)
        if self.exchange is not None:
            self.exchange.status, self.exchange.error = 400, message
        payload = error_payload(message, "invalid_request_error")
        payload["error"] |= {"param": rejected.field, "code": 400}
        self.answer(400, payload)

    async def adapted(self, plan: Plan, route: str) -> None:
        """Make the upstream requests of an adapted plan (concurrently, not streamed), and
        answer with their combination: JSON, or an SSE stream for a streaming client."""
        import httpx

        upstream = self.upstream
        headers = {"content-type": "application/json"}
        if upstream.api_key:
            headers["authorization"] = f"Bearer {upstream.api_key}"
        elif auth := self.incoming.header(b"authorization"):
            headers["authorization"] = auth
        url = upstream.base_url + route
        try:
            async with httpx.AsyncClient(timeout=None) as client:
                posts = [client.post(url, json=b, headers=headers) for b in plan.upstream_bodies()]
                answers = await asyncio.gather(*posts)
        except httpx.HTTPError as error:
            self.fail(502, f"upstream {upstream.base_url} failed: {error!r}", "bad_gateway")
            return
        if self.done:  # the client went away meanwhile
            return
        if failed := next((a for a in answers if a.status_code >= 400), None):
            self.exchange.status = failed.status_code
            self.pieces = [(time.perf_counter(), failed.content)]
            self.answer_bytes(failed.status_code, failed.content, b"application/json")
            return
        answer = combine(plan, [a.json() for a in answers])
        whole = json.dumps(answer).encode()
        self.pieces = [(time.perf_counter(), whole)]
        if plan.stream:
            self.exchange.first_token_perf = time.perf_counter()
            self.answer_bytes(200, as_events(plan, answer), b"text/event-stream")
        else:
            self.answer_bytes(200, whole, b"application/json")

    def answer_bytes(self, status: int, body: bytes, content_type: bytes) -> None:
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        self.client.write(response_head(status, headers, self.incoming.keep_alive) + body)
        self.finish()
        self.client.response_done(self.incoming.keep_alive)

    async def send(self) -> None:
        upstream = self.upstream
        try:
            connection, self.reused = await upstream.connection()
        except OSError as error:  # TimeoutError included
            message = f"upstream {upstream.base_url} unreachable: {error!r}"
            self.fail(502, message, "bad_gateway")
            return
        if self.done:  # the client went away while we connected
            upstream.release(connection)
            return
        self.connection = connection
        connection.send(self, self.request)

    # ---- the answer (called by UpstreamConnection)

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        values = dict(headers)
        event_stream = b"event-stream" in values.get(b"content-type", b"")
        if self.exchange is not None:
            self.exchange.status = status
            self.whole = not self.exchange.stream or status >= 400 or not event_stream
        if self.stripper is not None and self.whole:
            self.stripper = None
        length = values.get(b"content-length")
        self.framed = length is not None or b"chunked" in values.get(b"transfer-encoding", b"")
        has_body = status >= 200 and status not in (204, 304) and self.incoming.method != b"HEAD"
        kept = [(name, value) for name, value in headers if name not in DROP_RESPONSE_HEADERS]
        if self.exchange is not None:  # what feedback names (POST /v1/feedback)
            kept.append((REQUEST_ID_HEADER, self.exchange.request_id.encode()))
            if self.exchange.variant:
                kept.append((VARIANT_HEADER, self.exchange.variant.encode()))
        if has_body and length is not None and self.stripper is None:
            kept.append((b"content-length", length))
        elif has_body:
            self.chunked = True
            kept.append((b"transfer-encoding", b"chunked"))
        self.client.write(response_head(status, kept, self.incoming.keep_alive))
        self.head_sent = True

    def upstream_body(self, piece: bytes) -> None:
        if self.exchange is not None:
            self.pieces.append((time.perf_counter(), piece))
        if self.stripper is not None:
            piece = self.stripper.feed(piece)
            if not piece:
                return
        self.client.write(b"%x\r\n%b\r\n" % (len(piece), piece) if self.chunked else piece)

    def upstream_done(self, connection: UpstreamConnection | None, keep_alive: bool) -> None:
        if self.stripper is not None and (rest := self.stripper.finish()):
            self.client.write(b"%x\r\n%b\r\n" % (len(rest), rest))
        if self.chunked:
            self.client.write(b"0\r\n\r\n")
        self.connection = None
        if connection is not None and keep_alive:
            self.upstream.release(connection)
        elif connection is not None:
            connection.transport.close()
        self.finish()
        self.client.response_done(self.incoming.keep_alive)

    def upstream_lost(self, error: Exception | None) -> None:
        if self.done:
            return
        if not self.head_sent and self.reused and not self.retried:
            # an idle keep-alive connection the engine had closed: send again on a fresh one
            self.retried, self.connection = True, None
            self.gateway.track(asyncio.ensure_future(self.send()))
        elif self.head_sent and not self.framed and error is None:
            self.upstream_done(None, keep_alive=False)  # a body that ends when upstream closes
        else:
            self.upstream_broken(f"upstream closed the connection: {error!r}")

    def upstream_broken(self, message: str) -> None:
        if self.done:
            return
        if not self.head_sent:
            self.fail(502, message, "bad_gateway")
            return
        if self.exchange is not None:  # mid-stream: the client sees the connection end
            self.exchange.error = self.exchange.error or f"stream broken: {message}"
        self.finish()
        self.client.abort()

    # ---- endings

    def client_gone(self) -> None:
        if self.done:
            return
        if self.exchange is not None:
            self.exchange.error = self.exchange.error or "client disconnected mid-stream"
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.relay = None
            connection.transport.close()  # stops the engine's generation for this request
        self.finish()

    def answer(self, status: int, payload: Any) -> None:
        self.client.write(json_answer(status, payload, self.incoming.keep_alive))
        self.finish()
        self.client.response_done(self.incoming.keep_alive)

    def fail(self, status: int, message: str, kind: str) -> None:
        if self.done:
            return
        if self.exchange is not None:
            self.exchange.status, self.exchange.error = status, message
        self.answer(status, error_payload(message, kind))

    def finish(self) -> None:
        """Trace the exchange, once, whatever way the request ended."""
        if self.done:
            return
        self.done = True
        if self.exchange is None:
            return
        try:
            if self.whole:
                self.exchange.take_whole(b"".join(piece for _, piece in self.pieces))
            else:
                self.exchange.take_stream(self.pieces)
            self.gateway.record(self.exchange)
        except Exception:  # a request never fails because tracing failed
            log.exception("gateway: could not record request %s", self.exchange.request_id)


class ClientConnection(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, requests answered one after another."""

    def __init__(self, gateway: Gateway) -> None:
        import httptools

        self.gateway = gateway
        self.parser = httptools.HttpRequestParser(self)
        self.parse_error = httptools.HttpParserError
        self.transport: Any = None
        self.incoming = Incoming()
        self.waiting: deque[Incoming] = deque()
        self.relay: Relay | None = None
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.gateway.clients.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.parse_error as error:
            payload = error_payload(f"invalid HTTP request: {error}", "bad_request")
            self.write(json_answer(400, payload, keep_alive=False))
            self.transport.close()
            self.closed = True  # whatever else arrives on it is not answered

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gateway.clients.discard(self)
        if self.relay is not None:
            self.relay.client_gone()

    def pause_writing(self) -> None:  # a slow client: stop reading the engine for it
        if self.relay is not None and self.relay.connection is not None:
            self.relay.connection.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.relay is not None and self.relay.connection is not None:
            self.relay.connection.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.incoming = Incoming()

    def on_url(self, url: bytes) -> None:
        self.incoming.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.incoming.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.incoming.method = self.parser.get_method()
        self.incoming.keep_alive = self.parser.should_keep_alive()
        if self.incoming.header(b"expect").lower() == "100-continue":
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it before the body

    def on_body(self, body: bytes) -> None:
        self.incoming.body.append(body)

    def on_message_complete(self) -> None:
        self.waiting.append(self.incoming)
        if self.relay is None:
            self.next_request()

    # used by Relay
    def next_request(self) -> None:
        if self.waiting and not self.closed:
            self.relay = Relay(self.gateway, self, self.waiting.popleft())
            self.relay.start()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def response_done(self, keep_alive: bool) -> None:
        self.relay = None
        if not keep_alive:
            self.transport.close()
        else:
            self.next_request()

    def abort(self) -> None:
        self.relay = None
        self.transport.close()


class Gateway:
    """The gateway's shared state: upstream, trace store, what is served, open connections."""

    def __init__(
        self,
        upstream: Upstream,
        store: Any,
        engine: str,
        served: dict,
        router: Any = None,
        model: ServedModel | None = None,
    ) -> None:
        self.upstream, self.store, self.engine, self.served = upstream, store, engine, served
        self.model = model or ServedModel(engine=engine)
        # clients use a name the engine does not answer to (transformers serve: its path)
        self.renames = self.model.name != self.model.upstream_name and bool(self.model.name)
        self.clients: set[ClientConnection] = set()
        self.tasks: set[asyncio.Future] = set()
        # A/B (serving/ab.py): the router and each variant's upstream; None without a test
        self.router = router
        self.upstreams: dict[str, Upstream] = {}
        if router is not None:
            key = upstream.api_key
            self.upstreams = {v.name: Upstream(v.upstream, key) for v in router.variants}
        self.request_ids: dict[str, None] = {}  # recent ids, for feedback (insertion-ordered)

    def route(self, incoming: Incoming, exchange: Exchange) -> Any:
        variant = self.router.pick(incoming.header(self.router.header))
        exchange.variant, exchange.served = variant.name, variant.served
        return variant

    def feedback(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        """POST /v1/feedback: stored when well formed and about a request seen here."""
        try:
            fields = ab.parse_feedback(raw)
        except ab.FeedbackError as error:
            return error.status, error_payload(str(error), "invalid_request_error")
        known = fields["request_id"] in self.request_ids
        if not known and not stored_request(self.store.path, fields["request_id"]):
            message = f"request_id: no request {fields['request_id'][:100]!r} passed this gateway"
            return 404, error_payload(message, "not_found")
        self.store.add(FeedbackRecord(time=time.time(), **fields))
        return 200, {"recorded": True, "request_id": fields["request_id"]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "upstream": self.upstream.base_url, "traces": self.store.state()}

    def record(self, exchange: Exchange) -> None:
        self.store.add(exchange.record(self.served, self.engine, time.perf_counter()))
        self.request_ids[exchange.request_id] = None
        if len(self.request_ids) > MAX_REMEMBERED_IDS:  # older ids are looked up in the store
            del self.request_ids[next(iter(self.request_ids))]

    def track(self, task: asyncio.Future) -> None:
        self.tasks.add(task)  # held, so the loop does not drop it half way
        task.add_done_callback(self.tasks.discard)

    def busy(self) -> bool:
        return any(client.relay is not None for client in self.clients)

    async def serve(self, host: str, port: int) -> None:
        """Serve until SIGTERM or SIGINT; then let open requests finish, briefly."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: ClientConnection(self), host, port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("gateway on http://%s:%d/v1 -> %s", host, port, self.upstream.base_url)
        await stop.wait()
        server.close()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.transport.close()
        self.upstream.close()
        for upstream in self.upstreams.values():
            upstream.close()
        await asyncio.sleep(0)  # let connection_lost callbacks record what they cut off


# ---------------------------------------------------------------- the process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmstack.serving.gateway", description=__doc__)
    parser.add_argument("--upstream", required=True, help="the engine's base URL (…/v1)")
    parser.add_argument("--trace-db", required=True, help="the SQLite trace store")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--engine", default="", help="hf | vllm | external (recorded)")
    parser.add_argument("--served", default="{}", help="JSON: run_id, artifact_hash, ...")
    parser.add_argument("--served-name", default="", help="the `model` clients send")
    parser.add_argument("--upstream-model", default="", help="the `model` the engine takes")
    parser.add_argument("--redaction", default="none", choices=("none", "prompts", "all"))
    parser.add_argument("--retry-s", type=float, default=2.0, help="retry a failed store after")
    parser.add_argument("--otlp-endpoint", default="", help="also export spans to …/v1/traces")
    parser.add_argument("--variants", default="", help="A/B: JSON [{name, weight, upstream, ...}]")
    parser.add_argument("--user-header", default=ab.USER_HEADER, help="A/B: sticky user id")
    parser.add_argument("--ab-seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from lmstack.serving.traces import TraceStore, otlp_exporter

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    exporter = otlp_exporter(args.otlp_endpoint) if args.otlp_endpoint else None
    store = TraceStore(args.trace_db, args.redaction, args.retry_s, span_exporter=exporter)
    upstream = Upstream(args.upstream, os.environ.get(UPSTREAM_KEY_ENV, ""))
    router = None
    if args.variants:
        variants = ab.variants_from_json(json.loads(args.variants))
        router = ab.Router(variants, args.user_header, args.ab_seed)
    served = json.loads(args.served)
    model = ServedModel(
        name=args.served_name,
        upstream_name=args.upstream_model or args.served_name,
        path=str(served.get("path") or ""),
        engine=args.engine,
    )
    if model.path and not model.support.token_prompts:
        # token ids are decoded, long prompts counted, with the model's tokenizer: loaded in
        # the background, so the gateway is up at once
        threading.Thread(target=model.tokenizer, daemon=True).start()
    app = Gateway(upstream, store, args.engine, served, router, model)
    try:
        event_loop_runner()(app.serve(args.host, args.port))
    finally:
        store.close()


def event_loop_runner() -> Any:
    """uvloop's run when installed (the `serve` extra): a cheaper loop per streamed token."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


if __name__ == "__main__":
    main()
