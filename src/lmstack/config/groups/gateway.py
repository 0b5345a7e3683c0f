"""`serving.limits`: what the tracing gateway accepts from a client and how long it waits.

Kept apart from the serving group's schema, and free of omegaconf, because the gateway process
reads it too (`--limits`, JSON) and starts light.

Each limit answers with HTTP's own status code, as mature servers do (nginx, h11/uvicorn), and
the gateway goes on serving every other connection:

| limit                      | answer                  |
|----------------------------|-------------------------|
| max_request_line_bytes     | 414 URI Too Long        |
| max_header_bytes, max_headers | 431 Request Header Fields Too Large |
| max_body_bytes             | 413 Content Too Large (from Content-Length, before reading) |
| header_timeout_s, body_timeout_s | 408 Request Timeout |
| max_connections            | 503 with Retry-After    |
| keep_alive_timeout_s       | an idle connection is closed |
"""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.config.rules import require

# a prompt that fills the context, in the worst JSON escaping (\uXXXX per character of a
# multi-byte token), is well under this many body bytes per token
BODY_BYTES_PER_CONTEXT_TOKEN = 64
MIN_BODY_BYTES = 1 << 20  # room for tool schemas and long system prompts on small contexts
UNKNOWN_CONTEXT_BODY_BYTES = 16 << 20  # an external engine whose context is not known here


@dataclass
class GatewayLimits:
    """The gateway's request limits and timeouts (see the table above)."""

    # the request line (method, path, version): nginx and h11 take 8 KiB
    max_request_line_bytes: int = 8192
    # all header lines together, and their count: h11 takes 16 KiB, nginx 8 KiB
    max_header_bytes: int = 16384
    max_headers: int = 100
    # a request body; null = derived from the served model's context length
    # (BODY_BYTES_PER_CONTEXT_TOKEN per token, at least 1 MiB; 16 MiB when it is not known)
    max_body_bytes: int | None = None
    # seconds from a request's first byte to the end of its headers
    header_timeout_s: float = 10.0
    # seconds without a byte of a body that has not fully arrived
    body_timeout_s: float = 30.0
    # seconds a client connection may sit idle between requests (nginx's default)
    keep_alive_timeout_s: float = 75.0
    # open client connections; one more is answered 503 with Retry-After
    max_connections: int = 1000
    retry_after_s: int = 1
    # seconds an idle pooled connection to the engine is kept: under the engines' own
    # keep-alive timeouts (uvicorn's 5 s in vLLM and transformers serve, cpp-httplib's 5 s in
    # llama.cpp), so the gateway never sends on a connection the engine is closing
    upstream_idle_s: float = 2.0

    def __post_init__(self) -> None:
        for key in ("max_request_line_bytes", "max_header_bytes", "max_headers"):
            require(getattr(self, key) > 0, f"serving.limits.{key}", "must be > 0")
        require(
            self.max_body_bytes is None or self.max_body_bytes > 0,
            "serving.limits.max_body_bytes",
            f"{self.max_body_bytes}: must be > 0, or null (derived from the context length)",
        )
        for key in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            require(getattr(self, key) > 0, f"serving.limits.{key}", "must be > 0 seconds")
        require(self.max_connections > 0, "serving.limits.max_connections", "must be > 0")
        require(self.retry_after_s >= 0, "serving.limits.retry_after_s", "must be >= 0")
        require(self.upstream_idle_s >= 0, "serving.limits.upstream_idle_s", "must be >= 0")

    def body_limit(self, context_length: int | None) -> int:
        """max_body_bytes, or the default for a model of this context length."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        if context_length is None:
            return UNKNOWN_CONTEXT_BODY_BYTES
        return max(MIN_BODY_BYTES, context_length * BODY_BYTES_PER_CONTEXT_TOKEN)
