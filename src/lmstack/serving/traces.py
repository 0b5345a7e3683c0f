"""The trace store: one row per served request, in SQLite, written in the background.

The gateway hands each finished request to `TraceStore.add`, which only appends to
an in-memory buffer: serving never waits on the disk. A writer thread drains the
buffer in batches. When the store cannot be written (a corrupt file, a lock held by
another process, a full disk) the writer logs one clear error naming the file,
keeps the traces buffered and tries again; on close, whatever is still unwritten is
saved to `<db>.pending.jsonl`, which the next store opened on that path reads back.
So a tracing failure never fails a request, and no trace is lost.

Optionally each trace is also exported as an OpenTelemetry span following the GenAI
semantic conventions (`gen_ai.*` attributes), to any OTLP collector.

OpenTelemetry (the serve extra, not always installed) is imported where used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.util.sqlite import read_rows

log = logging.getLogger("lmstack.traces")

TRACE_DB_NAME = "traces.sqlite"
REDACTED = "[redacted]"
REDACTIONS = ("none", "prompts", "all")
# bench warm-up requests carry this tag (header X-Lmstack-Request-Tag) and reports skip them
WARMUP_TAG = "warmup"


@dataclass
class TraceRecord:
    """What the gateway knows about one request when it has finished."""

    request_id: str
    time: float  # unix seconds when the gateway received the request
    endpoint: str  # chat | completions | other path
    model: str  # the `model` field the client sent
    engine: str
    run_id: str  # run identity of what is served ("" when not an lmstack run)
    artifact_hash: str  # content hash of the served weights ("" when unknown)
    served_path: str  # the folder (or hub id, or external model) that is served
    prompt_version: str  # X-Lmstack-Prompt-Version ("" when the client sent none)
    tag: str  # X-Lmstack-Request-Tag, e.g. "warmup"
    stream: bool
    status: int  # HTTP status sent to the client (502: upstream unreachable)
    error: str  # "" when the request succeeded
    latency_ms: float  # receive -> last byte sent
    ttft_ms: float | None  # receive -> first generated token (streams); = latency otherwise
    prompt_tokens: int | None
    completion_tokens: int | None
    usage_source: str  # upstream | counted (chunks counted, upstream sent no usage)
    finish_reason: str
    prompt: str  # the messages (JSON) or prompt text; REDACTED when asked
    prompt_hash: str  # hash of the prompt, kept under redaction (repeats stay visible)
    response: str  # the generated text; REDACTED when asked
    params: str  # the other request fields (JSON): max_tokens, temperature, ...
    variant: str = ""  # the A/B variant that answered (serving.ab); "" outside a test


@dataclass
class FeedbackRecord:
    """A user's verdict on one answer (POST /v1/feedback)."""

    request_id: str
    time: float
    score: float  # thumbs up = 1.0, down = 0.0, or the score given
    thumbs: int | None  # 1 up, 0 down, None when a score was given
    comment: str


FEEDBACK_SQL = (
    "CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "request_id TEXT, time REAL, score REAL, thumbs INTEGER, comment TEXT)"
)
FEEDBACK_INSERT = (
    "INSERT INTO feedback (request_id, time, score, thumbs, comment) VALUES (?, ?, ?, ?, ?)"
)


COLUMNS = [f.name for f in fields(TraceRecord)]
SQL_TYPES = {"float": "REAL", "float | None": "REAL", "int": "INTEGER", "bool": "INTEGER"}
SQL_TYPES |= {"int | None": "INTEGER", "str": "TEXT"}


def create_table_sql() -> str:
    columns = ", ".join(
        f"{f.name} {SQL_TYPES.get(str(f.type), 'TEXT')}" for f in fields(TraceRecord)
    )
    return f"CREATE TABLE IF NOT EXISTS traces (id INTEGER PRIMARY KEY AUTOINCREMENT, {columns})"


def insert_sql() -> str:
    return f"INSERT INTO traces ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def redact_record(record: TraceRecord, redaction: str) -> TraceRecord:
    """none: keep everything; prompts: drop the prompt; all: drop prompt and response."""
    if redaction in ("prompts", "all"):
        record.prompt = REDACTED
    if redaction == "all":
        record.response = REDACTED
    return record


class TraceStore:
    """Buffered, background-written SQLite store of TraceRecords (plus optional OTLP spans)."""

    def __init__(
        self,
        path: str | Path,
        redaction: str = "none",
        retry_s: float = 2.0,
        max_buffer: int = 100_000,
        span_exporter: Any = None,
        batch_size: int = 256,
    ) -> None:
        if redaction not in REDACTIONS:
            raise ValueError(f"trace redaction '{redaction}' is not one of {REDACTIONS}")
        self.path = Path(path)
        self.pending_path = self.path.with_name(self.path.name + ".pending.jsonl")
        self.redaction = redaction
        self.retry_s = retry_s
        self.batch_size = batch_size
        self.written = 0
        self.dropped = 0
        self.last_error = ""
        self._buffer: deque[TraceRecord] = deque(maxlen=max_buffer)
        self._wake = threading.Condition()
        self._closing = False
        self._tracer = _GenAITracer(span_exporter) if span_exporter is not None else None
        self._load_pending()
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    # ---- the serving side: never blocks, never raises ----

    def add(self, record: TraceRecord | FeedbackRecord) -> None:
        try:
            if isinstance(record, TraceRecord):
                record = redact_record(record, self.redaction)
            with self._wake:
                if len(self._buffer) == self._buffer.maxlen:
                    self.dropped += 1  # deque drops the oldest; counted and logged by the writer
                self._buffer.append(record)
                self._wake.notify()
        except Exception:  # tracing must never fail a request
            log.exception("trace store: could not buffer a trace")

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def state(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "written": self.written,
            "buffered": self.buffered,
            "dropped": self.dropped,
            "error": self.last_error,
        }

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is buffered (one last try), then save the rest to the pending file."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout_s)
        if self._buffer:
            self._save_pending()
        if self._tracer:
            self._tracer.shutdown()

    # ---- the writer thread ----

    def _run(self) -> None:
        connection = None
        while True:
            with self._wake:
                if not self._buffer and not self._closing:
                    self._wake.wait(timeout=1.0)
                if not self._buffer and self._closing:
                    break
            batch = [self._buffer[i] for i in range(min(self.batch_size, len(self._buffer)))]
            if not batch:
                continue
            traces = [r for r in batch if isinstance(r, TraceRecord)]
            try:
                connection = connection or self._connect()
                with connection:
                    connection.executemany(insert_sql(), [_row(r) for r in traces])
                    connection.executemany(
                        FEEDBACK_INSERT,
                        [astuple(r) for r in batch if isinstance(r, FeedbackRecord)],
                    )
            except (sqlite3.Error, OSError) as error:
                connection = _close_quietly(connection)
                self._report(error)
                if self._closing:
                    break
                time.sleep(self.retry_s)
                continue
            except Exception:  # a record SQLite cannot take: logged and dropped, never retried
                log.exception("trace store %s: %d traces not storable", self.path, len(batch))
                self.dropped += len(batch)
                with self._wake:
                    for _ in batch:
                        self._buffer.popleft()
                continue
            with self._wake:
                for _ in batch:
                    self._buffer.popleft()
            self.written += len(batch)
            self._recovered()
            if self._tracer:
                self._tracer.export(traces)
        _close_quietly(connection)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a short timeout: a lock held elsewhere is reported and retried, not waited out silently
        connection = sqlite3.connect(self.path, timeout=0.5, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(create_table_sql())
        connection.execute(FEEDBACK_SQL)
        add_missing_columns(connection)
        return connection

    def _report(self, error: Exception) -> None:
        message = f"trace store {self.path}: {describe_error(error)}"
        if message != self.last_error:
            log.error(
                "%s; serving goes on, %d traces are buffered and will be written again "
                "(retrying every %.0fs)",
                message,
                self.buffered,
                self.retry_s,
            )
        self.last_error = message

    def _recovered(self) -> None:
        if self.last_error:
            log.warning("trace store %s: writable again, buffered traces written", self.path)
            self.last_error = ""

    def _save_pending(self) -> None:
        records = list(self._buffer)
        try:
            with self.pending_path.open("a") as handle:
                for record in records:
                    kind = {"kind": "feedback"} if isinstance(record, FeedbackRecord) else {}
                    handle.write(json.dumps(asdict(record) | kind) + "\n")
            log.error(
                "trace store %s: %d traces could not be written; saved to %s (read back the next "
                "time a store opens %s)",
                self.path,
                len(records),
                self.pending_path,
                self.path.name,
            )
        except OSError as error:
            log.error("trace store %s: %d traces lost: %s", self.path, len(records), error)

    def _load_pending(self) -> None:
        if not self.pending_path.is_file():
            return
        text = self.pending_path.read_text()
        self.pending_path.unlink()
        records = [_pending_record(json.loads(line)) for line in text.splitlines() if line.strip()]
        self._buffer.extend(records)
        log.info("trace store %s: %d pending traces read back", self.path, len(records))


def _pending_record(fields: dict[str, Any]) -> TraceRecord | FeedbackRecord:
    if fields.pop("kind", "") == "feedback":
        return FeedbackRecord(**fields)
    return TraceRecord(**fields)


def add_missing_columns(connection: sqlite3.Connection) -> None:
    """A store written by an older lmstack lacks newer columns (variant): added, empty."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(traces)")}
    for f in fields(TraceRecord):
        if f.name not in present:
            sql_type = SQL_TYPES.get(str(f.type), "TEXT")
            connection.execute(f"ALTER TABLE traces ADD COLUMN {f.name} {sql_type} DEFAULT ''")
    connection.commit()


def describe_error(error: Exception) -> str:
    text = str(error)
    if "not a database" in text or "malformed" in text:
        return f"not a valid SQLite database (corrupt file?): {text}; move it away to start afresh"
    if "locked" in text or "busy" in text:
        return f"locked by another process: {text}"
    return f"{type(error).__name__}: {text}"


def _row(record: TraceRecord) -> tuple:
    return tuple(getattr(record, name) for name in COLUMNS)


def _close_quietly(connection: sqlite3.Connection | None) -> None:
    if connection is not None:
        with contextlib.suppress(sqlite3.Error):
            connection.close()
    return None


# ---- reading ----


def read_traces(path: str | Path, include_warmup: bool = False) -> list[dict[str, Any]]:
    """Every trace row of a store, oldest first (warm-up requests left out unless asked)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"trace store {path}: no such file")
    try:
        rows = read_rows(path, "SELECT * FROM traces ORDER BY id")
    except sqlite3.Error as error:
        raise DataError(f"trace store {path}: {describe_error(error)}") from None
    return [row for row in rows if include_warmup or row["tag"] != WARMUP_TAG]


def read_feedback(path: str | Path) -> list[dict[str, Any]]:
    """Every feedback row of a store, oldest first ([] for a store without feedback)."""
    try:
        return read_rows(path, "SELECT * FROM feedback ORDER BY id")
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []
        raise


def stored_request(path: str | Path, request_id: str) -> bool:
    """Whether a store holds a trace of this request (for feedback on an older request)."""
    if not Path(path).is_file():
        return False
    query = "SELECT 1 FROM traces WHERE request_id = ? LIMIT 1"
    try:
        return bool(read_rows(path, query, (request_id,), timeout=1.0))
    except sqlite3.Error:
        return False


def find_trace_dbs(source: str | Path) -> list[Path]:
    """A trace store file itself, or every store under a run or sweep directory."""
    source = Path(source)
    if source.is_file():
        return [source]
    return sorted(source.rglob(TRACE_DB_NAME))


def iter_sources(source: str | Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    for db in find_trace_dbs(source):
        yield db, read_traces(db)


# ---- OpenTelemetry (GenAI semantic conventions) ----

OPERATIONS = {"chat": "chat", "completions": "text_completion"}


def genai_attributes(record: TraceRecord, params: dict[str, Any]) -> dict[str, Any]:
    """A trace as `gen_ai.*` span attributes (plus lmstack's own identity keys)."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATIONS.get(record.endpoint, record.endpoint),
        "gen_ai.system": record.engine,
        "gen_ai.provider.name": record.engine,
        "gen_ai.request.model": record.model,
        "gen_ai.response.model": record.model,
        "gen_ai.response.id": record.request_id,
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "gen_ai.response.finish_reasons": [record.finish_reason] if record.finish_reason else None,
        "gen_ai.request.max_tokens": params.get("max_tokens"),
        "gen_ai.request.temperature": params.get("temperature"),
        "gen_ai.request.top_p": params.get("top_p"),
        "http.response.status_code": record.status,
        "error.type": record.error.split(":")[0] if record.error else None,
        "lmstack.run_id": record.run_id,
        "lmstack.artifact_hash": record.artifact_hash,
        "lmstack.prompt_version": record.prompt_version,
        "lmstack.ttft_ms": record.ttft_ms,
        "lmstack.stream": record.stream,
    }
    return {key: value for key, value in attributes.items() if value not in (None, "")}


class _GenAITracer:
    """One span per trace, handed to an OpenTelemetry span exporter (OTLP or in-memory)."""

    def __init__(self, exporter: Any) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": "lmstack"}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("lmstack.gateway")

    def export(self, records: Iterable[TraceRecord]) -> None:
        from opentelemetry.trace import Status, StatusCode

        for record in records:
            try:
                params = json.loads(record.params or "{}")
                start_ns = int(record.time * 1e9)
                span = self.tracer.start_span(
                    f"{OPERATIONS.get(record.endpoint, record.endpoint)} {record.model}",
                    start_time=start_ns,
                    attributes=genai_attributes(record, params),
                )
                if record.error:
                    span.set_status(Status(StatusCode.ERROR, record.error))
                span.end(end_time=start_ns + int(record.latency_ms * 1e6))
            except Exception:  # export is best effort; SQLite holds the record
                log.exception("trace store: could not export a span")

    def shutdown(self) -> None:
        self.provider.force_flush()
        self.provider.shutdown()


def otlp_exporter(endpoint: str) -> Any:
    """OTLP over HTTP (protobuf) to `endpoint` (…/v1/traces)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint)
