"""The gateway's HTTP/1.1 relay: client connections in, one Relay per request, which forwards
it over an engine connection (serving/upstream.py) and writes the answer back.

Plain asyncio protocols with httptools' C parser: an upstream body piece is written to the
client from the parser's callback, and only appended, with its arrival time, to the
request's `Exchange` (serving/exchange.py); events are parsed once, when the answer has
ended. On a CPU box the engine, the client and the gateway share the same cores, so every
microsecond per streamed token the gateway spends is taken from the engine (Starlette +
httpx cost ~83 us per token here; this path ~35 us, tracing and syscalls included).

For streams whose client did not ask for usage, the relay asks upstream for it
(`stream_options.include_usage`) and removes the extra usage-only event again
(`UsageStripper`), so token counts come from the engine yet the client sees what the
engine would send. The gateway's shared state (serving/gateway.py) is what a relay
reads and records through: `GatewayState`.

httptools (the serve extra, not always installed) and httpx (only adapted requests use it;
the gateway process starts light) are imported where used.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmstack.prompts import PROMPT_VERSION_HEADER
from lmstack.serving.ab import REQUEST_ID_HEADER, VARIANT_HEADER
from lmstack.serving.exchange import REQUEST_TAG_HEADER, Exchange
from lmstack.serving.openai_compat import (
    Plan,
    RequestRejected,
    ServedModel,
    StopCutter,
    choice_event,
    chunk_text,
    combine,
    models_listing,
    normalise,
    sse_event,
    stream_object,
    summed_usage,
)
from lmstack.serving.sse import EventSplitter, parse_event
from lmstack.serving.upstream import DROP_RESPONSE_HEADERS, Upstream, UpstreamConnection

log = logging.getLogger("lmstack.gateway")

ENDPOINTS = {"/chat/completions": "chat", "/completions": "completions"}


class GatewayState(Protocol):
    """What a relay reads from, and records through, the gateway (serving/gateway.py)."""

    upstream: Upstream
    upstreams: dict[str, Upstream]  # an A/B test's variants by name; empty without one
    router: Any  # serving/ab.py's Router, or None
    model: ServedModel
    renames: bool  # clients use a name the engine does not answer to
    clients: set[ClientConnection]

    def health(self) -> dict[str, Any]: ...

    def feedback(self, raw: bytes) -> tuple[int, dict[str, Any]]: ...

    def route(self, incoming: Incoming, exchange: Exchange) -> Any: ...

    def record(self, exchange: Exchange) -> None: ...

    def track(self, task: asyncio.Future) -> None: ...


def wants_usage(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def with_usage_requested(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}


def is_usage_only(chunk: dict[str, Any]) -> bool:
    """The extra event `include_usage` adds: usage and no choices."""
    return bool(chunk.get("usage")) and not chunk.get("choices")


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


class UsageStripper:
    """Removes the usage-only event the gateway asked for and the client did not."""

    def __init__(self) -> None:
        self.events = EventSplitter()

    def feed(self, piece: bytes) -> bytes:
        events = self.events.feed(piece)
        return b"".join(e + s for e, s in events if not _is_usage_event(e))

    def finish(self) -> bytes:
        rest = self.events.finish()
        return b"" if not rest.strip() or _is_usage_event(rest) else rest


def _is_usage_event(event: bytes) -> bool:
    if b'"usage"' not in event:  # cheap test first: most events are tokens
        return False
    payload = parse_event(event)
    return payload is not None and is_usage_only(payload)


class Relay:
    """One client request: forwarded upstream, its answer written back piece by piece as it
    arrives and, for completions, traced when it has ended."""

    def __init__(self, gateway: GatewayState, client: ClientConnection, incoming: Incoming) -> None:
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
            method, headers = self.incoming.method, self.incoming.headers
            self.request = self.upstream.request_bytes(method, headers, path[3:], body)
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
                if plan.stream:
                    await self.adapted_stream(plan, client, url, headers)
                    return
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
        self.answer_bytes(200, whole, b"application/json")

    async def adapted_stream(self, plan: Plan, client: Any, url: str, headers: dict) -> None:
        """A streaming client's adapted request: one upstream stream per choice, relayed as it
        arrives (each choice's events under its index), cut at the first stop string."""
        import contextlib

        async with contextlib.AsyncExitStack() as stack:
            opening = [
                client.stream("POST", url, json=b, headers=headers) for b in plan.upstream_streams()
            ]
            streams = await asyncio.gather(*(stack.enter_async_context(o) for o in opening))
            if failed := next((r for r in streams if r.status_code >= 400), None):
                content = await failed.aread()
                self.exchange.status = failed.status_code
                self.pieces = [(time.perf_counter(), content)]
                self.answer_bytes(failed.status_code, content, b"application/json")
                return
            if self.done:
                return
            self.exchange.status, self.whole, self.chunked = 200, False, True
            head = [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")]
            head.append((REQUEST_ID_HEADER, self.exchange.request_id.encode()))
            self.client.write(response_head(200, head, self.incoming.keep_alive))
            self.head_sent = True
            event_head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time())}
            event_head |= {"model": plan.body.get("model", ""), "object": stream_object(plan)}
            usages = await asyncio.gather(
                *(self.relay_choice(plan, event_head, i, r) for i, r in enumerate(streams))
            )
        if plan.include_usage and not self.done:
            self.emit(
                sse_event({**event_head, "choices": [], "usage": summed_usage(usages, plan.n)})
            )
        if not self.done:
            self.emit(b"data: [DONE]\n\n")
            self.client.write(b"0\r\n\r\n")
            self.finish()
            self.client.response_done(self.incoming.keep_alive)

    async def relay_choice(self, plan: Plan, head: dict, index: int, stream: Any) -> dict:
        """One choice's upstream stream to the client; its usage. Text after a stop string is
        read (the engine goes on to max_tokens either way, and its usage says so) but not sent."""
        cutter, finish, usage = StopCutter(plan.stop), None, {}
        async for line in stream.aiter_lines():
            if self.done:  # the client went away: closing the stream stops the generation
                break
            data = line[5:].strip() if line.startswith("data:") else ""
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if text := cutter.feed(chunk_text(choice)):
                    self.emit(choice_event(plan, head, index, text))
                if cutter.hit and finish is None:
                    finish = "stop"
                    self.emit(choice_event(plan, head, index, finish=finish))
                finish = finish or choice.get("finish_reason")
        if not cutter.hit and not self.done:
            if rest := cutter.rest():
                self.emit(choice_event(plan, head, index, rest))
            self.emit(choice_event(plan, head, index, finish=finish or "stop"))
        return usage

    def emit(self, event: bytes) -> None:
        """One SSE event to a streaming client (chunked), and to the request's trace."""
        if self.done:
            return
        self.pieces.append((time.perf_counter(), event))
        self.client.write(b"%x\r\n%b\r\n" % (len(event), event))

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

    def __init__(self, gateway: GatewayState) -> None:
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
