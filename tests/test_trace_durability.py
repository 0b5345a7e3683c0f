"""The trace store survives `kill -9` of the real gateway process, and a locked store never
slows serving (serving/traces.py: the journal beside the store).

The engine is a small threaded OpenAI-compatible server (conftest.openai_server); the gateway
is the real process (`python -m lmstack.serving.gateway`), started here so that the test holds
its pid and can SIGKILL it mid-load. Each request carries its own X-Request-Id; a request
counts as completed when its whole 200 answer has reached the client.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmstack.serving.ab import REQUEST_ID_HEADER
from lmstack.serving.processes import free_port, start_process, stop_process, wait_until_healthy
from lmstack.serving.traces import (
    TRACE_DB_NAME,
    FeedbackRecord,
    TraceRecord,
    TraceStore,
    read_feedback,
    read_traces,
)

from conftest import chat_answer, openai_server

MODEL = "tiny-echo"
# at most 4 requests in flight: the engine here (HTTP/1.0, a connection per request) has a
# listen backlog of 5, and a connect it drops costs a 1 s SYN retry, not the store's doing
CLIENTS = 4
PROMPT_BOUND_S = 2.0  # an answer while the store is locked: the engine here answers in ~1 ms


def reply(body: dict, headers) -> dict:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    return chat_answer("seven apples", finish_reason="stop") | {"usage": usage}


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    with openai_server(MODEL, reply) as base_url:
        yield base_url


@contextlib.contextmanager
def running_gateway(engine: str, db: Path, log_path: Path) -> Iterator[tuple[object, str]]:
    """The gateway process in front of `engine`, tracing to `db`; yields (process, /v1 URL).
    Stopped with SIGTERM on the way out, unless the test killed it first."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "lmstack.serving.gateway",
        f"--upstream={engine}",
        f"--trace-db={db}",
        f"--port={port}",
        "--engine=external",
        f"--served-name={MODEL}",
        "--retry-s=0.2",
    ]
    process = start_process(command, log_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(process, f"{base}/health", 30.0, log_path, what="the gateway")
        yield process, f"{base}/v1"
    finally:
        stop_process(process)


class Load:
    """Client threads sending chat requests until stopped (or the gateway is gone); the ids
    of completed requests and each request's latency are kept."""

    def __init__(self, base_url: str, clients: int = CLIENTS) -> None:
        self.base_url = base_url
        self.completed: list[str] = []
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)

    def client(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as http:
            while not self.stop.is_set():
                request_id = uuid.uuid4().hex
                started = time.monotonic()
                try:
                    answer = http.post(
                        "/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": "3+4?"}]},
                        headers={"X-Request-Id": request_id},
                    )
                except httpx.HTTPError as error:  # the gateway was killed: not completed
                    self.failures.append(repr(error))
                    continue
                if answer.status_code != 200 or not answer.json()["choices"]:
                    self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    continue
                if answer.headers.get(REQUEST_ID_HEADER.decode()) != request_id:
                    self.failures.append(f"answer without its request id: {answer.headers}")
                    continue
                self.latencies.append(time.monotonic() - started)
                self.completed.append(request_id)

    def wait_for(self, count: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.completed) < count:
            assert time.monotonic() < deadline, f"{len(self.completed)} answers: {self.failures}"
            time.sleep(0.01)


def trace(request_id: str, when: float = 1.0) -> TraceRecord:
    values = {f: "" for f in TraceRecord.__dataclass_fields__} | {"request_id": request_id}
    numbers = {"time": when, "stream": False, "status": 200, "latency_ms": 1.0, "ttft_ms": 1.0}
    return TraceRecord(**(values | numbers | {"prompt_tokens": 1, "completion_tokens": 1}))


def seeded_store(db: Path) -> None:
    """A store in WAL mode with one trace, "seed", as a gateway that ran before leaves it."""
    store = TraceStore(db)
    store.add(trace("seed"))
    store.close()


def kill_9(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    assert process.returncode == -signal.SIGKILL


def stored_ids(db: Path) -> collections.Counter:
    return collections.Counter(row["request_id"] for row in read_traces(db))


def journal_files(db: Path) -> list[Path]:
    return sorted(db.parent.glob(f"{TRACE_DB_NAME}.journal.*")) + sorted(
        db.parent.glob(f"{TRACE_DB_NAME}.pending*")
    )


def warm_up(base_url: str) -> str:
    """One request, not timed: a fresh gateway's first request loads the OpenAI request
    schema (serving/request_schema.py), about 0.7 s here, whatever the store does."""
    request_id = uuid.uuid4().hex
    answer = httpx.post(
        f"{base_url}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "warm up"}]},
        headers={"X-Request-Id": request_id},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return request_id


def health(base_url: str) -> dict:
    return httpx.get(base_url.removesuffix("/v1") + "/health", timeout=5).json()["traces"]


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def assert_each_once(ids: list[str], stored: collections.Counter) -> None:
    missing = [i for i in ids if i not in stored]
    assert not missing, f"{len(missing)} of {len(ids)} completed requests have no trace"
    assert max(stored.values()) == 1, [i for i, n in stored.items() if n > 1][:5]


def test_kill_9_under_load_loses_no_completed_request(engine, tmp_path):
    db = tmp_path / TRACE_DB_NAME
    gateway_log = tmp_path / "gateway.log"
    with running_gateway(engine, db, gateway_log) as (process, base_url), Load(base_url) as load:
        load.wait_for(400)  # well into the load: commits and answers under way
        kill_9(process)
    completed = list(load.completed)
    assert len(completed) >= 400
    TraceStore(db).close()  # the next store on the path reads the journal back
    assert_each_once(completed, stored_ids(db))
    assert journal_files(db) == []  # all written: nothing left to read back


def test_kill_9_while_the_store_is_locked_the_journal_alone_keeps_the_traces(engine, tmp_path):
    """Deterministic: nothing can be committed, so every trace is only in the journal."""
    db = tmp_path / TRACE_DB_NAME
    seeded_store(db)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    gateway_log = tmp_path / "gateway.log"
    with running_gateway(engine, db, gateway_log) as (process, base_url):
        with Load(base_url) as load:
            load.wait_for(200)
        liked = load.completed[:3]
        for request_id in liked:
            answer = httpx.post(
                f"{base_url}/feedback", json={"request_id": request_id, "thumbs": "up"}
            )
            assert answer.status_code == 200, answer.text
        kill_9(process)
    lock.execute("ROLLBACK")
    lock.close()
    assert stored_ids(db) == {"seed": 1} and read_feedback(db) == []  # killed before any commit
    assert journal_files(db)
    TraceStore(db).close()
    assert_each_once(["seed", *load.completed], stored_ids(db))
    assert sorted(row["request_id"] for row in read_feedback(db)) == sorted(liked)


def test_a_restarted_gateway_reads_the_journal_back_and_appends(engine, tmp_path):
    db = tmp_path / TRACE_DB_NAME
    gateway_log = tmp_path / "first.log"
    with running_gateway(engine, db, gateway_log) as (process, base_url), Load(base_url) as first:
        first.wait_for(300)
        kill_9(process)
    with running_gateway(engine, db, tmp_path / "second.log") as (process, base_url):
        with Load(base_url, clients=2) as second:
            second.wait_for(100)
        wait_until(lambda: health(base_url)["buffered"] == 0)
    # every answer of both, once (the first's journal read back by the second), no row twice
    assert_each_once(first.completed + second.completed, stored_ids(db))
    assert journal_files(db) == []
    assert "unwritten traces read back" in (tmp_path / "second.log").read_text()


@pytest.mark.parametrize("begin", ["BEGIN EXCLUSIVE", "BEGIN IMMEDIATE"])
def test_a_store_locked_by_another_process_never_slows_serving(engine, tmp_path, begin):
    db = tmp_path / TRACE_DB_NAME
    seeded_store(db)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute(begin)
    with running_gateway(engine, db, tmp_path / "gateway.log") as (_, base_url):
        first = warm_up(base_url)
        with Load(base_url) as load:
            load.wait_for(200)
        assert not load.failures
        assert max(load.latencies) < PROMPT_BOUND_S, sorted(load.latencies)[-5:]
        wait_until(lambda: "locked" in health(base_url)["error"])  # the writer met the lock
        assert health(base_url)["written"] == 0
        lock.execute("ROLLBACK")
        lock.close()
        wait_until(lambda: health(base_url)["written"] == 1 + len(load.completed))
    assert_each_once(["seed", first, *load.completed], stored_ids(db))
    assert len(stored_ids(db)) == 2 + len(load.completed)


# ---- the journal itself, in process ----


def wait_written(store: TraceStore, count: int) -> None:
    wait_until(lambda: store.written >= count and not store.buffered)


def test_a_record_both_committed_and_journaled_is_stored_once(tmp_path):
    """What a kill between the commit and the journal's clean-up leaves: read back, not
    stored again. Request ids alone are not the key: a client may reuse one."""
    db = tmp_path / TRACE_DB_NAME
    store = TraceStore(db)
    records = [trace("a", 1.0), trace("a", 2.0), FeedbackRecord("a", 3.0, 1.0, 1, "")]
    for record in records:
        store.add(record)
    wait_written(store, 3)
    (journal,) = journal_files(db)
    left_behind = journal.read_bytes()
    store.close()
    (tmp_path / f"{TRACE_DB_NAME}.journal.dead.jsonl").write_bytes(left_behind)
    TraceStore(db).close()
    assert [(row["request_id"], row["time"]) for row in read_traces(db)] == [("a", 1.0), ("a", 2.0)]
    assert len(read_feedback(db)) == 1 and journal_files(db) == []


def test_journal_files_go_once_committed(tmp_path, monkeypatch):
    monkeypatch.setattr("lmstack.serving.traces.JOURNAL_SEGMENT_BYTES", 2_000)
    db = tmp_path / TRACE_DB_NAME
    store = TraceStore(db)
    for i in range(300):  # about 430 bytes a line: a new journal file every 5 records
        store.add(trace(f"r{i}"))
        if i % 50 == 0:
            wait_written(store, i + 1)
    wait_written(store, 300)
    assert len(journal_files(db)) == 1  # all committed: only the one being written is left
    store.close()
    assert journal_files(db) == [] and len(read_traces(db)) == 300


def test_a_live_stores_journal_is_not_read_back_by_another(tmp_path):
    db = tmp_path / TRACE_DB_NAME
    seeded_store(db)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the live store can commit nothing
    live = TraceStore(db, retry_s=0.1)
    for i in range(3):
        live.add(trace(f"live{i}"))
    other = TraceStore(db, retry_s=0.1)
    assert other.buffered == 0  # the live store's journal is locked: left to it
    other.close()
    lock.execute("ROLLBACK")
    lock.close()
    wait_written(live, 3)
    live.close()
    assert stored_ids(db) == {"seed": 1, "live0": 1, "live1": 1, "live2": 1}
