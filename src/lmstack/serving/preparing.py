"""A completion request's body, prepared for the engine: parsed, checked and normalised
(openai_compat.normalise), and what the trace keeps of it.

Small bodies, nearly all of them, are prepared on the gateway's event loop: it costs
microseconds. A large one (over OFFLOAD_BYTES) is prepared in a worker process
(`Preparer`): parsing, checking and re-encoding megabytes of JSON hold the GIL for tens of
milliseconds each, and the gateway's one event loop serves every other connection; a thread
would not free it. Only the bytes go to the worker, and back only what changed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import json
import multiprocessing
import re
from dataclasses import dataclass
from typing import Any

from lmstack.serving import request_schema
from lmstack.serving.exchange import PROMPT_FIELDS, hash_of_prompt, prompt_of
from lmstack.serving.openai_compat import Plan, RequestRejected, ServedModel, normalise

OFFLOAD_BYTES = 256 << 10
# the trace keeps this much of a prompt (and its hash, of all of it): a traced prompt is read
# by people and reports, and megabytes in SQLite rows slow both
TRACE_PROMPT_CHARS = 1 << 20
MAX_WAITING = 8  # large bodies waiting for the worker; one more is a 503


@dataclass
class Prepared:
    """What the relay needs of a prepared request."""

    body: dict[str, Any]  # as traced: without its prompt fields when `prompt` is given
    stream: bool
    plan: Plan | None = None  # None when rejected
    rejected: tuple[str, str] | None = None  # (field, message): a 400
    upstream_raw: bytes | None = None  # what the engine gets; None: the client's bytes
    strip_usage: bool = False  # usage was asked of the engine for the trace, not by the client
    prompt: str | None = None  # the traced prompt, when computed here (large bodies)
    prompt_hash: str | None = None


def prepare(raw: bytes, endpoint: str, served: ServedModel, model: str | None) -> Prepared:
    """`raw` as the engine takes it; `model` replaces the client's (an A/B variant's)."""
    body = parsed(raw)
    if (field := field_with_lone_surrogate(raw, body)) is not None:
        message = f"{field} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): not text"
        return Prepared(body={}, stream=False, rejected=(field, message))
    changed = model is not None
    if changed:
        body = {**body, "model": model}
    prepared = Prepared(body=body, stream=bool(body.get("stream")))
    if not body:
        prepared.plan = Plan(body, endpoint)  # not JSON: the engine says what is wrong
        return prepared
    try:
        plan = normalise(body, endpoint, served)
    except RequestRejected as rejected:
        prepared.rejected = (rejected.field, str(rejected))
        return prepared
    prepared.plan = plan
    if plan.adapted:
        return prepared
    upstream = plan.body
    if prepared.stream and not (upstream.get("stream_options") or {}).get("include_usage"):
        options = {**(upstream.get("stream_options") or {}), "include_usage": True}
        upstream, prepared.strip_usage = {**upstream, "stream_options": options}, True
    if changed or upstream != body:  # re-encoded only when something changed
        prepared.upstream_raw = json.dumps(upstream).encode()
    return prepared


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def field_with_lone_surrogate(raw: bytes, body: dict[str, Any]) -> str | None:
    """The top-level field whose JSON string holds an unpaired surrogate escape: JSON takes
    it, but it is no character, and no tokenizer, engine or trace store can encode it. Only
    a body with a surrogate escape at all (a fast byte search) is looked at closer."""
    if not SURROGATE_ESCAPE.search(raw):
        return None
    for name, value in body.items():
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            return str(name)
    return None


def parsed(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def prepare_large(raw: bytes, endpoint: str, model: str | None) -> Prepared:
    """`prepare` in the worker: the traced prompt is made here too (capped), and the body
    sent back without it, so little crosses back to the gateway."""
    prepared = prepare(raw, endpoint, _WORKER_MODEL, model)
    if prepared.plan is not None and prepared.plan.adapted:
        return prepared  # the relay builds the answer from the plan: it needs all of it
    prompt = prompt_of(prepared.body)
    prepared.prompt_hash = hash_of_prompt(prompt)
    if len(prompt) > TRACE_PROMPT_CHARS:
        cut = len(prompt) - TRACE_PROMPT_CHARS
        prompt = prompt[:TRACE_PROMPT_CHARS] + f"…[{cut} more characters not traced]"
    prepared.prompt = prompt
    prepared.body = {k: v for k, v in prepared.body.items() if k not in PROMPT_FIELDS}
    return prepared


_WORKER_MODEL = ServedModel()


def _start_worker(name: str, upstream_name: str, path: str, engine: str) -> None:
    global _WORKER_MODEL
    _WORKER_MODEL = ServedModel(name=name, upstream_name=upstream_name, path=path, engine=engine)
    request_schema.warm_up()


class Busy(Exception):
    """MAX_WAITING large bodies already wait for the worker."""


class Preparer:
    """The worker process for large bodies: started on the first one, one at a time."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.waiting = 0

    async def prepare(self, raw: bytes, endpoint: str, model: str | None) -> Prepared:
        if self.waiting >= MAX_WAITING:
            raise Busy(f"{MAX_WAITING} large requests are being prepared")
        self.waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.worker(), prepare_large, raw, endpoint, model)
        except concurrent.futures.process.BrokenProcessPool:
            self.pool = None  # the worker died (killed, out of memory): the next one starts anew
            raise
        finally:
            self.waiting -= 1

    def worker(self) -> concurrent.futures.ProcessPoolExecutor:
        if self.pool is None:
            served = self.served
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                # spawned, not forked: the gateway has threads (the trace writer) whose locks
                # a fork would copy held
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(served.name, served.upstream_name, served.path, served.engine),
            )
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
