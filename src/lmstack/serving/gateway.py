"""The tracing gateway: a thin OpenAI-compatible reverse proxy in front of any engine.

    python -m lmstack.serving.gateway --upstream http://127.0.0.1:8000/v1 \
        --trace-db outputs/runs/x/traces.sqlite --port 9000

Every request to /v1/* is forwarded to the upstream engine unchanged and its answer
relayed back unchanged (streams event by event, errors with their status and body);
on the side the gateway records a trace (see `traces.TraceRecord`): time, prompt and
response (redacted when asked), latency, TTFT, tokens, what is served, the prompt
version the client sent in `X-Lmstack-Prompt-Version`, status and error.

For streams whose client did not ask for usage, the gateway asks upstream for it
(`stream_options.include_usage`) and removes the extra usage-only event again, so
token counts come from the engine yet the client sees what the engine would send.

It runs as its own process (uvicorn + httpx.AsyncClient) so that it never competes
with a benchmark client, or the caller's Python, for the GIL. `gateway()` starts it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmstack.prompts import PROMPT_VERSION_HEADER
from lmstack.serving.traces import TRACE_DB_NAME, TraceRecord

log = logging.getLogger("lmstack.gateway")

REQUEST_TAG_HEADER = "X-Lmstack-Request-Tag"
UPSTREAM_KEY_ENV = "LMSTACK_GATEWAY_UPSTREAM_KEY"
# request headers not forwarded: hop-by-hop, or recomputed by httpx for the new body
DROP_REQUEST_HEADERS = {"host", "content-length", "connection", "authorization", "accept-encoding"}
DROP_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}
EVENT_END = re.compile(rb"\r?\n\r?\n")
ENDPOINTS = {"/chat/completions": "chat", "/completions": "completions"}


# ---------------------------------------------------------------- starting it


@contextlib.contextmanager
def gateway(upstream: Any, config: Any, log_dir: Path) -> Iterator[Any]:
    """Start the gateway in front of `upstream` (an Endpoint); yield the gateway's Endpoint.

    The trace store is `config.trace.path`, or `<log_dir>/traces.sqlite`. The gateway
    process is always stopped, and its buffered traces written, on the way out.
    """
    from lmstack.serving.engines import (
        free_port,
        start_process,
        stop_process,
        wait_until_healthy,
    )

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
    ]
    if trace is not None:
        command += [f"--redaction={trace.redaction}", f"--retry-s={trace.retry_s}"]
        if trace.otlp_endpoint:
            command.append(f"--otlp-endpoint={trace.otlp_endpoint}")
    env = {UPSTREAM_KEY_ENV: getattr(upstream, "api_key", "") or ""}
    log_path = log_dir / "gateway.log"
    timeout_s = float(getattr(getattr(config, "serving", None), "startup_timeout_s", 60.0))
    process = start_process(command, log_path, env)
    try:
        base = f"http://{host}:{port}"
        wait_until_healthy(process, f"{base}/health", timeout_s, log_path, what="the gateway")
        log.info("gateway %s/v1 -> %s (traces: %s)", base, upstream.base_url, db)
        yield replace(upstream, base_url=f"{base}/v1")
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

    def take_response(self, payload: dict[str, Any]) -> None:
        """Fold a whole (non-streamed) answer into the exchange."""
        self.usage = payload.get("usage") or None
        for choice in payload.get("choices") or []:
            message = choice.get("message") or {}
            self.text.append(message.get("content") or choice.get("text") or "")
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def record(self, served: dict[str, Any], engine: str, now: float) -> TraceRecord:
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


def split_events(buffer: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Complete SSE events with their exact separators, and the incomplete rest."""
    events, start = [], 0
    for match in EVENT_END.finditer(buffer):
        events.append((buffer[start : match.start()], match.group()))
        start = match.end()
    return events, buffer[start:]


def parse_event(event: bytes) -> dict[str, Any] | None:
    """The JSON payload of one SSE event (None for `[DONE]`, comments, non-JSON)."""
    data = b"".join(
        line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")
    ).strip()
    if not data or data == b"[DONE]":
        return None
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


# ---------------------------------------------------------------- the proxy app


def build_app(
    upstream: str,
    store: Any,
    engine: str = "",
    served: dict[str, Any] | None = None,
    api_key: str = "",
) -> Any:
    """The Starlette app: /health, and /v1/* forwarded to `upstream` (a …/v1 URL)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    upstream = upstream.rstrip("/")
    served = served or {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits)

    def finish(exchange: Exchange) -> None:
        try:
            store.add(exchange.record(served, engine, time.perf_counter()))
        except Exception:  # a request never fails because tracing failed
            log.exception("gateway: could not record request %s", exchange.request_id)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "upstream": upstream, "traces": store.state()})

    async def proxy(request: Request) -> Response:
        path = "/" + request.path_params["path"]
        raw = await request.body()
        headers = forward_headers(request.headers, api_key)
        url = upstream + path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "POST" or path not in ENDPOINTS:
            return await relay_plain(request.method, url, raw, headers)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        exchange = Exchange(
            request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
            started=time.time(),
            started_perf=time.perf_counter(),
            endpoint=ENDPOINTS[path],
            body=body,
            prompt_version=request.headers.get(PROMPT_VERSION_HEADER, ""),
            tag=request.headers.get(REQUEST_TAG_HEADER, ""),
            stream=bool(body.get("stream")),
        )
        strip_usage = exchange.stream and not wants_usage(body)
        if strip_usage:
            raw = json.dumps(with_usage_requested(body)).encode()
        try:
            response = await client.send(
                client.build_request("POST", url, content=raw, headers=headers), stream=True
            )
        except httpx.HTTPError as error:
            exchange.status, exchange.error = 502, f"upstream unreachable: {error!r}"
            finish(exchange)
            message = f"lmstack gateway: upstream {upstream} unreachable: {error!r}"
            return JSONResponse({"error": {"message": message, "type": "bad_gateway"}}, 502)
        exchange.status = response.status_code
        media = response.headers.get("content-type", "")
        if not exchange.stream or response.status_code >= 400 or "event-stream" not in media:
            return await answer_whole(response, exchange)
        return StreamingResponse(
            relay_stream(response, exchange, strip_usage),
            status_code=response.status_code,
            headers=response_headers(response),
        )

    async def answer_whole(response: Any, exchange: Exchange) -> Response:
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        payload = _json_or_none(content)
        if response.status_code >= 400:
            detail = content[:500].decode(errors="replace")
            exchange.error = f"upstream {response.status_code}: {detail}"
        elif isinstance(payload, dict):
            exchange.take_response(payload)
        finish(exchange)
        return Response(content, response.status_code, headers=response_headers(response))

    async def relay_stream(
        response: Any, exchange: Exchange, strip_usage: bool
    ) -> AsyncIterator[bytes]:
        pending = b""
        try:
            async for chunk in response.aiter_raw():
                now = time.perf_counter()
                events, pending = split_events(pending + chunk)
                out = bytearray()
                for event, separator in events:
                    payload = parse_event(event)
                    if payload is not None:
                        exchange.take_chunk(payload, now)
                        if strip_usage and is_usage_only(payload):
                            continue
                    out += event + separator
                if not strip_usage:
                    yield chunk  # exactly what upstream sent, when it was sent
                elif out:
                    yield bytes(out)
            payload = parse_event(pending) if pending.strip() else None
            if payload is not None:
                exchange.take_chunk(payload, time.perf_counter())
            if strip_usage and pending and not (payload is not None and is_usage_only(payload)):
                yield pending
        except Exception as error:  # upstream broke off mid-stream: recorded, then re-raised
            exchange.error = exchange.error or f"stream broken: {error!r}"
            raise
        except BaseException:  # the client went away (cancelled); upstream is closed below
            exchange.error = exchange.error or "client disconnected mid-stream"
            raise
        finally:
            finish(exchange)
            with contextlib.suppress(Exception):
                await response.aclose()

    async def relay_plain(method: str, url: str, raw: bytes, headers: dict[str, str]) -> Response:
        try:
            response = await client.request(method, url, content=raw, headers=headers)
        except httpx.HTTPError as error:
            message = f"lmstack gateway: upstream unreachable: {error!r}"
            return JSONResponse({"error": {"message": message, "type": "bad_gateway"}}, 502)
        return Response(response.content, response.status_code, headers=response_headers(response))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await client.aclose()
        store.close()

    routes = [
        Route("/health", health),
        Route("/v1/{path:path}", proxy, methods=["GET", "POST", "DELETE"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def forward_headers(headers: Any, api_key: str) -> dict[str, str]:
    forwarded = {k: v for k, v in headers.items() if k.lower() not in DROP_REQUEST_HEADERS}
    if api_key:
        forwarded["authorization"] = f"Bearer {api_key}"
    elif "authorization" in headers:
        forwarded["authorization"] = headers["authorization"]
    return forwarded


def response_headers(response: Any) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS}


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


# ---------------------------------------------------------------- the process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmstack.serving.gateway", description=__doc__)
    parser.add_argument("--upstream", required=True, help="the engine's base URL (…/v1)")
    parser.add_argument("--trace-db", required=True, help="the SQLite trace store")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--engine", default="", help="hf | vllm | external (recorded)")
    parser.add_argument("--served", default="{}", help="JSON: run_id, artifact_hash, ...")
    parser.add_argument("--redaction", default="none", choices=("none", "prompts", "all"))
    parser.add_argument("--retry-s", type=float, default=2.0, help="retry a failed store after")
    parser.add_argument("--otlp-endpoint", default="", help="also export spans to …/v1/traces")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from lmstack.serving.traces import TraceStore, otlp_exporter

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request: noise
    exporter = otlp_exporter(args.otlp_endpoint) if args.otlp_endpoint else None
    store = TraceStore(args.trace_db, args.redaction, args.retry_s, span_exporter=exporter)
    app = build_app(
        args.upstream,
        store,
        engine=args.engine,
        served=json.loads(args.served),
        api_key=os.environ.get(UPSTREAM_KEY_ENV, ""),
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        # on SIGTERM, streams still open get this long before the store is closed
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
