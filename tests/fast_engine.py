"""A real OpenAI-compatible HTTP/1.1 server that answers at once, run as its own process, for
the gateway's tests and benchmarks: keep-alive connections it closes as rudely as a busy
engine does, and an engine that dies in the middle of an answer.

    python tests/fast_engine.py --port 8001 [--close-after-answer 0.3] [--idle-close-ms 5]

- `--close-after-answer P`: after an answer, the connection is closed with probability P,
  within `--close-delay-ms`, without announcing it (no `connection: close`): the gateway has
  pooled it by then, as happens when an engine's keep-alive timeout fires.
- `--idle-close-ms N`: a connection idle for N ms is closed (uvicorn and llama.cpp do at 5 s).
- A prompt containing DIE_WORD makes the engine cut the connection half way through its
  answer (streamed: after two events; not streamed: after half the body).
- `--words N`: the answer's length in words (one streamed event each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

DIE_WORD = "die-mid-answer"


def answer_events(body: dict, words: int) -> list[dict]:
    created, model = int(time.time()), body.get("model", "fast")
    chat = "messages" in body
    events = []
    for index in range(words):
        text = f"w{index} "
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        choice["finish_reason"] = "length" if index == words - 1 else None
        events.append(
            {"id": "c", "object": "chunk", "created": created, "model": model, "choices": [choice]}
        )
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 3, "completion_tokens": words, "total_tokens": words + 3}
        events.append(
            {"id": "c", "object": "chunk", "created": created, "model": model, "choices": []}
            | {"usage": usage}
        )
    return events


def whole_answer(body: dict, words: int) -> dict:
    text = "".join(f"w{index} " for index in range(words))
    chat = "messages" in body
    choice = {"index": 0, "finish_reason": "length"}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    usage = {"prompt_tokens": 3, "completion_tokens": words, "total_tokens": words + 3}
    created, model = int(time.time()), body.get("model", "fast")
    head = {"id": "c", "object": "chat.completion", "created": created, "model": model}
    return head | {"choices": [choice], "usage": usage}


class EngineConnection(asyncio.Protocol):
    def __init__(self, options: argparse.Namespace, rng: random.Random) -> None:
        self.options, self.rng = options, rng
        self.buffer = bytearray()
        self.transport = None
        self.idle_timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.arm_idle_close()

    def arm_idle_close(self) -> None:
        if self.options.idle_close_ms:
            loop = asyncio.get_running_loop()
            self.idle_timer = loop.call_later(self.options.idle_close_ms / 1000, self.close)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.buffer += data  # a bytearray: appending megabytes stays linear
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(self.buffer[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self.answer(head.split(b"\r\n", 1)[0].decode(), body)
            if self.transport.is_closing():
                return
        self.arm_idle_close()

    def answer(self, request_line: str, raw: bytes) -> None:
        method, path, _ = request_line.split(" ", 2)
        if method == "GET":
            listing = {"object": "list", "data": [{"id": "fast", "object": "model"}]}
            self.send_json(200, listing if path.endswith("/models") else {"status": "ok"})
        else:
            body = json.loads(raw or b"{}")
            dies = DIE_WORD.encode() in raw
            if body.get("stream"):
                self.send_stream(body, dies)
            else:
                self.send_json(200, whole_answer(body, self.options.words), dies)
        self.maybe_close_rudely()

    def send_json(self, status: int, payload: dict, dies: bool = False) -> None:
        body = json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        if dies:
            self.transport.write(head + body[: len(body) // 2])
            self.transport.abort()
            return
        self.transport.write(head + body)

    def send_stream(self, body: dict, dies: bool) -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        pieces = [head + b"transfer-encoding: chunked\r\n\r\n"]
        for count, event in enumerate(answer_events(body, self.options.words)):
            if dies and count == 2:
                self.transport.write(b"".join(pieces))
                self.transport.abort()
                return
            data = b"data: " + json.dumps(event).encode() + b"\n\n"
            pieces.append(b"%x\r\n%b\r\n" % (len(data), data))
        done = b"data: [DONE]\n\n"
        pieces.append(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        self.transport.write(b"".join(pieces))

    def maybe_close_rudely(self) -> None:
        if self.transport.is_closing() or self.rng.random() >= self.options.close_after_answer:
            return
        delay = self.rng.uniform(0, self.options.close_delay_ms) / 1000
        asyncio.get_running_loop().call_later(delay, self.close)


async def serve(options: argparse.Namespace) -> None:
    rng = random.Random(options.seed)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: EngineConnection(options, rng), "127.0.0.1", options.port, backlog=1024
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--close-after-answer", type=float, default=0.0)
    parser.add_argument("--close-delay-ms", type=float, default=3.0)
    parser.add_argument("--idle-close-ms", type=float, default=0.0)
    parser.add_argument("--words", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
