"""The trace store: one row per served request, in SQLite, written in the background.

The gateway hands each finished request to `TraceStore.add`, which never waits on SQLite:
it appends the record to an in-memory buffer, which a writer thread drains into SQLite in
batches, and to a journal file beside the store. When the store cannot be written (a
corrupt file, a lock held by another process, a full disk) the writer logs one clear error
naming the file, keeps the traces buffered and tries again. So a tracing failure never
fails a request, and no trace is lost.

Durability: when `add` returns, the record is in the journal,
`<db>.journal.<id>.jsonl`, one JSON line written with a single `os.write` on an
O_APPEND file. The line is then in the OS page cache, so it survives the gateway being
killed (`kill -9`, the OOM killer, a crash) but not a power loss or an OS crash: there
is no fsync, which would cost a disk flush (milliseconds) per request on the gateway's
event loop; a gateway that loses its machine loses its last moments of traces, never a
request. The writer thread starts a new journal file once the current one passes 1 MiB and
discards the old one once every record in it is committed; a clean close saves what is
still unwritten to the pending file, `<db>.pending.jsonl`, and discards its journal files.
A store opening on the same path reads back the pending file and the journal files no live
store holds (each holds its own under an flock, which the kernel drops when the process
dies). A record may be both committed and still journaled when its process dies: a trace
or feedback already in the store (same request id and receive time) is not inserted again.
Request ids alone are not unique (a client may send its own X-Request-Id twice), so that
pair is the key, checked on insert against a plain index (a UNIQUE one could not be added
to an old store that happens to hold a repeated pair).

SQLite settings: WAL journal mode, so readers (the report, `mlflow ui`, a person with
`sqlite3` open) never block the writer and the writer never blocks them; and
synchronous=NORMAL, with which a WAL commit survives the process dying and is synced to
disk at checkpoints, not per commit. FULL (a sync per commit) would buy nothing here: the
journal and the buffer, where the newest traces are, do not survive a power loss either.
A write lock taken elsewhere (`BEGIN IMMEDIATE`, `BEGIN EXCLUSIVE`) only delays the writer
thread, which retries every `retry_s`: `add` and its journal take no SQLite lock.

Optionally each trace is also exported as an OpenTelemetry span following the GenAI
semantic conventions (`gen_ai.*` attributes), to any OTLP collector.

OpenTelemetry (the serve extra, not always installed) is imported where used.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.util.sqlite import read_rows

log = logging.getLogger("lmstack.traces")

TRACE_DB_NAME = "traces.sqlite"
# the store's layout, kept in SQLite's user_version: 0 = written before the version was kept
# (older columns are added on open), 1 = the user column. Readers that turn a store into
# training data (phase=harvest) refuse a version newer than this lmstack knows.
STORE_SCHEMA_VERSION = 1
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
    # the user id header's value (serving.ab.user_header, default X-Lmstack-User; "" without
    # one): harvested data is split by user, so no user is in both train and held-out
    user: str = ""
    upstream_retries: int = 0  # sent again on a fresh engine connection (a pooled one had closed)


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
# records read back from a journal may be in the store already: (request_id, time) is the key
FEEDBACK_INSERT = (
    "INSERT INTO feedback (request_id, time, score, thumbs, comment) SELECT ?, ?, ?, ?, ? "
    "WHERE NOT EXISTS (SELECT 1 FROM feedback WHERE request_id = ? AND time = ?)"
)
INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS traces_request ON traces (request_id, time)",
    "CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id, time)",
)
PENDING_SUFFIX = ".pending.jsonl"
JOURNAL_INFIX = ".journal."
JOURNAL_SEGMENT_BYTES = 1 << 20  # a journal file is retired once this big and all committed


COLUMNS = [f.name for f in fields(TraceRecord)]
FEEDBACK_COLUMNS = [f.name for f in fields(FeedbackRecord)]
SQL_TYPES = {"float": "REAL", "float | None": "REAL", "int": "INTEGER", "bool": "INTEGER"}
SQL_TYPES |= {"int | None": "INTEGER", "str": "TEXT"}


def create_table_sql() -> str:
    columns = ", ".join(
        f"{f.name} {SQL_TYPES.get(str(f.type), 'TEXT')}" for f in fields(TraceRecord)
    )
    return f"CREATE TABLE IF NOT EXISTS traces (id INTEGER PRIMARY KEY AUTOINCREMENT, {columns})"


def insert_sql() -> str:
    """Insert a trace unless the store holds it already (see the module's docstring)."""
    values = ", ".join("?" * len(COLUMNS))
    return (
        f"INSERT INTO traces ({', '.join(COLUMNS)}) SELECT {values} "
        "WHERE NOT EXISTS (SELECT 1 FROM traces WHERE request_id = ? AND time = ?)"
    )


def redact_record(record: TraceRecord, redaction: str) -> TraceRecord:
    """none: keep everything; prompts: drop the prompt; all: drop prompt and response."""
    if redaction in ("prompts", "all"):
        record.prompt = REDACTED
    if redaction == "all":
        record.response = REDACTED
    return record


class TraceStore:
    """Buffered, background-written SQLite store of TraceRecords (plus optional OTLP spans),
    journaled so that a killed process loses none."""

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
        self.pending_path = self.path.with_name(self.path.name + PENDING_SUFFIX)
        self.redaction = redaction
        self.retry_s = retry_s
        self.batch_size = batch_size
        self.written = 0
        self.dropped = 0
        self.last_error = ""
        self._buffer: deque[TraceRecord | FeedbackRecord] = deque(maxlen=max_buffer)
        self._done = 0  # records that left the buffer (committed or dropped), in journal order
        self._wake = threading.Condition()
        self._closing = False
        self._tracer = _GenAITracer(span_exporter) if span_exporter is not None else None
        self._journal = Journal(self.path)
        self._take_back(self._journal.open())
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    # ---- the serving side: never blocks on SQLite, never raises ----

    def add(self, record: TraceRecord | FeedbackRecord) -> None:
        """Buffer the record and journal it: durable against the process dying on return.
        Measured cost per call (Xeon, Python 3.11, writer thread parked on a locked store):
        9 µs with a 200-character prompt and answer, 12 µs with 1 kB, 20 µs with 4 kB,
        47 µs with 16 kB; json.dumps is two thirds of it, the os.write the rest."""
        try:
            if isinstance(record, TraceRecord):
                record = redact_record(record, self.redaction)
            line = journal_line(record)
            with self._wake:
                if len(self._buffer) == self._buffer.maxlen:
                    self.dropped += 1  # deque drops the oldest; counted and logged by the writer
                    self._done += 1
                self._buffer.append(record)
                self._journal.append(line)  # under the lock: journal order is buffer order
                self._wake.notify()
        except Exception:  # tracing must never fail a request
            log.exception("trace store: could not buffer a trace")

    def _take_back(self, records: list[TraceRecord | FeedbackRecord]) -> None:
        """Records read back from the journal, first in line (beyond max_buffer: dropped)."""
        overflow = max(0, len(records) - (self._buffer.maxlen or len(records)))
        self.dropped += overflow
        self._done += overflow
        self._buffer.extend(records)

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
        with self._wake:
            leftover = list(self._buffer)
            self._journal.close(leftover, self.pending_path)
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
                    connection.executemany(insert_sql(), [_keyed_row(r) for r in traces])
                    connection.executemany(
                        FEEDBACK_INSERT,
                        [_keyed_row(r) for r in batch if isinstance(r, FeedbackRecord)],
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
                self._committed(len(batch))
                continue
            self._committed(len(batch))
            self.written += len(batch)
            self._recovered()
            if self._tracer:
                self._tracer.export(traces)
        _close_quietly(connection)

    def _committed(self, count: int) -> None:
        """The first `count` buffered records are done with: journal files holding only
        such records are discarded."""
        with self._wake:
            for _ in range(count):
                self._buffer.popleft()
            self._done += count
        self._journal.rotate(self._wake)
        self._journal.release(self._done)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a short timeout: a lock held elsewhere is reported and retried, not waited out silently
        connection = sqlite3.connect(self.path, timeout=0.5, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")  # why: see the module's docstring
        connection.execute(create_table_sql())
        connection.execute(FEEDBACK_SQL)
        add_missing_columns(connection)
        for sql in INDEX_SQL:
            connection.execute(sql)
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version < STORE_SCHEMA_VERSION:
            connection.execute(f"PRAGMA user_version = {STORE_SCHEMA_VERSION}")
        connection.commit()
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


# ---- the journal: what `add` returned for, until SQLite has committed it ----


@dataclass
class Segment:
    """One journal file, held open (and flock-ed) by the store that writes or read it back."""

    path: Path
    fd: int
    size: int = 0
    last: int = 0  # journal sequence number of its last record, set once no more are added


class Journal:
    """Journal files beside a store: records are numbered in the order they are appended (the
    buffer's order), and a file is discarded once the store is done with its last number."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.added = 0  # sequence number of the last record appended or read back
        self.current: Segment | None = None
        self.sealed: deque[Segment] = deque()  # no longer appended to, oldest first
        self.error = ""

    def open(self) -> list[TraceRecord | FeedbackRecord]:
        """Read back what dead stores left (kept until committed), and start a journal file."""
        records = self._read_back()
        try:
            self.current = self._new_segment()
        except OSError as error:
            self._fail(error)
        return records

    def append(self, line: bytes) -> None:
        """One record, with one write (the caller holds the store's lock)."""
        self.added += 1
        if self.current is None:
            return
        try:
            written = os.write(self.current.fd, line)
            self.current.size += written
            if written < len(line):  # a full disk: end the cut line, so the next one reads
                self.current.size += os.write(self.current.fd, b"\n")
                raise OSError(f"a record cut short after {written} bytes (disk full?)")
        except OSError as error:  # the record is still buffered in memory
            self._fail(error)

    def rotate(self, lock: threading.Condition) -> None:
        """Start a fresh file once the current one is big, so that the old one can go."""
        if self.current is None or self.current.size < JOURNAL_SEGMENT_BYTES:
            return
        try:
            fresh = self._new_segment()  # outside the lock: creating a file may touch the disk
        except OSError as error:
            self._fail(error)
            return
        with lock:
            self.current.last = self.added
            self.sealed.append(self.current)
            self.current = fresh

    def release(self, done: int) -> None:
        while self.sealed and self.sealed[0].last <= done:
            discard(self.sealed.popleft())

    def close(self, leftover: list[TraceRecord | FeedbackRecord], pending: Path) -> None:
        """Save the leftover records to the pending file, then drop the journal files (kept,
        and read back next time, when the pending file cannot be written)."""
        segments = [*self.sealed, *([self.current] if self.current else [])]
        self.current, self.sealed = None, deque()
        try:
            if leftover:
                saved = self._save(leftover, pending)
                log.error(
                    "trace store %s: %d traces could not be written; saved to %s (read back "
                    "the next time a store opens %s)",
                    self.db,
                    len(leftover),
                    saved,
                    self.db.name,
                )
        except OSError as error:
            log.error(
                "trace store %s: %d traces could not be written nor saved (%s); they stay in "
                "its journal files, read back the next time a store opens it",
                self.db,
                len(leftover),
                error,
            )
            for segment in segments:
                os.close(segment.fd)
            return
        for segment in segments:
            discard(segment)

    def _save(self, records: list[TraceRecord | FeedbackRecord], pending: Path) -> Path:
        """All of `records` in one file, synced (a shutdown, not the hot path): the pending
        file when there is none, else a journal file of its own."""
        segment = self._new_segment()
        try:
            data = b"".join(journal_line(record) for record in records)
            while data:
                data = data[os.write(segment.fd, data) :]
            os.fsync(segment.fd)
            try:
                os.link(segment.path, pending)  # never over another store's pending file
            except OSError:
                return segment.path
            os.unlink(segment.path)
            return pending
        finally:
            os.close(segment.fd)

    def _read_back(self) -> list[TraceRecord | FeedbackRecord]:
        self._claim_pending()
        records: list[TraceRecord | FeedbackRecord] = []
        for path in sorted(self._segment_paths(), key=_age):
            try:
                adopted = adopt(path)
            except OSError as error:  # unreadable: left where it is, for a person to look at
                log.error("trace store %s: journal %s not read back: %s", self.db, path, error)
                continue
            if adopted is None:
                continue  # a live store's, or read back by another store just now
            segment, found = adopted
            self.added += len(found)
            segment.last = self.added
            self.sealed.append(segment)
            records += found
        if records:
            log.info("trace store %s: %d unwritten traces read back", self.db, len(records))
        return records

    def _claim_pending(self) -> None:
        """A pending file becomes a journal file, read back like one (rename: atomic, so two
        stores opening at once cannot both take it)."""
        pending = self.db.with_name(self.db.name + PENDING_SUFFIX)
        try:
            os.rename(pending, self._segment_name())
        except FileNotFoundError:
            pass
        except OSError as error:
            log.error("trace store %s: pending file %s not read back: %s", self.db, pending, error)

    def _segment_paths(self) -> list[Path]:
        pattern = glob.escape(self.db.name + JOURNAL_INFIX) + "*.jsonl"
        return list(self.db.parent.glob(pattern))

    def _segment_name(self) -> Path:
        return self.db.with_name(f"{self.db.name}{JOURNAL_INFIX}{uuid.uuid4().hex[:16]}.jsonl")

    def _new_segment(self) -> Segment:
        self.db.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            path = self._segment_name()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | O_CLOEXEC
            fd = os.open(path, flags, 0o644)
            # another store opening may have taken the new, empty file in between: try again
            if try_lock(fd) and os.fstat(fd).st_nlink:
                return Segment(path, fd)
            os.close(fd)
        raise OSError(f"could not start a journal file beside {self.db}")

    def _fail(self, error: OSError) -> None:
        message = f"trace store {self.db}: journal not writable ({error}); traces are kept in "
        message += "memory only until written, and lost if the gateway is killed"
        if message != self.error:
            log.error(message)
        self.error = message


O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def journal_line(record: TraceRecord | FeedbackRecord) -> bytes:
    """One JSON line, all ASCII (json escapes newlines and non-ASCII), so a line is a record."""
    fields = vars(record)
    if isinstance(record, FeedbackRecord):
        fields = fields | {"kind": "feedback"}
    return (json.dumps(fields, default=str) + "\n").encode()  # odd values: SQLite judges them


def read_journal(path: Path) -> list[TraceRecord | FeedbackRecord]:
    """The records of a journal or pending file; a line that is not one (a write cut short by
    a full disk, or by the kill itself, inside an add that never returned) is skipped."""
    records, bad = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            records.append(_pending_record(json.loads(line)))
        except (ValueError, TypeError):
            bad += 1
    if bad:
        log.warning("trace store journal %s: %d lines unreadable, skipped", path, bad)
    return records


def adopt(path: Path) -> tuple[Segment, list[TraceRecord | FeedbackRecord]] | None:
    """A journal file whose store is gone, locked for this store, and its records; None when
    it is in use, or gone."""
    try:
        fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if try_lock(fd) and os.fstat(fd).st_nlink:
            return Segment(path, fd), read_journal(path)
    except OSError:
        os.close(fd)
        raise
    os.close(fd)
    return None


def discard(segment: Segment) -> None:
    """Remove, then unlock (a store waiting on the lock then sees the file is gone)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(segment.path)
    os.close(segment.fd)


def try_lock(fd: int) -> bool:
    """An exclusive flock, at once or not at all; the kernel drops it when the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows: one store per file is assumed
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _age(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _pending_record(values: dict[str, Any]) -> TraceRecord | FeedbackRecord:
    if values.pop("kind", "") == "feedback":
        return FeedbackRecord(**{k: v for k, v in values.items() if k in FEEDBACK_COLUMNS})
    return TraceRecord(**{k: v for k, v in values.items() if k in COLUMNS})


def add_missing_columns(connection: sqlite3.Connection) -> None:
    """A store written by an older lmstack lacks newer columns (variant): added, empty."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(traces)")}
    for f in fields(TraceRecord):
        if f.name not in present:
            sql_type = SQL_TYPES.get(str(f.type), "TEXT")
            default = 0 if sql_type == "INTEGER" else "''"
            connection.execute(
                f"ALTER TABLE traces ADD COLUMN {f.name} {sql_type} DEFAULT {default}"
            )
    connection.commit()


def describe_error(error: Exception) -> str:
    text = str(error)
    if "not a database" in text or "malformed" in text:
        return f"not a valid SQLite database (corrupt file?): {text}; move it away to start afresh"
    if "locked" in text or "busy" in text:
        return f"locked by another process: {text}"
    return f"{type(error).__name__}: {text}"


def _keyed_row(record: TraceRecord | FeedbackRecord) -> tuple:
    """The record's values, then its key for the insert's duplicate check."""
    return (*astuple(record), record.request_id, record.time)


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


def check_schema_version(path: str | Path) -> int:
    """The store's layout version; a DataError naming the store for one newer than this
    lmstack knows (its columns may not mean what this code reads them as)."""
    try:
        (row,) = read_rows(path, "PRAGMA user_version")
    except sqlite3.Error as error:
        raise DataError(f"trace store {path}: {describe_error(error)}") from None
    version = int(row["user_version"])
    if version > STORE_SCHEMA_VERSION:
        raise DataError(
            f"trace store {path}: schema version {version} is unknown to this lmstack (it "
            f"reads versions 0 to {STORE_SCHEMA_VERSION}); upgrade lmstack to read it"
        )
    return version


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
