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

from lmstack.config.groups.gateway import GatewayLimits
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
    sse_event,
    stream_object,
    summed_usage,
)
from lmstack.serving.preparing import OFFLOAD_BYTES, Busy, Prepared, Preparer, prepare
from lmstack.serving.sse import EventSplitter, parse_event
from lmstack.serving.upstream import DROP_RESPONSE_HEADERS, Upstream, UpstreamConnection

log = logging.getLogger("lmstack.gateway")

ENDPOINTS = {"/chat/completions": "chat", "/completions": "completions"}
FRAMING_HEADERS = (b"content-length", b"transfer-encoding")


class GatewayState(Protocol):
    """What a relay reads from, and records through, the gateway (serving/gateway.py)."""

    upstream: Upstream
    upstreams: dict[str, Upstream]  # an A/B test's variants by name; empty without one
    router: Any  # serving/ab.py's Router, or None
    user_header: bytes  # the user id header, lower case (recorded; A/B: the sticky key)
    model: ServedModel
    limits: GatewayLimits
    preparer: Preparer  # large bodies are prepared in its worker process
    max_body_bytes: int  # limits.max_body_bytes, or derived from the model's context length
    renames: bool  # clients use a name the engine does not answer to
    clients: set[ClientConnection]

    def health(self) -> dict[str, Any]: ...

    def feedback(self, raw: bytes) -> tuple[int, dict[str, Any]]: ...

    def route(self, incoming: Incoming, exchange: Exchange) -> Any: ...

    def record(self, exchange: Exchange) -> None: ...

    def track(self, task: asyncio.Future) -> None: ...


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


def json_answer(
    status: int, payload: Any, keep_alive: bool, extra: list[tuple[bytes, bytes]] = ()
) -> bytes:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return response_head(status, [*headers, *extra], keep_alive) + body


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
        self.request: list[bytes] = []
        self.reused = self.retried = self.head_sent = self.chunked = self.done = False
        self.answer_started = False  # a byte of the engine's answer has arrived
        self.held_head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.last_piece = b""  # a stream's [DONE], held until the trace is stored
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
                self.begin_exchange(route[3:], body)
            else:
                self.forward(body)

    def forward(self, body: bytes) -> None:
        """Send the request, with this body, to the engine."""
        method, headers = self.incoming.method, self.incoming.headers
        self.request = self.upstream.request_bytes(method, headers, self.incoming.url[3:], body)
        self.gateway.track(asyncio.ensure_future(self.send()))

    def begin_exchange(self, route: str, raw: bytes) -> None:
        """Start the trace of a completion request and prepare it for the engine
        (serving/preparing.py): here, or in the worker process when the body is large."""
        self.exchange = Exchange(
            request_id=self.incoming.header(b"x-request-id") or uuid.uuid4().hex,
            started=time.time(),
            started_perf=time.perf_counter(),
            endpoint=ENDPOINTS[route],
            body={},
            prompt_version=self.incoming.header(PROMPT_VERSION_HEADER.lower().encode()),
            tag=self.incoming.header(REQUEST_TAG_HEADER.lower().encode()),
            stream=False,
            user=self.incoming.header(self.gateway.user_header),
        )
        model = None
        if self.gateway.router is not None:  # an A/B test: the variant's engine and model name
            variant = self.gateway.route(self.incoming, self.exchange)
            self.upstream = self.gateway.upstreams[variant.name]
            model = variant.model
        if len(raw) > OFFLOAD_BYTES:
            self.gateway.track(asyncio.ensure_future(self.prepare_off_loop(route, raw, model)))
        else:
            self.proceed(route, raw, prepare(raw, ENDPOINTS[route], self.gateway.model, model))

    async def prepare_off_loop(self, route: str, raw: bytes, model: str | None) -> None:
        try:
            prepared = await self.gateway.preparer.prepare(raw, ENDPOINTS[route], model)
        except Busy as busy:
            self.fail(503, f"{busy}; try again shortly", "overloaded")
            return
        except Exception as error:  # the worker died, or a gateway bug: this request only
            log.exception("gateway: preparing a %d-byte request failed", len(raw))
            self.fail(500, f"could not prepare the request: {error!r}", "internal_error")
            return
        if not self.done:  # the client may have gone meanwhile
            self.proceed(route, raw, prepared)

    def proceed(self, route: str, raw: bytes, prepared: Prepared) -> None:
        """Go on with a prepared request: a 400 naming the field the engine cannot honour,
        an adapted request (fanned out, stop strings trimmed) whose answer the gateway
        builds, or the request forwarded."""
        exchange = self.exchange
        exchange.body, exchange.stream = prepared.body, prepared.stream
        exchange.prompt, exchange.prompt_hash = prepared.prompt, prepared.prompt_hash
        if prepared.rejected is not None:
            self.reject(RequestRejected(*prepared.rejected))
        elif prepared.plan.adapted:
            self.gateway.track(asyncio.ensure_future(self.adapted(prepared.plan, route)))
        else:
            if prepared.strip_usage:
                self.stripper = UsageStripper()
            self.forward(raw if prepared.upstream_raw is None else prepared.upstream_raw)

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
            done = b"data: [DONE]\n\n"
            self.pieces.append((time.perf_counter(), done))
            self.finish()  # traced before the stream's end leaves
            self.client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
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
        self.finish()  # traced before the answer leaves: a gateway killed after has traced it
        self.client.write(response_head(status, headers, self.incoming.keep_alive) + body)
        self.client.response_done(self.incoming.keep_alive)

    async def send(self, fresh: bool = False) -> None:
        upstream = self.upstream
        try:
            connection, self.reused = await upstream.connection(fresh)
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
        self.answer_started = True
        if self.exchange is not None and self.whole and has_body:
            # a whole answer is held until it has all arrived: an engine that dies half way
            # then still gets its client a 502, and the trace is stored before the answer
            # goes out (a gateway killed after answering has traced it)
            self.held_head = (status, [(n, v) for n, v in kept if n not in FRAMING_HEADERS])
            return
        self.client.write(response_head(status, kept, self.incoming.keep_alive))
        self.head_sent = True

    def upstream_body(self, piece: bytes) -> None:
        if self.exchange is not None:
            self.pieces.append((time.perf_counter(), piece))
        if self.held_head is not None:
            return
        if self.stripper is not None:
            piece = self.stripper.feed(piece)
            if not piece:
                return
        framed = b"%x\r\n%b\r\n" % (len(piece), piece) if self.chunked else piece
        if self.exchange is not None and b"data: [DONE]" in piece:
            self.last_piece = framed  # sent once the trace is stored (upstream_done)
            return
        self.client.write(framed)

    def upstream_done(self, connection: UpstreamConnection | None, keep_alive: bool) -> None:
        self.connection = None
        if connection is not None and keep_alive:
            self.upstream.release(connection)
        elif connection is not None:
            connection.transport.close()
        self.finish()  # traced before the answer's last bytes leave
        if self.held_head is not None:
            status, headers = self.held_head
            body = b"".join(piece for _, piece in self.pieces)
            headers.append((b"content-length", b"%d" % len(body)))
            self.client.write(response_head(status, headers, self.incoming.keep_alive) + body)
            self.head_sent = True
        else:
            self.client.write(self.last_piece)
            if self.stripper is not None and (rest := self.stripper.finish()):
                self.client.write(b"%x\r\n%b\r\n" % (len(rest), rest))
            if self.chunked:
                self.client.write(b"0\r\n\r\n")
        self.client.response_done(self.incoming.keep_alive)

    def upstream_lost(self, error: Exception | None) -> None:
        if self.done:
            return
        if not self.answer_started and self.reused and not self.retried:
            # a pooled connection the engine closed before a byte of the answer: the engine
            # did nothing with the request, so it is sent again, once, on a fresh connection
            # (what mature proxies do for a closed idle upstream)
            self.retried, self.connection = True, None
            if self.exchange is not None:
                self.exchange.upstream_retries += 1
            self.gateway.track(asyncio.ensure_future(self.send(fresh=True)))
        elif self.head_sent and not self.framed and error is None:
            self.upstream_done(None, keep_alive=False)  # a body that ends when upstream closes
        else:
            self.upstream_broken(f"upstream closed the connection: {error!r}")

    def upstream_broken(self, message: str) -> None:
        """The engine's answer cannot be finished (it died, or sent invalid HTTP): a 502 when
        the client has not had the head yet; mid-stream, a last SSE error event ends the
        stream in a way clients read; otherwise the connection is cut."""
        if self.done:
            return
        if not self.head_sent:
            self.fail(502, message, "bad_gateway")
            return
        if self.exchange is not None:
            self.exchange.error = self.exchange.error or f"stream broken: {message}"
        if self.chunked and not self.whole:
            event = sse_event(error_payload(f"the engine's stream ended: {message}", "bad_gateway"))
            self.finish()
            self.client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
            self.client.response_done(keep_alive=False)
            return
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
        self.finish()  # traced before the answer leaves
        data = json_answer(status, payload, self.incoming.keep_alive)
        if self.incoming.method == b"HEAD":  # the head a GET would get, without its body
            data = data[: data.index(b"\r\n\r\n") + 4]
        self.client.write(data)
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


class RequestRefused(Exception):
    """A client request over one of the gateway's limits: answered with `status`, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ClientConnection(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, requests answered one after another.

    The limits (config/groups/gateway.py's `GatewayLimits`) are checked as bytes arrive, so
    an oversized request is refused before it is buffered: the request line (414) and the
    header block (431) while they arrive, the body from its Content-Length (413). A
    timer runs whenever the gateway waits on the client, never while the engine answers:
    the headers' (408), the body's between bytes (408), keep-alive between requests (the
    connection is closed quietly).
    """

    def __init__(self, gateway: GatewayState) -> None:
        import httptools

        self.gateway = gateway
        self.limits = gateway.limits
        self.parser = httptools.HttpRequestParser(self)
        self.parse_error = httptools.HttpParserError
        self.upgrade = httptools.HttpParserUpgrade
        self.transport: Any = None
        self.incoming = Incoming()
        self.waiting: deque[Incoming] = deque()
        self.relay: Relay | None = None
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.in_head = False  # between a request's first byte and the end of its headers
        self.in_body = False
        self.head_bytes = self.header_bytes = self.body_bytes = 0
        self.refusal: tuple[int, str] | None = None  # held while an answer is being written

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if len(self.gateway.clients) >= self.limits.max_connections:
            self.refuse_connection()
            return
        self.gateway.clients.add(self)
        # a connection that never sends a byte holds a slot: it gets the headers' time
        self.wait_for_client(self.limits.header_timeout_s, None)

    def refuse_connection(self) -> None:
        """One connection over max_connections: a 503 saying when to come back, then closed."""
        self.closed = True
        limit = self.limits.max_connections
        message = f"{limit} connections are open (serving.limits.max_connections)"
        retry = [(b"retry-after", b"%d" % self.limits.retry_after_s)]
        payload = error_payload(message, "overloaded")
        self.transport.write(json_answer(503, payload, keep_alive=False, extra=retry))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.in_head and not self.in_body and self.relay is None and not self.waiting:
            self.start_head()
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if self.in_head and self.head_bytes > self.head_limit():
                raise RequestRefused(431, self.header_limit_message())
        except RequestRefused as refused:
            self.refuse(refused.status, str(refused))
        except self.upgrade:
            # the request before the switch is complete and queued; the gateway speaks no
            # other protocol, so it answers that one over HTTP/1.1 and closes (as uvicorn does)
            self.incoming.keep_alive = False
            self.transport.pause_reading()
        except self.parse_error as error:
            cause = error.__context__
            if isinstance(cause, RequestRefused):  # raised in a callback, wrapped by httptools
                self.refuse(cause.status, str(cause))
            else:
                self.refuse(400, f"invalid HTTP request: {error}")

    def head_limit(self) -> int:
        return self.limits.max_request_line_bytes + self.limits.max_header_bytes

    def header_limit_message(self) -> str:
        return (
            f"request headers over {self.limits.max_header_bytes} bytes "
            "(serving.limits.max_header_bytes)"
        )

    def refuse(self, status: int, message: str) -> None:
        """Answer a request the gateway will not read further, and close the connection:
        whatever else arrives on it is not answered. A request pipelined behind one being
        answered is refused after that answer, never in the middle of it."""
        if self.relay is not None:
            self.refusal = (status, message)
            self.transport.pause_reading()
            return
        kind = "request_timeout" if status == 408 else "invalid_request_error"
        self.write(json_answer(status, error_payload(message, kind), keep_alive=False))
        self.close()

    def close(self) -> None:
        self.cancel_timer()
        self.transport.close()
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.cancel_timer()
        self.gateway.clients.discard(self)
        if self.relay is not None:
            self.relay.client_gone()

    def pause_writing(self) -> None:  # a slow client: stop reading the engine for it
        if self.relay is not None and self.relay.connection is not None:
            self.relay.connection.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.relay is not None and self.relay.connection is not None:
            self.relay.connection.transport.resume_reading()

    # ---- timers: each names what the gateway is waiting for

    def wait_for_client(self, seconds: float, status: int | None, what: str = "") -> None:
        """(Re)arm the one timer: on expiry answer `status` (408) or, between requests,
        close quietly. None runs while the engine answers (next_request arms it after)."""
        self.cancel_timer()
        if self.relay is not None:
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(seconds, self.timed_out, status, what)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def timed_out(self, status: int | None, what: str) -> None:
        self.timer = None
        if self.closed:
            return
        if status is None:
            self.close()  # idle keep-alive: nothing was asked, nothing to answer
        else:
            self.refuse(status, what)

    def start_head(self) -> None:
        self.in_head, self.head_bytes, self.header_bytes = True, 0, 0
        self.wait_for_head()

    def wait_for_head(self) -> None:
        seconds = self.limits.header_timeout_s
        what = f"request headers not complete within {seconds:g}s (serving.limits.header_timeout_s)"
        self.wait_for_client(seconds, 408, what)

    def wait_for_body(self) -> None:
        seconds = self.limits.body_timeout_s
        what = f"no request body bytes for {seconds:g}s (serving.limits.body_timeout_s)"
        self.wait_for_client(seconds, 408, what)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.incoming = Incoming()
        self.body_bytes = 0
        if not self.in_head:  # a pipelined request that arrived with the one before it
            self.start_head()

    def on_url(self, url: bytes) -> None:
        self.incoming.url += url
        if len(self.incoming.url) > self.limits.max_request_line_bytes:
            limit = self.limits.max_request_line_bytes
            message = f"request line over {limit} bytes (serving.limits.max_request_line_bytes)"
            raise RequestRefused(414, message)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.incoming.headers.append((name.lower(), value))
        self.header_bytes += len(name) + len(value) + 4
        if len(self.incoming.headers) > self.limits.max_headers:
            limit = self.limits.max_headers
            raise RequestRefused(431, f"over {limit} request headers (serving.limits.max_headers)")
        if self.header_bytes > self.limits.max_header_bytes:
            raise RequestRefused(431, self.header_limit_message())

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.incoming.method = self.parser.get_method()
        self.incoming.keep_alive = self.parser.should_keep_alive()
        self.check_body_length(self.incoming.header(b"content-length"))
        self.in_body = True
        self.wait_for_body()
        if self.incoming.header(b"expect").lower() == "100-continue":
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it before the body

    def check_body_length(self, declared: str) -> None:
        """413 from Content-Length, before a byte of the body is read."""
        if declared.strip().isdigit() and int(declared) > self.gateway.max_body_bytes:
            raise RequestRefused(413, self.body_limit_message())

    def body_limit_message(self) -> str:
        return (
            f"request body over {self.gateway.max_body_bytes} bytes (serving.limits."
            "max_body_bytes; by default derived from the served model's context length)"
        )

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.gateway.max_body_bytes:  # a chunked body has no length
            raise RequestRefused(413, self.body_limit_message())
        self.incoming.body.append(body)
        self.wait_for_body()

    def on_message_complete(self) -> None:
        self.in_body = False
        self.cancel_timer()  # the engine's time is not the client's: no timer while it answers
        self.waiting.append(self.incoming)
        if self.relay is None:
            self.next_request()

    # used by Relay
    def next_request(self) -> None:
        if self.closed:
            return
        if self.waiting:  # the requests before the refused one are answered first
            self.relay = Relay(self.gateway, self, self.waiting.popleft())
            try:
                self.relay.start()
            except Exception:  # a gateway bug: this request gets a 500, the rest go on
                log.exception("gateway: request %r failed", self.relay.incoming.url[:200])
                self.relay.fail(500, "internal error (see gateway.log)", "internal_error")
        elif self.refusal is not None:
            self.refuse(*self.refusal)
        elif self.in_head:  # a pipelined request's head, arriving: its time starts now
            self.wait_for_head()
        elif self.in_body:
            self.wait_for_body()
        else:
            self.wait_for_client(self.limits.keep_alive_timeout_s, None)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def response_done(self, keep_alive: bool) -> None:
        self.relay = None
        if not keep_alive:
            self.close()
        else:
            self.next_request()

    def abort(self) -> None:
        self.relay = None
        self.close()
