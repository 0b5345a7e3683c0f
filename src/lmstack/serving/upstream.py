"""The relay's engine side: a pool of keep-alive HTTP/1.1 connections to the upstream engine.

Each connection parses the engine's answer with httptools' C parser and hands it, as it
arrives, to the request waiting for it (serving/relay.py's `Relay`, through `AnswerReader`):
head, body pieces, end, or the connection's loss.

httptools (the serve extra, not always installed) is imported where used.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.parse
from typing import Any, Protocol

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"expect",
}


# authorization is replaced by the upstream key when the gateway has one; accept-encoding is
# dropped so that answers come back uncompressed and can be traced
DROP_REQUEST_HEADERS = HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding"}


DROP_RESPONSE_HEADERS = HOP_BY_HOP | {b"content-length"}


CONNECT_TIMEOUT_S = 10.0


class AnswerReader(Protocol):
    """What waits for an engine's answer on a connection (serving/relay.py's `Relay`)."""

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def upstream_body(self, piece: bytes) -> None: ...

    def upstream_done(self, connection: UpstreamConnection | None, keep_alive: bool) -> None: ...

    def upstream_lost(self, error: Exception | None) -> None: ...

    def upstream_broken(self, message: str) -> None: ...


class Upstream:
    """The engine's …/v1 URL, and a pool of idle keep-alive connections to it.

    An idle connection is kept `idle_s` at most: under the engine's own keep-alive timeout,
    so the gateway does not send on a connection the engine is closing at that moment. When
    that still happens (the engine closed it first), the relay sends again on a fresh one.
    """

    def __init__(self, base_url: str, api_key: str = "", idle_s: float = 2.0) -> None:
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"--upstream: '{base_url}' is not an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.encode()  # "/v1": the gateway's /v1/x goes to <prefix>/x
        self.host_header = url.netloc.rsplit("@", 1)[-1].encode()
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.api_key = api_key
        self.idle_s = idle_s
        self.idle: list[tuple[float, UpstreamConnection]] = []  # (released at, connection)

    async def connection(self, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
        """An idle connection (reused=True) younger than idle_s, or a new one (always when
        `fresh`)."""
        expired = time.monotonic() - self.idle_s
        while self.idle and not fresh:
            released, connection = self.idle.pop()  # the most recently used first
            if released < expired:
                self.drop_idle(expired)  # the rest are older still
                connection.transport.close()
            elif not connection.closed:
                return connection, True
        loop = asyncio.get_running_loop()
        opening = loop.create_connection(UpstreamConnection, self.host, self.port, ssl=self.ssl)
        _, connection = await asyncio.wait_for(opening, CONNECT_TIMEOUT_S)
        return connection, False

    def release(self, connection: UpstreamConnection) -> None:
        if not connection.closed:
            self.idle.append((time.monotonic(), connection))

    def drop_idle(self, older_than: float) -> None:
        """Close idle connections released before `older_than` (the list is oldest first)."""
        while self.idle and self.idle[0][0] < older_than:
            _, connection = self.idle.pop(0)
            connection.transport.close()

    def request_bytes(
        self, method: bytes, headers: list[tuple[bytes, bytes]], path: bytes, body: bytes
    ) -> list[bytes]:
        """The client's request as the engine gets it: its path under the engine's prefix,
        hop-by-hop headers dropped, the gateway's key for the engine's when it has one."""
        lines = [method + b" " + self.prefix + path + b" HTTP/1.1"]
        lines.append(b"host: " + self.host_header)
        for name, value in headers:
            if name in DROP_REQUEST_HEADERS or (name == b"authorization" and self.api_key):
                continue
            lines.append(name + b": " + value)
        if self.api_key:
            lines.append(b"authorization: Bearer " + self.api_key.encode())
        lines.append(b"content-length: %d" % len(body))
        # head and body written one after the other: a megabytes body is not copied again
        return [b"\r\n".join(lines) + b"\r\n\r\n", body]

    def close(self) -> None:
        for _, connection in self.idle:
            connection.transport.close()
        self.idle.clear()


class UpstreamConnection(asyncio.Protocol):
    """One connection to the engine: parses its answers and hands them to the waiting reader."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.parse_error = httptools.HttpParserError
        self.transport: Any = None
        self.relay: AnswerReader | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, relay: AnswerReader, request: list[bytes]) -> None:
        self.relay, self.headers = relay, []
        for part in request:
            self.transport.write(part)

    def data_received(self, data: bytes) -> None:
        if self.relay is None:  # bytes nobody asked for: this connection is not reusable
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except self.parse_error as error:
            relay, self.relay = self.relay, None
            self.transport.close()
            if relay is not None:
                relay.upstream_broken(f"invalid HTTP from upstream: {error}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.upstream_lost(exc)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.relay is not None:
            self.relay.upstream_head(self.parser.get_status_code(), self.headers)

    def on_body(self, body: bytes) -> None:
        if self.relay is not None:
            self.relay.upstream_body(body)

    def on_message_complete(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.upstream_done(self, self.parser.should_keep_alive())
