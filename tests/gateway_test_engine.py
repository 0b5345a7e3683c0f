"""A fast OpenAI-compatible engine, and a look into a running gateway process, for the
gateway's fuzz and soak tests (tests/test_gateway_fuzz.py, tests/test_gateway_soak.py).

The engine is a real threaded HTTP/1.1 server: chat and text completions answered at once,
streamed as SSE (chunked) when asked, with usage when `stream_options.include_usage`. It
answers what a real engine refuses (not JSON, a bad field, an unknown route or method) with a
4xx, as vLLM does, and never by dropping the connection: so a 5xx that reaches a client
through the gateway is the gateway's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODEL = "fast-model"
WORDS = ("The", " answer", " is", " seven", ".")
DEFAULT_TOKENS = 8
MAX_TOKENS = 64  # an answer never streams longer, whatever max_tokens asks
ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def field_problem(request: dict[str, Any], kind: str) -> tuple[str, str] | None:
    """(field, message) for a request a real engine answers with a 400; None when fine."""
    if kind == "chat":
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages", "messages must be a non-empty list"
        if not all(isinstance(m, dict) for m in messages):
            return "messages", "each message must be an object"
    elif not isinstance(request.get("prompt"), str | list):
        return "prompt", "prompt must be a string or a list"
    temperature = request.get("temperature", 1.0)
    if not is_number(temperature) or not 0 <= temperature <= 2:
        return "temperature", f"temperature must be in [0, 2], got {temperature!r}"
    max_tokens = request.get("max_tokens", DEFAULT_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens", f"max_tokens must be at least 1, got {max_tokens!r}"
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def answer_tokens(request: dict[str, Any]) -> list[str]:
    count = min(request.get("max_tokens") or DEFAULT_TOKENS, MAX_TOKENS)
    return [WORDS[i % len(WORDS)] for i in range(count)]


def usage(tokens: list[str]) -> dict[str, int]:
    return {"prompt_tokens": 5, "completion_tokens": len(tokens), "total_tokens": 5 + len(tokens)}


def whole_answer(request: dict[str, Any], kind: str) -> dict[str, Any]:
    tokens = answer_tokens(request)
    text = "".join(tokens)
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice["finish_reason"] = "length"
    head = {"id": "cmpl-fast", "object": f"{'chat.' if kind == 'chat' else ''}completion"}
    return {**head, "model": MODEL, "choices": [choice], "usage": usage(tokens)}


def stream_events(request: dict[str, Any], kind: str) -> Iterator[bytes]:
    """The answer as SSE events, as vLLM streams it: a token per event, then the finish, the
    usage event when asked, [DONE]."""
    tokens = answer_tokens(request)
    head = {"id": "cmpl-fast", "model": MODEL, "created": int(time.time())}
    head["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def event(choices: list, **extra: Any) -> bytes:
        return b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n"

    def choice(text: str, finish: str | None = None) -> dict[str, Any]:
        content = {"delta": {"content": text}} if kind == "chat" else {"text": text}
        return {"index": 0, **content, "finish_reason": finish}

    for token in tokens:
        yield event([choice(token)])
    yield event([choice("", "length")])
    if (request.get("stream_options") or {}).get("include_usage"):
        yield event([], usage=usage(tokens))
    yield b"data: [DONE]\n\n"


class EngineHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    token_delay_s = 0.0  # set per server (`fast_engine`): time between streamed events

    def log_message(self, *args: Any) -> None:  # keep the tests' output clean
        pass

    def __getattr__(self, name: str) -> Any:
        # any method but GET and POST: a 405, as uvicorn answers (http.server's own is a 501)
        if name.startswith("do_"):
            return self.not_allowed
        raise AttributeError(name)

    def not_allowed(self) -> None:
        self.read_body()
        self.send_json(405, error("method not allowed", "method"))

    def do_GET(self) -> None:
        self.read_body()
        if self.path.split("?", 1)[0] == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self.send_json(404, error(f"no route {self.path[:200]!r}", "path"))

    def do_POST(self) -> None:
        raw = self.read_body()
        kind = ROUTES.get(self.path.split("?", 1)[0])
        if kind is None:
            self.send_json(404, error(f"no route {self.path[:200]!r}", "path"))
            return
        try:
            request = json.loads(raw)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            self.send_json(400, error("the body must be a JSON object", "body"))
        elif problem := field_problem(request, kind):
            self.send_json(400, error(problem[1], problem[0]))
        elif request.get("stream"):
            self.send_stream(request, kind)
        else:
            self.send_json(200, whole_answer(request, kind))

    def read_body(self) -> bytes:
        length = self.headers.get("content-length", "0").strip()
        return self.rfile.read(int(length)) if length.isdigit() else b""

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":  # an answer to HEAD has its length but not its body
            self.wfile.write(body)

    def send_stream(self, request: dict[str, Any], kind: str) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for event in stream_events(request, kind):
                self.wfile.write(b"%x\r\n%b\r\n" % (len(event), event))
                self.wfile.flush()
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the gateway closed the stream: its client went away
            self.close_connection = True


def error(message: str, param: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError", "param": param}}


class EngineServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the gateway opens a connection per concurrent request

    def handle_error(self, request: Any, client_address: Any) -> None:
        # the gateway closes a connection whose client hung up: not worth a traceback
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def fast_engine(token_delay_s: float = 0.0) -> Iterator[Any]:
    """The engine on a free port, as the Endpoint the gateway is put in front of."""
    from lmstack.serving.engines import Endpoint

    handler = type("Handler", (EngineHandler,), {"token_delay_s": token_delay_s})
    server = EngineServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        yield Endpoint(base_url, MODEL, engine="external", served={"path": MODEL})
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- the gateway process


@dataclass(frozen=True)
class GatewayProcess:
    """A running gateway, seen from outside: its address and its process id."""

    host: str
    port: int
    pid: int

    def rss_mb(self) -> float:
        """Resident memory now (VmRSS), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for process {self.pid}")

    def alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def connections(self, remote_port: int | None = None) -> int:
        """The gateway's open TCP connections: accepted from clients (on its own port), or
        to `remote_port` (the engine's)."""
        inodes = socket_inodes(self.pid)
        count = 0
        for line in Path(f"/proc/{self.pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode not in inodes or state == "0A":  # 0A: the listening socket
                continue
            if remote_port is None:
                count += int(local.split(":")[1], 16) == self.port
            else:
                count += int(remote.split(":")[1], 16) == remote_port
        return count


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def gateway_process(base_url: str) -> GatewayProcess:
    """The gateway process serving `base_url` (http://host:port/v1), found by its command
    line (gateway_process.gateway() yields the endpoint, not the process)."""
    host, port = base_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    wanted = [b"lmstack.serving.gateway", f"--port={port}".encode()]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            if all(w in arguments for w in wanted):
                return GatewayProcess(host, int(port), int(entry.name))
    raise AssertionError(f"no gateway process listens on port {port}")
