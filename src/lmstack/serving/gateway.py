"""The tracing gateway: a thin OpenAI-compatible reverse proxy in front of any engine.

    python -m lmstack.serving.gateway --upstream http://127.0.0.1:8000/v1 \
        --trace-db outputs/runs/x/traces.sqlite --port 9000

Every request to /v1/* is forwarded to the upstream engine unchanged and its answer
relayed back unchanged (streams piece by piece as they arrive, errors with their status
and body); on the side the gateway records a trace (see `traces.TraceRecord`): time,
prompt and response (redacted when asked), latency, TTFT, tokens, what is served, the
prompt version the client sent in `X-Lmstack-Prompt-Version`, status and error.

This module is the process (`main`) and the state its connections share (`Gateway`:
upstreams, trace store, A/B router, feedback). The parts, each in its own module:

- serving/gateway_process.py: `gateway()` starts this process in front of an engine (its
  own process, so it never competes with a benchmark client for the GIL) and stops it;
- serving/relay.py: the HTTP/1.1 relay, asyncio protocols with httptools' parser (on uvloop
  when installed), which writes each piece of an answer to the client as it arrives;
  serving/upstream.py: its connections to the engine;
- serving/exchange.py: trace folding, an answer's pieces into one `TraceRecord`, once the
  answer has ended, so the gateway costs little CPU per streamed token
  (see `benchmarks/gateway_overhead.py`);
- serving/sse.py: the server-sent-events parser (the load client reads streams with it too).

uvloop (the serve extra, not always installed) is imported where used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any

from lmstack.config.groups.gateway import GatewayLimits
from lmstack.serving import ab, request_schema
from lmstack.serving.exchange import Exchange
from lmstack.serving.gateway_process import UPSTREAM_KEY_ENV
from lmstack.serving.openai_compat import ServedModel
from lmstack.serving.preparing import Preparer
from lmstack.serving.relay import ClientConnection, Incoming, error_payload
from lmstack.serving.traces import FeedbackRecord, TraceStore, otlp_exporter, stored_request
from lmstack.serving.upstream import Upstream

log = logging.getLogger("lmstack.gateway")

MAX_REMEMBERED_IDS = 200_000
SHUTDOWN_GRACE_S = 5.0  # streams still open on SIGTERM get this long before the store closes


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
        limits: GatewayLimits | None = None,
        user_header: str = ab.USER_HEADER,
    ) -> None:
        self.upstream, self.store, self.engine, self.served = upstream, store, engine, served
        self.user_header = user_header.lower().encode()
        self.model = model or ServedModel(engine=engine)
        self.limits = limits or GatewayLimits()
        self.max_body_bytes = self.limits.body_limit(self.model.context_length())
        self.preparer = Preparer(self.model)
        # clients use a name the engine does not answer to (transformers serve: its path)
        self.renames = self.model.name != self.model.upstream_name and bool(self.model.name)
        self.clients: set[ClientConnection] = set()
        self.tasks: set[asyncio.Future] = set()
        # A/B (serving/ab.py): the router and each variant's upstream; None without a test
        self.router = router
        self.upstreams: dict[str, Upstream] = {}
        if router is not None:
            key, idle_s = upstream.api_key, upstream.idle_s
            self.upstreams = {v.name: Upstream(v.upstream, key, idle_s) for v in router.variants}
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

    async def drop_idle_upstream_connections(self) -> None:
        """Close pooled engine connections idle longer than limits.upstream_idle_s, before
        the engine's own keep-alive timeout closes them from its side."""
        pools = [self.upstream, *self.upstreams.values()]
        while True:
            await asyncio.sleep(max(self.limits.upstream_idle_s / 2, 0.1))
            for pool in pools:
                pool.drop_idle(time.monotonic() - pool.idle_s)

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
        log.info(
            "limits: body %d bytes, headers %d bytes / %d, %d connections",
            self.max_body_bytes,
            self.limits.max_header_bytes,
            self.limits.max_headers,
            self.limits.max_connections,
        )
        sweeper = asyncio.ensure_future(self.drop_idle_upstream_connections())
        await stop.wait()
        sweeper.cancel()
        server.close()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.transport.close()
        self.upstream.close()
        self.preparer.close()
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
    parser.add_argument("--user-header", default=ab.USER_HEADER, help="user id (A/B: sticky)")
    parser.add_argument("--ab-seed", type=int, default=0)
    parser.add_argument("--limits", default="{}", help="JSON: serving.limits (GatewayLimits)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    exporter = otlp_exporter(args.otlp_endpoint) if args.otlp_endpoint else None
    store = TraceStore(args.trace_db, args.redaction, args.retry_s, span_exporter=exporter)
    limits = GatewayLimits(**json.loads(args.limits))
    raise_open_files_limit()
    key = os.environ.get(UPSTREAM_KEY_ENV, "")
    upstream = Upstream(args.upstream, key, limits.upstream_idle_s)
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
    # the request validators import the openai package's types (~0.7 s): in the background
    # too, so no client's first request pays for it
    threading.Thread(target=request_schema.warm_up, daemon=True).start()
    app = Gateway(upstream, store, args.engine, served, router, model, limits, args.user_header)
    try:
        event_loop_runner()(app.serve(args.host, args.port))
    finally:
        store.close()


def raise_open_files_limit() -> None:
    """Each client holds two descriptors (its own and the engine's): the soft limit (often
    1024) is raised to the hard one, so max_connections, not EMFILE, is what refuses."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:  # an unlimited hard one: left alone
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def event_loop_runner() -> Any:
    """uvloop's run when installed (the `serve` extra): a cheaper loop per streamed token."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


if __name__ == "__main__":
    main()
