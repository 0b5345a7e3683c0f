"""lmstack's load client: streamed OpenAI-compatible requests, timed chunk by chunk.

Requests arrive all at once or with Poisson gaps (`request_rate`), at most
`max_concurrency` in flight. Each request records the time of every streamed
chunk that carried text, so TTFT, TPOT and inter-token latency come from what a
user would see. A request the server rejects (4xx/5xx) or that breaks off is
recorded as failed with its reason, and the benchmark goes on.

Deferred imports, for start-up time: httpx (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from lmstack.prompts import PROMPT_VERSION_HEADER
from lmstack.serving.engines import Endpoint
from lmstack.serving.exchange import REQUEST_TAG_HEADER
from lmstack.serving.metrics import RequestResult
from lmstack.serving.sse import payloads


@dataclass
class LoadSettings:
    max_tokens: int = 64
    temperature: float = 0.0
    max_concurrency: int | None = None
    request_rate: float = float("inf")
    endpoint: str = "chat"  # chat | completions
    ignore_eos: bool = False
    timeout_s: float = 300.0
    seed: int = 0
    prompt_version: str | None = None
    # sent as X-Lmstack-Request-Tag: the tracing gateway records it ("warmup" is left
    # out of reports)
    tag: str | None = None
    # X-Lmstack-User: user-0 ... user-(users - 1), a request to each in turn; 0 = none
    users: int = 0


def request_body(request: dict[str, Any], endpoint: Endpoint, settings: LoadSettings) -> dict:
    """The JSON body: `request` holds `messages` (chat) or `prompt` (completions)."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **request,
    }
    if settings.ignore_eos:
        body.update(ignore_eos_fields(endpoint.engine, settings))
    return body


def ignore_eos_fields(engine: str, settings: LoadSettings) -> dict[str, Any]:
    """Fixed-length outputs: vLLM (and most servers, lmstack's gateway too) take `ignore_eos`;
    transformers serve rejects it but takes a generation config, where end-of-sequence -1
    never stops generation (its continuous batching ignores min_new_tokens)."""
    if engine != "hf":
        return {"ignore_eos": True}
    generation = {
        "max_new_tokens": settings.max_tokens,
        "eos_token_id": -1,
        "do_sample": settings.temperature > 0,
    }
    return {"generation_config": json.dumps(generation)}


def headers_for(endpoint: Endpoint, settings: LoadSettings) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {endpoint.api_key}"}
    if settings.prompt_version:
        headers[PROMPT_VERSION_HEADER] = settings.prompt_version
    if settings.tag:
        headers[REQUEST_TAG_HEADER] = settings.tag
    return headers


async def send_one(client: Any, url: str, body: dict, headers: dict[str, str]) -> RequestResult:
    """One streamed request, timed from send to each text chunk to the end."""
    import httpx

    start = time.perf_counter()
    chunk_times: list[float] = []
    text: list[str] = []
    usage: dict[str, Any] = {}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code >= 400:
                detail = (await response.aread()).decode(errors="replace")
                return RequestResult(
                    ok=False,
                    error=f"HTTP {response.status_code}: {_error_detail(detail)}",
                    status_code=response.status_code,
                    e2el_s=time.perf_counter() - start,
                )
            async for chunk in payloads(response.aiter_bytes()):
                usage = chunk.get("usage") or usage
                piece = _chunk_text(chunk)
                if piece:
                    chunk_times.append(time.perf_counter() - start)
                    text.append(piece)
    except (httpx.HTTPError, ValueError) as error:  # ValueError: an event that is not JSON
        return RequestResult(
            ok=False,
            error=f"{type(error).__name__}: {error}"[:300],
            e2el_s=time.perf_counter() - start,
        )
    e2el = time.perf_counter() - start
    if not chunk_times:
        return RequestResult(ok=False, error="empty response: no text was streamed", e2el_s=e2el)
    return RequestResult(
        request_id=response.headers.get("x-lmstack-request-id", ""),
        ok=True,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or len(chunk_times)),
        ttft_s=chunk_times[0],
        e2el_s=e2el,
        chunk_times=chunk_times,
        text="".join(text),
        status_code=200,
    )


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


def _error_detail(body: str) -> str:
    """The server's message ({"detail": ...} from FastAPI, {"error": {"message": ...}} from
    OpenAI-style servers), cut short."""
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:200]
    if isinstance(parsed, dict):
        error = parsed.get("error")
        message = error.get("message") if isinstance(error, dict) else error or parsed.get("detail")
        return str(message)[:200]
    return body.strip()[:200]


async def run_load(
    requests: list[dict[str, Any]],
    endpoint: Endpoint,
    settings: LoadSettings,
    progress: Any = None,
) -> tuple[list[RequestResult], float]:
    """Send every request; return the results (in request order) and the wall time."""
    import httpx

    path = "chat/completions" if settings.endpoint == "chat" else "completions"
    url = f"{endpoint.base_url.rstrip('/')}/{path}"
    headers = headers_for(endpoint, settings)
    limit = settings.max_concurrency or len(requests)
    semaphore = asyncio.Semaphore(limit)
    rng = random.Random(settings.seed)
    timeout = httpx.Timeout(settings.timeout_s, connect=30.0)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)

    async def limited(body: dict, index: int) -> RequestResult:
        mine = headers | (
            {"X-Lmstack-User": f"user-{index % settings.users}"} if settings.users else {}
        )
        async with semaphore:
            result = await send_one(client, url, body, mine)
        if progress is not None:
            progress.update(1)
        return result

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for index, request in enumerate(requests):
            body = request_body(request, endpoint, settings)
            tasks.append(asyncio.create_task(limited(body, index)))
            if settings.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(settings.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(results), duration


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_stoppable(work: Any) -> Any:
    """asyncio.run(work), where SIGTERM or SIGINT cancels the work (its requests closed) and
    is then handed to the process's own handler, which stops the run as usual. A signal
    handler that raises inside a task instead leaves half-cancelled tasks whose errors
    asyncio prints at shutdown."""

    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(work)
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    async def main() -> Any:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, lambda s=sig: (received.append(s), task.cancel()))
        return await work

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if not received:
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    signal.raise_signal(received[0])
    raise KeyboardInterrupt  # when the process's handler does not stop it
