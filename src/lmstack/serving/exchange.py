"""Trace folding: one request through the gateway, folded into its trace record.

The relay (serving/relay.py) appends each piece of an answer, with its arrival time, to the
request's `Exchange` and folds them only when the answer has ended: a stream's events are
split and their JSON decoded in one go (serving/sse.py), each event timed by the piece that
completed it, so the gateway spends little per streamed token. `Exchange.record` makes the
`traces.TraceRecord` the store keeps.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from lmstack.serving.sse import decode_all, event_data, event_spans, json_or_none
from lmstack.serving.traces import TraceRecord

REQUEST_TAG_HEADER = "X-Lmstack-Request-Tag"  # recorded as the trace's tag ("warmup", ...)


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
    user: str = ""  # the user id header's value ("" without one)
    served: dict[str, Any] | None = None
    upstream_retries: int = 0  # sent again on a fresh connection (the pooled one was closed)
    # the traced prompt and its hash when made already (a large body's, capped, off the loop)
    prompt: str | None = None
    prompt_hash: str | None = None

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
        elif isinstance(payload := json_or_none(content), dict):
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
        prompt = storable(prompt_of(self.body) if self.prompt is None else self.prompt)
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
            prompt_hash=self.prompt_hash or hash_of_prompt(prompt),
            response=storable("".join(self.text)),
            params=json.dumps({k: v for k, v in self.body.items() if k not in PROMPT_FIELDS}),
            variant=self.variant,
            user=self.user,
            upstream_retries=self.upstream_retries,
        )

    def _counted_tokens(self) -> int | None:
        # without usage from upstream: one streamed content event per token (vLLM, transformers)
        return self.token_chunks if self.stream and self.status < 400 else None


PROMPT_FIELDS = ("messages", "prompt")


def storable(text: str) -> str:
    """`text`, with any unpaired surrogate (which UTF-8 and SQLite refuse) spelled out."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def hash_of_prompt(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def prompt_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        return json.dumps(body["messages"], ensure_ascii=False)
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
