"""Fuzzing the tracing gateway: generated input, from raw request bytes to JSON bodies.

- The HTTP path: one real gateway process in front of a real engine (tests/
  gateway_test_engine.py) takes generated requests over raw sockets, well framed and
  pipelined, then the same bytes mutated (cut, spliced, wrong lengths). Every answer must be
  well-formed HTTP/1.1, no client mistake gets a 5xx (the engine never fails here, so any 5xx
  is the gateway's), nothing hangs, and the gateway answers /health after each case and keeps
  its memory bounded.
- The pure parts, property-tested: the SSE parser (serving/sse.py), the OpenAI request
  normaliser (openai_compat.normalise) and the feedback parser (ab.parse_feedback).
- Feedback and A/B through the gateway: generated feedback bodies get a 2xx or a 4xx that
  names the problem; generated user ids always get a 200 from a valid variant.

Deterministic by default (hypothesis' derandomize, no example database): CI runs the same
cases every time. LMSTACK_FUZZ_EXAMPLES raises the number of cases and draws them at random
(benchmarks/gateway_soak.py runs it so for minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from gateway_test_engine import MODEL, fast_engine, gateway_process
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lmstack.serving.ab import FeedbackError, parse_feedback
from lmstack.serving.gateway_process import gateway
from lmstack.serving.openai_compat import Plan, RequestRejected, ServedModel, normalise
from lmstack.serving.relay import UsageStripper, is_usage_only
from lmstack.serving.sse import (
    EventSplitter,
    decode_all,
    event_data,
    event_spans,
    json_or_none,
    parse_event,
    payloads,
    split_events,
)

# HTTP cases of the main target; the others are multiples of it (see `fuzz_settings`)
EXAMPLES = int(os.environ.get("LMSTACK_FUZZ_EXAMPLES", "200"))
ANSWER_TIMEOUT_S = 10.0  # far over any answer of the fast engine: longer is a hang
QUIET_S = 0.15  # no byte for this long, and no answer begun: the gateway waits for the client
RSS_GROWTH_BOUND_MB = 64.0  # the fuzz's cases are small: more growth than this is a leak
SERVED_NAME = "tiny"  # the model's name at the gateway (the engine's is gateway_test_engine's)


def fuzz_settings(share: float, shrink: bool = True) -> settings:
    """`share` of EXAMPLES cases. No shrinking (`shrink=False`) where a case can take
    ANSWER_TIMEOUT_S: the failing case is reported as generated."""
    phases = [p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain)]
    return settings(
        max_examples=max(1, int(EXAMPLES * share)),
        phases=phases,
        derandomize="LMSTACK_FUZZ_EXAMPLES" not in os.environ,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# ---------------------------------------------------------------- reading answers


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def closes(self) -> bool:
        return self.headers.get(b"connection", b"").lower() == b"close"


class Incomplete(Exception):
    """The bytes end inside an answer."""


STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5]\d\d) [^\r\n]*\Z")


def read_answers(data: bytes, closed: bool) -> tuple[list[Answer], bytes]:
    """The well-formed HTTP/1.1 answers in `data`, and the bytes of one not yet complete;
    AssertionError on anything malformed. Interim answers (100 Continue) are left out."""
    answers = []
    while data:
        answer, data = read_answer(data, closed)
        if answer is None:
            break
        if answer.status >= 200:
            answers.append(answer)
    return answers, data


def read_answer(data: bytes, closed: bool) -> tuple[Answer | None, bytes]:
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None, data
    status_line, *lines = data[:head_end].split(b"\r\n")
    match = STATUS_LINE.match(status_line)
    assert match, f"not an HTTP/1.1 status line: {status_line[:200]!r}"
    headers = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        assert colon and name and name == name.strip(), f"malformed header line {line[:200]!r}"
        headers[name.lower()] = value.strip()
    status, rest = int(match.group(1)), data[head_end + 4 :]
    try:
        body, rest = read_body(status, headers, rest, closed)
    except Incomplete:
        return None, data
    return Answer(status, headers, body), rest


def read_body(status: int, headers: dict, rest: bytes, closed: bool) -> tuple[bytes, bytes]:
    if status < 200 or status in (204, 304):
        return b"", rest
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return read_chunks(rest)
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(rest) < length:
            raise Incomplete
        return rest[:length], rest[length:]
    if not closed:  # a body that ends when the connection does
        raise Incomplete
    return rest, b""


def read_chunks(data: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            raise Incomplete
        size_field = data[:line_end].split(b";")[0]
        assert re.fullmatch(rb"[0-9a-fA-F]+", size_field), f"bad chunk size {size_field[:50]!r}"
        size, data = int(size_field, 16), data[line_end + 2 :]
        if size == 0:
            return body, after_trailers(data)
        if len(data) < size + 2:
            raise Incomplete
        assert data[size : size + 2] == b"\r\n", f"chunk of {size} bytes not ended by CRLF"
        body, data = body + data[:size], data[size + 2 :]


def after_trailers(data: bytes) -> bytes:
    """What follows a chunked body's end: trailer lines, if any, then an empty line."""
    if data.startswith(b"\r\n"):
        return data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise Incomplete
    return data[end + 4 :]


def exchange(
    address: tuple[str, int],
    request: bytes,
    complete: bool = True,
    timeout_s: float = ANSWER_TIMEOUT_S,
) -> list[Answer]:
    """Send `request` and read until the gateway closes the connection: within `timeout_s`,
    or it hangs. A `complete` request ends with `connection: close`, so the gateway closes
    once it has answered. Otherwise, when the gateway goes quiet with no answer begun (it
    waits for bytes that will not come), we stop sending (half-close) and it must close."""
    data, half_closed, sent_all_at = b"", False, 0
    with socket.create_connection(address, timeout=timeout_s) as connection:
        with contextlib.suppress(OSError):  # a gateway that refused may close before the end
            connection.sendall(request)
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(deadline - time.monotonic(), 0.01)
            connection.settimeout(left if complete or half_closed else min(QUIET_S, left))
            try:
                piece = connection.recv(65536)
            except TimeoutError:
                assert time.monotonic() < deadline, f"no close after {timeout_s}s: a hang"
                if not half_closed and not read_answers(data, closed=False)[1]:
                    connection.shutdown(socket.SHUT_WR)
                    half_closed, sent_all_at = True, len(data)
                continue  # else an answer has begun: wait for the rest of it
            except ConnectionResetError:
                piece = b""  # a refusal closed the connection with our bytes unread
            if not piece:
                break
            data += piece
    answers, rest = read_answers(data, closed=True)
    # only an answer begun after we stopped sending may be cut off (the gateway closes then)
    assert not rest or (half_closed and len(data) - len(rest) >= sent_all_at), (
        f"the connection ended inside an answer: {rest[:300]!r}"
    )
    return answers


def health(address: tuple[str, int]) -> dict:
    request = b"GET /health HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n\r\n"
    (answer,) = exchange(address, request)
    assert answer.status == 200
    return json.loads(answer.body)


def assert_no_server_error(answers: list[Answer], request: bytes) -> None:
    for answer in answers:
        assert answer.status < 500, (
            f"a {answer.status} for a client's request (the engine never fails here):\n"
            f"request: {request[:600]!r}\nanswer: {answer.body[:600]!r}"
        )


# ---------------------------------------------------------------- generated requests

# JSON's \\uXXXX escapes make strings no UTF-8 store takes: lone surrogates
texts = st.text(max_size=12) | st.sampled_from(["\ud800", "a\udfffb"])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=30)}
    ),
    min_size=1,
    max_size=3,
)
# each field a plausible value or any JSON value
OPTIONAL_FIELDS = {
    "model": st.sampled_from([SERVED_NAME, MODEL, "other"]) | json_values,
    "max_tokens": st.integers(-2, 40) | json_values,
    "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "n": st.integers(-1, 3) | json_values,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5) | json_values,
    "logprobs": st.booleans() | st.integers(-1, 30) | json_values,
    "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 70000), max_size=5) | json_values,
    "ignore_eos": st.booleans() | json_values,
    "top_p": st.floats(-1, 2, allow_nan=False) | json_values,
    "user": st.text(max_size=20) | json_values,
}
request_bodies = st.fixed_dictionaries(
    {"messages": messages | json_values},
    optional={**OPTIONAL_FIELDS, "extra": json_values},
)


def mostly(usual: st.SearchStrategy, odd: st.SearchStrategy, times: int = 4) -> st.SearchStrategy:
    """`usual` about `times` draws in `times + 1`: odd parts are tried, yet most requests get
    past the parser to the gateway's own steps."""
    return st.integers(0, times).flatmap(lambda i: odd if i == times else usual)


def one_line(value: bytes) -> bytes:
    """No CR or LF: the request's framing holds (the mutations below break it on purpose)."""
    return value.replace(b"\r", b"").replace(b"\n", b"")


def header_value(value: bytes) -> bytes:
    """What llhttp takes in a header value: no control bytes but tab (it answers 400)."""
    return bytes(c for c in value if (c >= 32 and c != 127) or c == 9)


methods = mostly(
    st.sampled_from([b"POST", b"POST", b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]),
    st.sampled_from([b"get", b"BREW", b"G T", b"POST\t"]),
)
ROUTES = [
    b"/health",
    b"/v1/models",
    b"/v1/feedback",
    b"/v1/no-such-route",
    b"/",
    b"/v2/models",
    b"*",
    b"/v1/chat/completions?stream=true&x=%00",
    b"/v1/../health",
    b"http://example.com/v1/models",
]
paths = mostly(
    st.sampled_from([b"/v1/chat/completions", b"/v1/completions"]),
    st.sampled_from(ROUTES)
    | st.binary(max_size=30).map(lambda b: b"/v1/" + one_line(b))
    | st.sampled_from([8000, 8300, 9000]).map(lambda n: b"/v1/" + b"a" * n),  # the 8 KiB limit
    times=2,
)
versions = mostly(
    st.just(b"HTTP/1.1"), st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1"])
)
HEADER_NAMES = [
    b"host",
    b"content-type",
    b"x-request-id",
    b"x-lmstack-user",
    b"x-lmstack-prompt-version",
    b"authorization",
    b"accept-encoding",
    b"user-agent",
    b"connection",
    b"keep-alive",
    b"te",
    b"trailer",
    b"proxy-connection",
]
header_names = mostly(st.sampled_from(HEADER_NAMES), st.binary(min_size=1, max_size=12), 12)
header_values = mostly(
    st.binary(max_size=40).map(header_value)
    | st.sampled_from([b"close", b"keep-alive", b"application/json", b"Bearer x"]),
    st.binary(max_size=40).map(one_line)
    | st.sampled_from([17_000, 40_000]).map(lambda n: b"v" * n),  # over the 16 KiB limit
    times=6,
)
headers = mostly(
    st.lists(st.tuples(header_names, header_values), max_size=5),
    st.just([(b"x-many", b"1")] * 101),  # over the 100 headers limit
    times=20,
)
bodies = mostly(
    request_bodies.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=120) | st.sampled_from([b"", b"{", b"[]", b'{"messages": "hi"}']),
)


@st.composite
def framed_requests(draw) -> bytes:
    """One HTTP request whose framing is right: the body is as long as it says it is."""
    method, path, version = draw(methods), draw(paths), draw(versions)
    lines = [method + b" " + path + b" " + version, *(n + b": " + v for n, v in draw(headers))]
    body = draw(bodies) if method != b"GET" or draw(st.booleans()) else b""
    if draw(st.booleans()):
        lines.append(b"expect: 100-continue")
    if body and draw(st.booleans()):
        lines.append(b"transfer-encoding: chunked")
        body = draw(chunked(body))
    elif body or draw(st.booleans()):
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@st.composite
def chunked(draw, body: bytes) -> bytes:
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
    size = draw(st.sampled_from([b"%x", b"%X", b"%x;ext=1"]))
    framed = b"".join(size % len(p) + b"\r\n" + p + b"\r\n" for p in pieces)
    trailer = draw(st.sampled_from([b"", b"x-trailer: 1\r\n"]))
    return framed + b"0\r\n" + trailer + b"\r\n"


PROBE = b"GET /health HTTP/1.1\r\nhost: probe\r\nconnection: close\r\n\r\n"
pipelines = st.lists(framed_requests(), min_size=1, max_size=3)


@st.composite
def mutated(draw) -> bytes:
    """Framed requests, then cut, spliced, corrupted or given a wrong length."""
    data = b"".join(draw(pipelines))
    for _ in range(draw(st.integers(1, 3))):
        data = draw(st.sampled_from(MUTATIONS))(draw, data)
    return data


def cut(draw, data: bytes) -> bytes:
    return data[: draw(st.integers(0, len(data)))]


def splice(draw, data: bytes) -> bytes:
    at = draw(st.integers(0, len(data)))
    inserted = draw(st.binary(min_size=1, max_size=20) | st.sampled_from([b"\r\n", b"\r\n\r\n"]))
    return data[:at] + inserted + data[at:]


def drop(draw, data: bytes) -> bytes:
    start = draw(st.integers(0, len(data)))
    return data[:start] + data[start + draw(st.integers(1, 20)) :]


def wrong_length(draw, data: bytes) -> bytes:
    lengths = st.sampled_from([b"0", b"-1", b"1e3", b"99999999999999999999", b" 5", b"5, 6"])
    value = draw(st.integers(0, 500).map(lambda n: b"%d" % n) | lengths)
    return re.sub(rb"content-length: [^\r]*", b"content-length: " + value, data, count=1)


def smuggle(draw, data: bytes) -> bytes:
    extra = draw(
        st.sampled_from(
            [
                b"transfer-encoding: chunked\r\n",
                b"transfer-encoding: gzip, chunked\r\n",
                b"content-length: 3\r\n",
                b"connection: upgrade\r\nupgrade: websocket\r\n",
            ]
        )
    )
    head_end = data.find(b"\r\n") + 2
    return data[:head_end] + extra + data[head_end:] if head_end > 1 else data


def other_method(draw, data: bytes) -> bytes:
    methods = [b"CONNECT", b"TRACE", b"PROPFIND", b"PRI", b"OPTIONS", b"HEAD"]
    method = draw(st.sampled_from(methods))
    return method + data[data.find(b" ") :] if b" " in data else data


MUTATIONS = [cut, cut, splice, drop, wrong_length, smuggle, other_method]


# ---------------------------------------------------------------- the gateway


@dataclass
class Running:
    address: tuple[str, int]
    process: object  # gateway_test_engine.GatewayProcess
    rss_at_start_mb: float
    base_url: str


@pytest.fixture(scope="module")
def fuzzed_gateway(tiny_base, tmp_path_factory):
    """One gateway process for the whole module, in front of the fast engine, which it takes
    for transformers serve on the built-in model: so every step of the gateway runs (the
    model's name rewritten, token ids decoded, n fanned out, stop strings trimmed, prompts
    counted against the context) besides plain forwarding."""
    with fast_engine() as engine:
        as_hf = dataclasses.replace(engine, engine="hf", served={"path": str(tiny_base)})
        log_dir = tmp_path_factory.mktemp("fuzz")
        with gateway(as_hf, SimpleNamespace(), log_dir, name=SERVED_NAME) as proxied:
            process = gateway_process(proxied.base_url)
            address = (process.host, process.port)
            for _ in range(20):  # warm up: imports and caches of the first requests
                exchange(address, chat_request(json.dumps(CHAT).encode()))
            yield Running(address, process, process.rss_mb(), proxied.base_url)


CHAT = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def chat_request(body: bytes, extra: bytes = b"") -> bytes:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n"
    return head + extra + b"content-length: %d\r\n\r\n" % len(body) + body


@fuzz_settings(1.0, shrink=False)
@given(requests=pipelines)
def test_framed_pipelined_requests_are_each_answered(fuzzed_gateway, requests):
    """Well-framed requests, one after another on a connection, then a health probe: each is
    answered in order, or one answer closes the connection (a refusal, `connection: close`,
    HTTP/1.0); never a 5xx, never a hang."""
    data = b"".join(requests) + PROBE
    answers = exchange(fuzzed_gateway.address, data)
    assert_no_server_error(answers, data)
    assert answers, f"no answer at all to {data[:600]!r}"
    if len(answers) < len(requests) + 1:
        assert answers[-1].closes, (
            f"{len(answers)} answers to {len(requests) + 1} requests, the last one without "
            f"connection: close:\n{data[:800]!r}"
        )
    else:
        assert answers[-1].status == 200 and b'"status": "ok"' in answers[-1].body
    assert health(fuzzed_gateway.address)["status"] == "ok"


@fuzz_settings(0.5, shrink=False)
@given(data=mutated())
def test_mutated_requests_are_answered_or_closed(fuzzed_gateway, data):
    """Any bytes: whatever is answered is well-formed HTTP/1.1 and no 5xx; an incomplete
    request is waited for until the client stops sending, then the connection is closed."""
    answers = exchange(fuzzed_gateway.address, data, complete=False)
    assert_no_server_error(answers, data)
    assert health(fuzzed_gateway.address)["status"] == "ok"


# ---------------------------------------------------------------- feedback and A/B


@pytest.fixture(scope="module")
def known_request_id(fuzzed_gateway) -> str:
    request = chat_request(json.dumps(CHAT).encode(), b"x-request-id: fuzz-known-id\r\n")
    (answer,) = exchange(fuzzed_gateway.address, request)
    assert answer.status == 200 and answer.headers[b"x-lmstack-request-id"] == b"fuzz-known-id"
    return "fuzz-known-id"


feedback_fields = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.sampled_from(["fuzz-known-id", "unknown-id", ""]) | json_values,
        "thumbs": st.sampled_from(["up", "down", "sideways"]) | json_values,
        "score": st.floats() | st.integers(-(10**400), 10**400) | json_values,
        "comment": texts | json_values,
    },
)
feedback_bodies = (
    feedback_fields.map(lambda b: json.dumps(b).encode())
    | st.binary(max_size=60)
    | st.sampled_from([b'{"request_id": "\\ud800", "thumbs": "up"}', b"[]", b"1" * 5000])
)


@fuzz_settings(3.0)
@given(raw=feedback_bodies)
def test_parse_feedback_returns_fields_or_a_4xx(raw):
    try:
        fields = parse_feedback(raw)
    except FeedbackError as error:
        assert 400 <= error.status < 500 and str(error)
        return
    assert set(fields) == {"request_id", "thumbs", "score", "comment"}
    assert isinstance(fields["request_id"], str) and fields["request_id"]
    assert fields["thumbs"] in (None, 0, 1) and isinstance(fields["score"], float)
    json.dumps(fields, allow_nan=False).encode()  # storable: finite, valid Unicode


@fuzz_settings(0.4, shrink=False)
@given(raw=feedback_bodies)
def test_feedback_through_the_gateway_is_recorded_or_refused(fuzzed_gateway, known_request_id, raw):
    head = b"POST /v1/feedback HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n"
    request = head + b"content-length: %d\r\n\r\n" % len(raw)
    (answer,) = exchange(fuzzed_gateway.address, request + raw)
    payload = json.loads(answer.body)
    if answer.status == 200:
        assert payload == {"recorded": True, "request_id": known_request_id}
    else:
        assert answer.status in (400, 404), (raw, answer)
        # a message that names the field, not the gateway's own failure to read it
        assert "invalid HTTP request" not in payload["error"]["message"], (raw, payload)


@pytest.fixture(scope="module")
def ab_gateway(tmp_path_factory):
    """A gateway splitting traffic between two engines, 30/70, by the user id header."""
    with fast_engine() as engine_a, fast_engine() as engine_b:
        variants = [
            {"name": "A", "weight": 0.3, "upstream": engine_a.base_url, "model": MODEL},
            {"name": "B", "weight": 0.7, "upstream": engine_b.base_url, "model": MODEL},
        ]
        ab = SimpleNamespace(user_header="X-Lmstack-User", seed=7)
        config = SimpleNamespace(serving=SimpleNamespace(ab=ab))
        log_dir = tmp_path_factory.mktemp("ab")
        with gateway(engine_a, config, log_dir, variants=variants) as proxied:
            process = gateway_process(proxied.base_url)
            exchange((process.host, process.port), chat_request(json.dumps(CHAT).encode()))
            yield (process.host, process.port)


user_ids = (st.binary(max_size=40) | st.text(max_size=20).map(str.encode)).map(header_value)


@fuzz_settings(0.4, shrink=False)
@given(user=user_ids, repeat=st.integers(1, 3))
def test_ab_users_always_get_an_answer_from_one_variant(ab_gateway, user, repeat):
    """Any user id header: a 200 from a variant; the same id, the same variant (an empty one
    is no id: each request is drawn on its own)."""
    request = chat_request(json.dumps(CHAT).encode(), b"x-lmstack-user: " + user + b"\r\n")
    variants = set()
    for _ in range(repeat):
        (answer,) = exchange(ab_gateway, request)
        assert answer.status == 200, (user, answer)
        variants.add(answer.headers[b"x-lmstack-variant"])
    assert variants <= {b"A", b"B"}, (user, variants)
    assert len(variants) == 1 or not user.strip(b" \t"), (user, variants)


# ---------------------------------------------------------------- the SSE parser

sse_lines = st.lists(
    st.sampled_from([b"data: ", b"data:", b": comment", b"event: x", b"id: 1", b"data: [DONE]"])
    | st.binary(max_size=12),
    max_size=4,
)
separators = st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n\r\n", b"\r\n\n", b"\n", b"\r", b""])
sse_streams = st.lists(st.tuples(sse_lines, separators), max_size=8).map(
    lambda events: b"".join(b"\n".join(lines) + sep for lines, sep in events)
) | st.binary(max_size=200)


@st.composite
def cut_up(draw, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]


@fuzz_settings(3.0)
@given(data=st.data(), stream=sse_streams)
def test_sse_events_do_not_depend_on_how_the_stream_is_cut(data, stream):
    whole, rest = split_events(stream)
    assert b"".join(e + s for e, s in whole) + rest == stream  # nothing lost or added
    for event, separator in whole:
        assert re.fullmatch(rb"\r?\n\r?\n", separator) and not event_spans(event + b"x")
    splitter, pieces = EventSplitter(), data.draw(cut_up(stream))
    assert [e for piece in pieces for e in splitter.feed(piece)] == whole
    assert splitter.finish() == rest and splitter.finish() == b""


@fuzz_settings(2.0)
@given(event=st.binary(max_size=100) | sse_streams)
def test_sse_event_parsing_never_raises(event):
    data = event_data(event)
    assert b"\n" not in data and data != b"[DONE]"
    payload = parse_event(event)
    assert payload is None or (isinstance(payload, dict) and payload == json_or_none(data))


json_payloads = st.dictionaries(st.text(max_size=5), json_values, max_size=3).map(
    lambda d: json.dumps(d).encode()
)


@fuzz_settings(2.0)
@given(datas=st.lists(json_payloads | st.binary(max_size=20), max_size=6))
def test_sse_decode_all_is_each_payload_decoded(datas):
    decoded = decode_all(datas)
    assert len(decoded) == len(datas)
    if all(json_or_none(d) is not None or d.strip() == b"null" for d in datas):
        assert decoded == [json_or_none(d) for d in datas]  # the fast path changes nothing


@fuzz_settings(1.0)
@given(data=st.data(), chunks=st.lists(json_payloads, max_size=6))
def test_sse_payloads_of_a_stream_cut_anywhere(data, chunks):
    stream = b"".join(b"data: " + c + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    pieces = data.draw(cut_up(stream))

    async def read() -> list:
        async def arriving():
            for piece in pieces:
                yield piece

        return [payload async for payload in payloads(arriving())]

    assert asyncio.run(read()) == [json.loads(c) for c in chunks]


usage_event = b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
token_event = b'data: {"choices": [{"delta": {"content": "x"}, "index": 0}]}'


@fuzz_settings(1.0)
@given(
    data=st.data(),
    events=st.lists(st.sampled_from([usage_event, token_event, b"data: [DONE]", b": ping"])),
)
def test_the_usage_event_is_stripped_however_the_stream_is_cut(data, events):
    """The relay removes the usage-only event it asked for (relay.UsageStripper), piece by
    piece as the stream arrives: the same, wherever the pieces end."""
    stream = b"".join(e + b"\n\n" for e in events)
    stripper = UsageStripper()
    out = b"".join(stripper.feed(p) for p in data.draw(cut_up(stream))) + stripper.finish()
    kept = [e for e in events if not (parse_event(e) and is_usage_only(parse_event(e)))]
    assert out == b"".join(e + b"\n\n" for e in kept)


# ---------------------------------------------------------------- the OpenAI normaliser


@pytest.fixture(scope="module")
def served_models(tiny_base) -> list[ServedModel]:
    """vLLM-like (does everything itself), and transformers serve with the built-in model's
    tokenizer and context (token ids decoded, n fanned out, context checked)."""
    hf = ServedModel(name="tiny", upstream_name=str(tiny_base), path=str(tiny_base), engine="hf")
    return [ServedModel(name="m", upstream_name="m", engine="vllm"), hf]


# bodies that mostly pass the schema, so that the steps after it are reached: token ids to
# decode, n to fan out, stop strings, ignore_eos, long and odd prompts to count
prompt_texts = texts | st.sampled_from(["x" * 3000, "\ud800" + "y" * 2000])
token_ids = st.lists(st.integers(-3, 70_000), min_size=1, max_size=6)
PLAUSIBLE_FIELDS = {
    "max_tokens": st.integers(-1, 300),
    "temperature": st.floats(-0.5, 2.5),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.integers(0, 3),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "logprobs": st.booleans() | st.integers(-1, 5),
    "ignore_eos": st.booleans(),
    "echo": st.booleans(),
    "top_logprobs": st.integers(-1, 5),
}
served_names = st.sampled_from(["m", "tiny", "other"])
chat_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": prompt_texts}
    ),
    min_size=1,
    max_size=3,
)
plausible_bodies = {
    "chat": st.fixed_dictionaries(
        {"model": served_names, "messages": chat_messages}, optional=PLAUSIBLE_FIELDS
    ),
    "completions": st.fixed_dictionaries(
        {
            "model": served_names,
            "prompt": prompt_texts
            | token_ids
            | st.lists(prompt_texts, max_size=3)
            | st.lists(token_ids, max_size=3),
        },
        optional=PLAUSIBLE_FIELDS,
    ),
}


@fuzz_settings(3.0)
@given(data=st.data())
def test_normalise_returns_a_plan_or_names_the_rejected_field(served_models, data):
    """Any body: a Plan, or RequestRejected naming a field (the 400's `param`); never another
    exception, which the gateway could only answer as its own failure."""
    endpoint = data.draw(st.sampled_from(["chat", "completions"]))
    anything = request_bodies | st.dictionaries(st.text(max_size=8), json_values)
    body = data.draw(plausible_bodies[endpoint] | plausible_bodies[endpoint] | anything)
    for served in served_models:
        if served.engine == "hf" and has_lone_surrogate(body):
            # refused before normalise (serving/preparing.py: field_with_lone_surrogate), as
            # test_a_prompt_with_a_lone_surrogate_is_answered shows through the gateway
            continue
        try:
            plan = normalise(body, endpoint, served)
        except RequestRejected as rejected:
            assert isinstance(rejected.field, str) and rejected.field and str(rejected)
            continue
        assert isinstance(plan, Plan) and plan.endpoint == endpoint
        json.dumps(plan.body)  # what goes upstream is JSON still
        assert plan.n >= 1 and all(isinstance(s, str) and s for s in plan.stop)


# ---------------------------------------------------------------- bugs the fuzzer found (fixed)


def test_head_is_answered_without_a_body(fuzzed_gateway):
    request = b"HEAD /health HTTP/1.1\r\nhost: fuzz\r\n\r\n" + PROBE
    with socket.create_connection(fuzzed_gateway.address, timeout=ANSWER_TIMEOUT_S) as sock:
        sock.sendall(request)
        data = b""
        while piece := sock.recv(65536):
            data += piece
    assert data.count(b"HTTP/1.1 200") == 2 and data.split(b"\r\n\r\n")[1].startswith(b"HTTP/")


def test_an_upgrade_request_is_answered(fuzzed_gateway):
    """httptools raises HttpParserUpgrade (not an HttpParserError) after the request: the
    gateway answers that request over HTTP/1.1 and closes the connection."""
    upgrade = b"connection: upgrade\r\nupgrade: websocket\r\n"
    answers = exchange(fuzzed_gateway.address, chat_request(json.dumps(CHAT).encode(), upgrade))
    assert [answer.status for answer in answers] in ([200], [400], [501])


def test_a_prompt_with_a_lone_surrogate_is_answered(fuzzed_gateway):
    """transformers serve counts a long prompt's tokens (the context check), and a JSON
    \\ud800 escape is a string no tokenizer or UTF-8 encoder takes: a 400 naming the field."""
    content = b'"\\ud800' + b"y" * 2000 + b'"'
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": ' + content + b"}]}"
    answers = exchange(fuzzed_gateway.address, chat_request(body), timeout_s=5.0)
    assert [answer.status for answer in answers] == [400]


def has_lone_surrogate(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------- at the end


def test_the_gateway_survived_the_fuzz_with_bounded_memory(fuzzed_gateway):
    """Last in the module: the one gateway process took every case above."""
    process = fuzzed_gateway.process
    assert process.alive()
    rss = process.rss_mb()
    print(f"\ngateway RSS: {fuzzed_gateway.rss_at_start_mb:.1f} MiB after warm-up, {rss:.1f} now")
    assert rss < fuzzed_gateway.rss_at_start_mb + RSS_GROWTH_BOUND_MB
    assert health(fuzzed_gateway.address)["status"] == "ok"
    assert Path(f"/proc/{process.pid}").exists()


def test_a_hot_request_to_transformers_serve_samples_whatever_the_models_config_says(tmp_path):
    """A model whose generation config does not sample (a GGUF conversion's) would answer
    temperature 1.0 greedily through transformers serve: the gateway asks it to sample."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    hf = ServedModel(name="m", upstream_name="m", path=str(tmp_path), engine="hf")
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def generation(body: dict) -> dict:
        sent = normalise(body, "chat", hf).body
        return json.loads(sent["generation_config"]) if "generation_config" in sent else {}

    assert generation(ask | {"temperature": 1.0}) == {"do_sample": True}
    assert generation(ask | {"temperature": 0.0}) == {}  # greedy stays greedy
    # no temperature: the model's own default (greedy), said explicitly
    assert normalise(dict(ask), "chat", hf).body["temperature"] == 0.0
    fixed = generation(ask | {"temperature": 0.7, "ignore_eos": True})
    assert fixed["do_sample"] is True and fixed["eos_token_id"] == -1
    bad = ask | {"temperature": 1.0, "generation_config": "[1]"}
    with pytest.raises(RequestRejected, match="generation_config must be a JSON object"):
        normalise(bad, "chat", hf)
    vllm = ServedModel(name="m", upstream_name="m", engine="vllm")
    assert "generation_config" not in normalise(ask | {"temperature": 1.0}, "chat", vllm).body
