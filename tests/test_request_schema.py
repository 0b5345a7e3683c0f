"""The gateway's request schema (serving/request_schema.py): a body the OpenAI API refuses
is a 400 naming the field before any engine sees it; what OpenAI and vLLM take passes
through unchanged (vLLM's extension keys, custom roles, token-id prompts).

Whether vLLM itself agrees, request by request, is tests/test_engines.py's
test_vllm_accepts_what_the_gateway_lets_through.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest

from lmstack.serving.openai_compat import RequestRejected, ServedModel, normalise

from conftest import chat_answer, openai_server

SERVED = ServedModel(name="m", engine="vllm")  # an engine that takes every field itself
USER = [{"role": "user", "content": "Ann has 3 apples and gets 4 more. How many?"}]
BASES = {"chat": {"model": "m", "messages": USER}, "completions": {"model": "m", "prompt": "2+2="}}
DROP = object()  # a field left out of the body

# (endpoint, fields over the endpoint's base body, the rejected field, the message's start)
BAD = [
    ("chat", {"messages": "hi"}, "messages", "messages: Input should be a valid list, got 'hi'"),
    ("chat", {"messages": DROP}, "messages", "messages is required"),
    ("chat", {"messages": []}, "messages", "messages must not be empty"),
    ("chat", {"messages": ["hi"]}, "messages", "messages[0]: Input should be a valid dictionary"),
    ("chat", {"messages": [{"content": "x"}]}, "messages", "messages[0].role is required"),
    ("chat", {"messages": [{"role": 5, "content": "x"}]}, "messages", "messages[0].role: Input"),
    ("chat", {"messages": [{"role": "user"}]}, "messages", "messages[0].content is required"),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages",
        "messages[0].content[0].text is required",
    ),
    (
        "chat",
        {"messages": [{"role": "tool", "content": "42"}]},
        "messages",
        "messages[0].tool_call_id is required",
    ),
    ("chat", {"temperature": -1}, "temperature", "temperature must be at least 0, got -1"),
    ("chat", {"temperature": 2.5}, "temperature", "temperature must be at most 2, got 2.5"),
    ("chat", {"top_p": 0}, "top_p", "top_p must be greater than 0, got 0"),
    ("chat", {"top_p": 1.5}, "top_p", "top_p must be at most 1"),
    ("chat", {"presence_penalty": 3}, "presence_penalty", "presence_penalty must be at most 2"),
    ("chat", {"frequency_penalty": -2.5}, "frequency_penalty", "frequency_penalty must be at"),
    ("chat", {"n": 0}, "n", "n must be at least 1, got 0"),
    ("chat", {"n": True}, "n", "n: Input should be a valid integer, got True"),
    ("chat", {"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0"),
    ("chat", {"max_tokens": "10"}, "max_tokens", "max_tokens: Input should be a valid integer"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must"),
    ("chat", {"top_logprobs": -1}, "top_logprobs", "top_logprobs must be at least 0"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "top_logprobs is only allowed with logprobs"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options", "stream_options is"),
    ("chat", {"seed": 1.5}, "seed", "seed: Input should be a valid integer"),
    ("chat", {"stop": 5}, "stop", "stop: Input should be a valid string or a valid list, got 5"),
    ("chat", {"stop": [1]}, "stop", "stop[0]: Input should be a valid string, got 1"),
    ("chat", {"tools": "x"}, "tools", "tools: Input should be a valid list, got 'x'"),
    ("chat", {"tools": [{"type": "function"}]}, "tools", "tools[0].function is required"),
    ("chat", {"tools": []}, "tools", "tools must not be empty"),
    ("chat", {"tool_choice": "sometimes"}, "tool_choice", "tool_choice: Input should be 'none'"),
    (
        "chat",
        {"response_format": {"type": "json_schema"}},
        "response_format",
        "response_format.json_schema is required",
    ),
    ("chat", {"stream": "yes"}, "stream", "stream: Input should be a valid boolean"),
    (
        "chat",
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options",
        "stream_options.include_usage: Input should be a valid boolean",
    ),
    ("chat", {"logit_bias": {"50": "x"}}, "logit_bias", "logit_bias.50: Input should be a valid"),
    ("chat", {"model": 5}, "model", "model: Input should be a valid string"),
    ("completions", {"prompt": 5}, "prompt", "prompt: Input should be a valid string or"),
    ("completions", {"prompt": [1, "a"]}, "prompt", "prompt[1]: Input should be a valid integer"),
    ("completions", {"logprobs": -1}, "logprobs", "logprobs must be at least 0"),
    ("completions", {"echo": "yes"}, "echo", "echo: Input should be a valid boolean"),
    ("completions", {"max_tokens": -1}, "max_tokens", "max_tokens must be at least 1, got -1"),
]

TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Adds two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
    },
}
CALL = {"id": "call-1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
PARTS = [
    {"type": "text", "text": "What is in this image?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
    {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},  # vLLM's
]
JSON_SCHEMA = {"name": "answer", "schema": {"type": "object"}, "strict": True}

# (endpoint, fields over the endpoint's base body): each passes, and is forwarded unchanged
GOOD = [
    ("chat", {}),
    ("chat", {"model": DROP}),  # the gateway names the served model
    ("chat", {"model": None, "n": None, "stop": None, "temperature": None}),
    (
        "chat",
        {"temperature": 0.7, "top_p": 1, "n": 2, "max_tokens": 16, "seed": -1, "stop": ["\n"]},
    ),
    ("chat", {"temperature": 0, "presence_penalty": -2, "frequency_penalty": 2}),
    (
        "chat",  # vLLM's (and lmstack's) extension keys
        {
            "top_k": 5,
            "min_p": 0.1,
            "ignore_eos": True,
            "min_tokens": 2,
            "repetition_penalty": 1.1,
            "chat_template_kwargs": {"enable_thinking": False},
            "generation_config": "{}",
        },
    ),
    ("chat", {"messages": [{"role": "user", "content": PARTS}]}),
    ("chat", {"messages": [{"role": "ipython", "content": "42"}]}),  # a custom role, as vLLM
    ("chat", {"messages": [{"role": "wizard", "content": "42"}]}),
    ("chat", {"tools": None, "tool_choice": None, "response_format": None, "user": None}),
    (
        "chat",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                *USER,
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call-1", "content": "7"},
                {"role": "assistant", "content": "7", "reasoning_content": "3+4"},
            ],
            "tools": [TOOL],
            "tool_choice": "auto",
        },
    ),
    ("chat", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "add"}}}),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": JSON_SCHEMA}}),
    ("chat", {"response_format": {"type": "json_object"}}),
    ("chat", {"response_format": {"type": "structural_tag", "format": {}}}),  # vLLM's
    ("chat", {"stream": True, "stream_options": {"include_usage": True}}),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}),  # the count is the engine's setting
    ("chat", {"logprobs": True, "top_logprobs": 5, "logit_bias": {"50": -100, "51": 0.5}}),
    ("chat", {"max_completion_tokens": 8, "parallel_tool_calls": False, "user": "u-1"}),
    ("completions", {}),
    ("completions", {"prompt": ["2+2=", "3+3="], "max_tokens": 4, "n": 2}),
    ("completions", {"prompt": [1, 2, 3]}),  # token ids (lm-eval's local-completions)
    ("completions", {"prompt": [[1, 2, 3], [4, 5]]}),
    ("completions", {"prompt": list(range(4000)), "logprobs": 1, "echo": True}),
    ("completions", {"prompt": DROP, "prompt_embeds": "AAAA"}),  # vLLM's
    ("completions", {"ignore_eos": True, "stop": "\n", "stream": True, "suffix": None}),
]


def request(endpoint: str, fields: dict) -> dict:
    body = BASES[endpoint] | fields
    return {key: value for key, value in body.items() if value is not DROP}


@pytest.mark.parametrize(("endpoint", "fields", "field", "message"), BAD)
def test_a_body_the_api_refuses_is_rejected_naming_the_field(endpoint, fields, field, message):
    with pytest.raises(RequestRejected) as rejected:
        normalise(request(endpoint, fields), endpoint, SERVED)
    assert rejected.value.field == field
    assert str(rejected.value).startswith(message), str(rejected.value)
    assert len(str(rejected.value)) < 200  # one error, not every union branch's


@pytest.mark.parametrize(("endpoint", "fields"), GOOD)
def test_what_openai_and_vllm_take_passes_unchanged(endpoint, fields):
    body = request(endpoint, fields)
    sent = copy.deepcopy(body)
    plan = normalise(body, endpoint, SERVED)
    assert body == sent and plan.body == sent  # validation reads, never rewrites


def test_pydantic_and_openai_load_in_warm_up_not_at_import():
    """The gateway imports the module at start and warms it up in a background thread."""
    check = (
        "import sys, lmstack.serving.openai_compat as c, lmstack.serving.request_schema as r\n"
        "print(sorted(m for m in ('openai', 'pydantic') if m in sys.modules))\n"
        "r.warm_up()\n"
        "print(sorted(m for m in ('openai', 'pydantic') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "['openai', 'pydantic']"]


def test_the_gateway_answers_a_bad_body_itself(tmp_path):
    """Through the real gateway process: a 400 naming the field, the engine never asked."""
    from lmstack.serving.engines import Endpoint
    from lmstack.serving.gateway_process import gateway

    posts = []

    def reply(body: dict, headers) -> dict:
        posts.append(body)
        return chat_answer("7", finish_reason="stop")

    with openai_server("tiny-echo", reply) as url:
        upstream = Endpoint(url, "tiny-echo", engine="external")
        with gateway(upstream, SimpleNamespace(), tmp_path) as proxied:
            chat = f"{proxied.base_url}/chat/completions"
            base = {"model": "tiny-echo", "messages": USER}
            for fields, field in (
                ({"messages": "hi"}, "messages"),
                ({"temperature": -1}, "temperature"),
            ):
                answer = httpx.post(chat, json=base | fields, timeout=30)
                assert answer.status_code == 400, answer.text
                error = answer.json()["error"]
                assert error["param"] == field and field in error["message"]
                assert error["type"] == "invalid_request_error" and error["code"] == 400
            assert posts == []
            good = base | {"temperature": 0.7, "top_k": 5}
            assert httpx.post(chat, json=good, timeout=30).status_code == 200
    assert posts == [good]
