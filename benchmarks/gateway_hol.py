"""Head-of-line blocking in the gateway: a small chat request's latency while 16 MB requests
are being handled, against its idle latency.

    .venv/bin/python benchmarks/gateway_hol.py [--small 200] [--big-mb 16]
    .venv/bin/python benchmarks/gateway_hol.py --baseline-src /tmp/old/src   # an older gateway

One gateway process in front of a real HTTP engine process that answers at once
(tests/fast_engine.py), so what is measured is the gateway. One client sends small chat
requests one after another and times each; meanwhile (second phase) another sends 16 MB chat
requests back to back on its own connections. Three settings of the gateway:

- default limits, the built-in tiny model served (its tokenizer and context length known):
  a 16 MB body is over the default body limit (derived from the context) and refused with
  413 from its Content-Length;
- the body limit raised to 64 MiB, same model: each 16 MB body is read, parsed and checked
  against the context (refused with 400, over the context), off the event loop;
- the body limit raised, an external engine (no tokenizer): each 16 MB body is read,
  parsed and forwarded to the engine, which answers.

Prints p50 and p90 of the small requests, idle and under load, and the ratio (the issue's
bar: p50 under load at most 1.5x idle).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from lmstack.serving.processes import (  # noqa: E402
    free_port,
    start_process,
    stop_process,
    wait_until_healthy,
)

SMALL_TIMEOUT_S = 60.0
SMALL = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@contextlib.contextmanager
def running(command: list[str], log: Path, health: str, env: dict | None = None):
    process = start_process(command, log, env)
    try:
        wait_until_healthy(process, health, 60, log, "the server")
        yield process
    finally:
        stop_process(process)


def request_bytes(body: bytes) -> bytes:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def read_answer(sock: socket.socket) -> int:
    """Read one answer (content-length framed) off a keep-alive connection; its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    return int(head[9:12])


def small_latencies(port: int, count: int, budget_s: float = 120.0) -> list[float]:
    """Up to `count` small requests, one at a time, for at most `budget_s`: a gateway that
    stalls (the one before issue 24 took minutes per request) ends the phase early, and an
    unanswered request counts as SMALL_TIMEOUT_S."""
    payload = request_bytes(json.dumps(SMALL).encode())
    latencies, deadline = [], time.monotonic() + budget_s
    with socket.create_connection(("127.0.0.1", port), timeout=SMALL_TIMEOUT_S) as sock:
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(payload)
            try:
                assert read_answer(sock) == 200
            except TimeoutError:
                latencies.append(SMALL_TIMEOUT_S * 1000)
                break
            latencies.append((time.perf_counter() - started) * 1000)
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    return latencies


def big_sender(port: int, megabytes: int, stop: threading.Event, statuses: list[int]) -> None:
    text = "lorem ipsum " * (megabytes * (1 << 20) // 12)
    payload = request_bytes(
        json.dumps({**SMALL, "messages": [{"role": "user", "content": text}]}).encode()
    )
    while not stop.is_set():
        with socket.create_connection(("127.0.0.1", port), timeout=SMALL_TIMEOUT_S) as sock:
            # refused from its Content-Length, the rest is not read: the answer is there
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            with contextlib.suppress(OSError, ValueError, IndexError):
                statuses.append(read_answer(sock))


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def measure(port: int, args: argparse.Namespace) -> dict:
    small_latencies(port, 20)  # warm: connections, the worker process
    idle = small_latencies(port, args.small)
    stop, statuses = threading.Event(), []
    sender = threading.Thread(
        target=big_sender, args=(port, args.big_mb, stop, statuses), daemon=True
    )
    sender.start()
    time.sleep(1.0)  # the first big request is on its way
    loaded = small_latencies(port, args.small)
    stop.set()
    sender.join(timeout=SMALL_TIMEOUT_S)
    return {
        "idle_p50_ms": statistics.median(idle),
        "idle_p90_ms": p90(idle),
        "loaded_p50_ms": statistics.median(loaded),
        "loaded_p90_ms": p90(loaded),
        "big_requests": len(statuses),
        "big_statuses": sorted(set(statuses)),
        "small_under_load": len(loaded),
    }


def gateway_command(upstream: str, port: int, db: Path, setting: dict, src: str) -> list[str]:
    command = [sys.executable, "-m", "lmstack.serving.gateway", f"--upstream={upstream}"]
    command += [f"--trace-db={db}", f"--port={port}", "--served-name=m"]
    if setting.get("model"):
        command += ["--engine=hf", f"--served={json.dumps({'path': setting['model']})}"]
    if setting.get("limits") and not src:
        command.append(f"--limits={json.dumps(setting['limits'])}")
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=200, help="small requests per phase")
    parser.add_argument("--big-mb", type=int, default=16)
    parser.add_argument("--baseline-src", default="", help="run an older gateway's src/")
    args = parser.parse_args()
    from lmstack.config.groups.model import TinyLlamaConfig
    from lmstack.models.builtin import ensure_builtin_model

    tiny = str(
        ensure_builtin_model(
            TinyLlamaConfig(), pretrained=True, cache_dir=str(REPO / ".cache/lmstack")
        )
    )
    raised = {"max_body_bytes": 64 << 20}
    settings = {
        "default limits, tiny model (16 MB: 413)": {"model": tiny},
        "64 MiB limit, tiny model (16 MB: 400 over context)": {"model": tiny, "limits": raised},
        "64 MiB limit, external engine (16 MB forwarded)": {"limits": raised},
    }
    env = {"PYTHONPATH": args.baseline_src} if args.baseline_src else None
    rows = []
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(__import__("tempfile").TemporaryDirectory()))
        engine_port = free_port()
        engine = [sys.executable, str(REPO / "tests/fast_engine.py"), f"--port={engine_port}"]
        stack.enter_context(
            running(engine, scratch / "engine.log", f"http://127.0.0.1:{engine_port}/health")
        )
        for name, setting in settings.items():
            port = free_port()
            upstream = f"http://127.0.0.1:{engine_port}/v1"
            command = gateway_command(
                upstream, port, scratch / f"{port}.sqlite", setting, args.baseline_src
            )
            with running(
                command, scratch / f"gateway-{port}.log", f"http://127.0.0.1:{port}/health", env
            ):
                row = {"setting": name, **measure(port, args)}
            row["p50_ratio"] = row["loaded_p50_ms"] / row["idle_p50_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    which = f"baseline {args.baseline_src}" if args.baseline_src else "this tree"
    print(f"\nCPU: {cpu_name()}; gateway: {which}")
    columns = ("idle p50", "load p50", "ratio", "load p90", "16MB reqs")
    print(f"{'setting':55} " + " ".join(f"{c:>9}" for c in columns))
    for row in rows:
        print(
            f"{row['setting']:55} {row['idle_p50_ms']:9.2f} {row['loaded_p50_ms']:9.2f} "
            f"{row['p50_ratio']:9.2f} {row['loaded_p90_ms']:9.2f} {row['big_requests']:9d}"
        )


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    return "unknown"


if __name__ == "__main__":
    main()
