"""What every engine behind lmstack's gateway accepts: the OpenAI API and vLLM's extensions.

Third-party clients send what OpenAI and vLLM take: lm-eval's `local-completions` sends
token-id prompts, load testers send `ignore_eos`, the openai SDK sends `n`, `stop`,
`logprobs`. An engine that lacks one of these either gets the request rewritten into what
it does take (token ids decoded with the served model's tokenizer, `ignore_eos` as a
generation config, `n` and batched prompts as several requests, `stop` trimmed off the
answer), or the client gets a 400 naming the field and the engine. Nothing is ignored
silently.

`normalise()` is the request step the gateway runs on every completion request; it is pure
(no I/O besides a lazily loaded tokenizer), so it is tested on its own. Requests that need
their answer reshaped (fan-out, stop trimming) are marked `adapted`; `combine()` builds the
client's answer from the upstream answers, or, for a streaming client, the relay streams
each choice as it arrives (`StopCutter` holds back text that may begin a stop string).

Deferred imports, for start-up time: tokenizers and transformers (and the lmstack modules
that load them) are imported inside the functions that need them; the CLI's input checks
import this module first.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.serving.request_schema import schema_problem


@dataclass(frozen=True)
class EngineSupport:
    """What an engine does itself with the OpenAI/vLLM request fields."""

    token_prompts: bool = True  # `prompt` as token ids, or a list of prompts
    ignore_eos: bool = True
    n: bool = True
    stop: bool = True  # `stop` the OpenAI way: generation ends there, the stop text left out
    logprobs: bool = True
    context_check: bool = True  # answers 400 to a prompt longer than the context
    temperature: bool = True  # temperature > 0 samples, whatever the model's generation config


# transformers serve: token ids are refused ("prompt must be a string"), `ignore_eos` is a 422,
# `n` and `logprobs` are ignored (one choice, no log-probs), `stop` leaves the stop text in,
# and it samples only where the model's generation config says do_sample
HF_SUPPORT = EngineSupport(
    False, False, False, False, False, context_check=False, temperature=False
)
ENGINE_SUPPORT = {"hf": HF_SUPPORT}
FULL_SUPPORT = EngineSupport()  # vLLM, and what an external server is trusted to do
LOGPROB_FIELDS = ("logprobs", "top_logprobs", "echo", "prompt_logprobs")
MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


class RequestRejected(Exception):
    """A request the engine cannot answer correctly: answered with a 400 naming the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


MISSING_CONTEXT = object()


@dataclass
class ServedModel:
    """The model behind the gateway: the name clients use, the name the engine wants, its
    tokenizer (loaded on first need) and its context length."""

    name: str = ""  # what clients send as `model`
    upstream_name: str = ""  # what the engine takes as `model`
    path: str = ""  # the model folder (tokenizer, config.json)
    engine: str = ""
    _tokenizer: Any = None
    _context: Any = MISSING_CONTEXT  # not read yet (None: the model does not say)
    _generation: dict[str, Any] | None = None  # not read yet
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def support(self) -> EngineSupport:
        return ENGINE_SUPPORT.get(self.engine, FULL_SUPPORT)

    def tokenizer(self) -> Any:
        """The model's fast tokenizer (tokenizer.json through `tokenizers`: milliseconds to
        load, no transformers import in the gateway's event loop), else transformers'."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _load_tokenizer(self.path)
            return self._tokenizer

    def generation_config(self) -> dict[str, Any]:
        """The model's generation_config.json (its end-of-sequence ids, sampling defaults),
        read once: it is asked on every request to the hf engine."""
        if self._generation is None:
            self._generation = self._read_generation_config()
        return self._generation

    def _read_generation_config(self) -> dict[str, Any]:
        try:
            config = json.loads((Path(self.path) / "generation_config.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in config.items() if k != "transformers_version"}

    def context_length(self) -> int | None:
        """The model's context, read from its config.json once (asked on every request)."""
        if self._context is MISSING_CONTEXT:
            self._context = self._read_context_length()
        return self._context

    def _read_context_length(self) -> int | None:
        try:
            config = json.loads((Path(self.path) / "config.json").read_text())
        except (OSError, ValueError):
            return None
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            if isinstance(config.get(key), int):
                return config[key]
        return None


class _Tokenizer:
    """The two things the gateway asks of a tokenizer, over either kind."""

    def __init__(self, fast: Any = None, slow: Any = None) -> None:
        self.fast, self.slow = fast, slow
        self._longest: int | None = None

    def __len__(self) -> int:
        return self.fast.get_vocab_size(with_added_tokens=True) if self.fast else len(self.slow)

    def decode(self, ids: list[int]) -> str:
        if self.fast:
            return self.fast.decode(ids, skip_special_tokens=False)
        return self.slow.decode(ids, skip_special_tokens=False)

    def count(self, text: str) -> int:
        if self.fast:  # encode_batch releases the GIL (encode holds it: seconds for MBs)
            return len(self.fast.encode_batch([text])[0].ids)
        return len(self.slow(text)["input_ids"])

    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for: a text of b bytes is at least
        b / this many tokens, which refuses a huge prompt without tokenizing it."""
        if self._longest is None:
            decode = self.decode
            self._longest = max(len(decode([i]).encode()) for i in range(len(self))) or 1
        return self._longest


def _load_tokenizer(path: str) -> _Tokenizer:
    file = Path(path) / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        return _Tokenizer(fast=Tokenizer.from_file(str(file)))
    from transformers import AutoTokenizer

    return _Tokenizer(slow=AutoTokenizer.from_pretrained(path))


@dataclass
class Plan:
    """What to send upstream for one client request, and how to answer the client."""

    body: dict[str, Any]  # one upstream request (the whole request when not adapted)
    endpoint: str  # "chat" | "completions"
    prompts: list[str] = field(default_factory=list)  # completions fanned out per prompt
    n: int = 1
    stop: list[str] = field(default_factory=list)  # trimmed off the answer by the gateway
    stream: bool = False
    include_usage: bool = False
    adapted: bool = False  # the gateway makes the upstream requests and builds the answer

    def upstream_bodies(self) -> list[dict[str, Any]]:
        """One non-streamed request per prompt and per choice, in the client's choice order."""
        base = {k: v for k, v in self.body.items() if k not in ("stream", "stream_options", "n")}
        prompts = self.prompts or [None]
        return [
            base if prompt is None else {**base, "prompt": prompt}
            for prompt in prompts
            for _ in range(self.n)
        ]

    def upstream_streams(self) -> list[dict[str, Any]]:
        """The same requests streamed, each with its usage (summed into the client's)."""
        streamed = {"stream": True, "stream_options": {"include_usage": True}}
        return [body | streamed for body in self.upstream_bodies()]


def normalise(body: dict[str, Any], endpoint: str, served: ServedModel) -> Plan:
    """The request as the engine takes it (or RequestRejected, a 400 for the client)."""
    if problem := schema_problem(body, endpoint):  # first: later steps trust the types
        raise RequestRejected(*problem)
    support = served.support
    body = dict(body)
    if served.upstream_name and body.get("model") in (served.name, None):
        body["model"] = served.upstream_name
    max_tokens = check_max_tokens(body)
    n = check_n(body)
    check_logprobs(body, support, served.engine)
    if not support.ignore_eos and "ignore_eos" in body:
        body.update(ignore_eos_as_generation_config(body.pop("ignore_eos"), max_tokens, served))
    if not support.temperature:
        body.update(sampling_as_generation_config(body, served))
    prompts = completion_prompts(body, support, served) if endpoint == "completions" else []
    stop = check_stop(body)
    if not support.context_check:
        check_context_length(body, endpoint, prompts, max_tokens, served)
    plan = Plan(body, endpoint, n=n, stream=bool(body.get("stream")))
    plan.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if len(prompts) == 1:
        body["prompt"] = prompts[0]
    elif prompts:
        plan.prompts = prompts
    if not support.stop and stop:
        plan.stop = stop
    plan.adapted = bool(plan.prompts or plan.stop or (n > 1 and not support.n))
    if not plan.adapted:
        plan.n = 1
    return plan


def check_max_tokens(body: dict[str, Any]) -> int | None:
    for name in MAX_TOKEN_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestRejected(name, f"{name} must be at least 1, got {value!r}.")
        return value
    return None


def check_n(body: dict[str, Any]) -> int:
    value = body.get("n", 1)
    if value is None:
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestRejected("n", f"n must be at least 1, got {value!r}.")
    return value


def check_logprobs(body: dict[str, Any], support: EngineSupport, engine: str) -> None:
    if support.logprobs:
        return
    for name in LOGPROB_FIELDS:
        if logprobs_requested(name, body.get(name)):
            raise RequestRejected(
                name,
                f"{name}: the {engine} engine returns no log-probabilities; serve the model "
                "with serving=vllm for them (log-likelihood tasks need them)",
            )


def logprobs_requested(name: str, value: Any) -> bool:
    """completions' `logprobs` is a count (0 asks for the chosen token's), chat's a bool."""
    if value is None or value is False:
        return False
    return name == "logprobs" or bool(value)


def ignore_eos_as_generation_config(
    ignore_eos: Any, max_tokens: int | None, served: ServedModel
) -> dict[str, Any]:
    """transformers serve takes no `ignore_eos` but a generation config (which replaces the
    model's): the model's own, with no end-of-sequence token (-1, which its continuous
    batching and generate() both read as "never stop before max_tokens")."""
    if not ignore_eos:
        return {}
    if max_tokens is None:
        raise RequestRejected("ignore_eos", "ignore_eos needs max_tokens (the fixed length)")
    generation = served.generation_config() | {"max_new_tokens": max_tokens, "eos_token_id": -1}
    return {"generation_config": json.dumps(generation)}


def sampling_as_generation_config(body: dict[str, Any], served: ServedModel) -> dict[str, Any]:
    """temperature > 0 samples, as OpenAI's API means it; none keeps the model's own default.
    transformers serve samples only when the generation config says do_sample, and a model
    whose own config does not (a GGUF conversion, many checkpoints) would answer every repeat
    of a prompt the same, greedily: the request's generation config (or a new one, merged
    over the model's) says so."""
    temperature = body.get("temperature")
    if temperature is None and not served.generation_config().get("do_sample"):
        # the model's own default is greedy: said explicitly, as the engine may serve a view
        # of the model that samples (engine_hf.sampling_view)
        return {"temperature": 0.0}
    if not isinstance(temperature, int | float) or temperature <= 0:
        return {}
    try:
        requested = json.loads(body.get("generation_config") or "{}")
    except (TypeError, ValueError):
        requested = None
    if not isinstance(requested, dict):
        raise RequestRejected("generation_config", "generation_config must be a JSON object")
    if requested.get("do_sample", served.generation_config().get("do_sample")):
        return {}
    return {"generation_config": json.dumps(requested | {"do_sample": True})}


def completion_prompts(body: dict[str, Any], support: EngineSupport, served: ServedModel) -> list:
    """The completion prompts as text when the engine takes only one string: token ids are
    decoded with the served model's tokenizer, a list of prompts is fanned out."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or support.token_prompts:
        return []
    if _is_token_ids(prompt):
        return [_decode(prompt, served)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_token_ids(p) for p in prompt):
            return [_decode(p, served) for p in prompt]
    raise RequestRejected(
        "prompt", "prompt must be a string, a list of strings, token ids or lists of token ids"
    )


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _decode(ids: list[int], served: ServedModel) -> str:
    tokenizer = served.tokenizer()
    if max(ids) >= len(tokenizer) or min(ids) < 0:
        raise RequestRejected(
            "prompt", f"prompt holds token ids outside the vocabulary (0..{len(tokenizer) - 1})"
        )
    return tokenizer.decode(ids)


def check_stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestRejected("stop", "stop must be a non-empty string or a list of them")
    return stops


def check_context_length(
    body: dict[str, Any],
    endpoint: str,
    prompts: list[str],
    max_tokens: int | None,
    served: ServedModel,
) -> None:
    """vLLM's 400 for a prompt (plus the tokens asked for) longer than the model's context.
    Tokenizes only when the text could be that long: a token is at least one byte, so the
    usual short request costs no tokenizer call."""
    context = served.context_length()
    if context is None:
        return
    texts = prompts or ([body["prompt"]] if isinstance(body.get("prompt"), str) else [])
    messages = body.get("messages") if endpoint == "chat" else None
    overhead = 8 * len(messages) + 8 if isinstance(messages, list) else 8
    size = sum(len(t.encode()) for t in texts)
    if isinstance(messages, list):
        size += sum(
            len(json.dumps(m.get("content", "")).encode()) for m in messages if isinstance(m, dict)
        )
    if size + overhead + (max_tokens or 0) <= context:
        return
    for prompt_tokens in _token_counts(texts, messages, served, context):
        if prompt_tokens + (max_tokens or 0) > context:
            raise RequestRejected(
                "messages" if messages is not None else "prompt",
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_tokens + (max_tokens or 0)} tokens ({prompt_tokens} in the "
                f"{'messages' if messages is not None else 'prompt'}, {max_tokens or 0} in the "
                "completion). Please reduce the length of the prompt or completion.",
            )


# what a chat template adds around each message and before the answer (role markers):
# chat prompts are counted as their contents plus this, without rendering the template
TEMPLATE_TOKENS_PER_MESSAGE = 3
TEMPLATE_TOKENS = 2


def _token_counts(texts: list[str], messages: Any, served: ServedModel, context: int) -> list[int]:
    """Each prompt's tokens; or, for a text far over the context, the fewest tokens it can
    be (its bytes over the longest token's), without the seconds of tokenizing megabytes."""
    tokenizer = served.tokenizer()
    if isinstance(messages, list):
        contents = [m.get("content") for m in messages if isinstance(m, dict)]
        texts = [c if isinstance(c, str) else json.dumps(c) for c in contents]
        extra = TEMPLATE_TOKENS_PER_MESSAGE * len(messages) + TEMPLATE_TOKENS
        return [_tokens_at_least(texts, tokenizer, context) + extra]
    return [_tokens_at_least([text], tokenizer, context) for text in texts]


def _tokens_at_least(texts: list[str], tokenizer: Any, context: int) -> int:
    fewest = sum(len(t.encode()) for t in texts) // tokenizer.longest_token_bytes()
    if fewest > context:
        return fewest
    return sum(tokenizer.count(t) for t in texts)


# ---------------------------------------------------------------- the adapted answer


def trim_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string (left out, as OpenAI does), and whether one hit."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopCutter:
    """A streamed answer cut before its first stop string: text is let through once no stop
    string can begin in it, so a streaming client never sees a stop string or what follows
    (as from vLLM), though the text arrives in pieces that may split one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        """The part of the text so far that can be sent now ("" once a stop string hit)."""
        if self.hit:
            return ""
        text, self.hit = trim_at_stop(self.held + piece, self.stops)
        keep = 0 if self.hit else self._could_start_a_stop(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def rest(self) -> str:
        """What was held back, at the end of an answer that met no stop string."""
        rest, self.held = self.held, ""
        return "" if self.hit else rest

    def _could_start_a_stop(self, text: str) -> int:
        longest = min(len(text), max((len(s) for s in self.stops), default=1) - 1)
        for size in range(longest, 0, -1):
            if any(stop.startswith(text[-size:]) for stop in self.stops):
                return size
        return 0


def chunk_text(choice: dict[str, Any]) -> str:
    """The text a streamed choice carries (chat: its delta's content; completions: text)."""
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


def choice_event(plan: Plan, head: dict[str, Any], index: int, text: str = "", finish=None):
    """One SSE event of a streamed choice: its next text, or (with `finish`) its end."""
    if plan.endpoint == "chat":
        choice = {"index": index, "delta": {"content": text} if text else {}}
    else:
        choice = {"index": index, "text": text}
    if finish is not None:
        choice["finish_reason"] = finish
    return sse_event({**head, "choices": [choice]})


def stream_object(plan: Plan) -> str:
    return "chat.completion.chunk" if plan.endpoint == "chat" else "text_completion"


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def summed_usage(usages: list[dict[str, Any]], n: int) -> dict[str, int]:
    """The client's usage from each upstream request's (a prompt counts once for its n)."""
    prompt = sum((u.get("prompt_tokens") or 0) for i, u in enumerate(usages) if i % n == 0)
    completion = sum((u.get("completion_tokens") or 0) for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def combine(plan: Plan, answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The client's answer from the upstream answers (one per prompt and choice, in order)."""
    choices = []
    for index, answer in enumerate(answers):
        choice = (answer.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        finish = choice.get("finish_reason")
        if plan.stop:
            text, hit = trim_at_stop(text, plan.stop)
            finish = "stop" if hit else finish
        if plan.endpoint == "chat":
            message = {**(choice.get("message") or {}), "role": "assistant", "content": text}
            choices.append({"index": index, "message": message, "finish_reason": finish})
        else:
            choices.append(
                {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
            )
    first = answers[0] if answers else {}
    return {
        "id": first.get("id") or f"cmpl-{uuid.uuid4().hex}",
        "object": "chat.completion" if plan.endpoint == "chat" else "text_completion",
        "created": first.get("created") or int(time.time()),
        "model": plan.body.get("model", ""),
        "choices": choices,
        "usage": summed_usage([answer.get("usage") or {} for answer in answers], plan.n),
    }


def models_listing(served: ServedModel) -> dict[str, Any]:
    """GET /v1/models as the client should see it: the served name."""
    entry = {"id": served.name, "object": "model", "created": 0, "owned_by": "lmstack"}
    return {"object": "list", "data": [entry]}
