"""Third-party OpenAI clients through the gateway, against a real `transformers serve` engine.

Every engine behind the gateway takes what the OpenAI API and vLLM take, or answers 400
naming the field: the openai SDK's `stop`, `n`, `max_tokens=0`, an over-long prompt,
`ignore_eos` (load testers), token-id prompts (lm-eval's local-completions), under a short
served name rather than the model's path.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
import torch
from test_gateway import make_config

from lmstack.serving.gateway_process import gateway
from lmstack.serving.openai_compat import (
    Plan,
    RequestRejected,
    ServedModel,
    combine,
    normalise,
    trim_at_stop,
)

NAME = "tiny-demo"
PROMPT = "Ann has 3 apples and gets 4 more. How many apples does Ann have now?"


@pytest.fixture(scope="module")
def engine(tiny_base, tmp_path_factory):
    from lmstack.serving.engines import serve

    config = make_config(f"serving.model={tiny_base}", "logger=none")
    with serve(config, str(tiny_base.parent), tmp_path_factory.mktemp("e"), gateway=False) as up:
        yield up


@pytest.fixture(scope="module")
def proxied(engine, tmp_path_factory):
    with gateway(engine, make_config("logger=none"), tmp_path_factory.mktemp("g"), name=NAME) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(proxied):
    return openai.OpenAI(base_url=proxied.base_url, api_key="EMPTY", max_retries=0)


def complete(client, **extra):
    args = {"model": NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0} | extra
    return client.completions.create(**args)


def test_the_model_is_served_under_a_short_name(client, proxied, engine):
    assert proxied.model == NAME and engine.model.startswith("/")
    assert [m.id for m in client.models.list()] == [NAME]
    direct = httpx.post(
        f"{engine.base_url}/completions",
        json={"model": engine.model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
    ).json()
    assert complete(client).choices[0].text == direct["choices"][0]["text"]


def test_stop_strings_end_the_answer_and_are_left_out(client):
    full = complete(client).choices[0].text
    stop = full.strip()[3:5]  # somewhere inside the greedy answer
    assert stop and stop in full
    want = full[: full.find(stop)]
    whole = complete(client, stop=[stop]).choices[0]
    assert (whole.text, whole.finish_reason) == (want, "stop")
    pieces = list(complete(client, stop=stop, stream=True))
    text = "".join(c.choices[0].text for c in pieces if c.choices)
    finish = [
        c.choices[0].finish_reason for c in pieces if c.choices and c.choices[0].finish_reason
    ]
    assert (text, finish) == (want, ["stop"])


def test_n_returns_n_choices(client):
    answer = complete(client, n=2)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].text == answer.choices[1].text == complete(client).choices[0].text
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, n=3
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 1  # greedy: the same answer


def test_streamed_choices_and_stops_arrive_piece_by_piece(client):
    """n and stop on the hf engine are made by the gateway, yet a streaming client gets each
    choice as the engine makes it, not the whole answer at the end."""
    whole = complete(client, n=2, max_tokens=16)
    stream = complete(
        client, n=2, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    pieces: dict[int, list[str]] = {0: [], 1: []}
    events = list(stream)
    for event in events:
        for choice in event.choices:
            pieces[choice.index].append(choice.text)
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in whole.choices]
    assert all(sum(bool(text) for text in pieces[i]) > 3 for i in (0, 1)), pieces
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, n=2,
        stream=True,
    )  # fmt: skip
    texts: dict[int, str] = {0: "", 1: ""}
    for event in chat:
        for choice in event.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] != ""  # greedy: the same answer twice


def test_a_stop_string_split_across_pieces_is_never_sent():
    from lmstack.serving.openai_compat import StopCutter

    cutter = StopCutter(["END", "\n\n"])
    sent = [cutter.feed(piece) for piece in ["The E", "N", "d is near", "ly", " END", "x"]]
    assert "".join(sent) + cutter.rest() == "The ENd is nearly "
    assert sent[:2] == ["The ", ""] and cutter.hit  # "E", "EN" held back until ruled out
    cutter = StopCutter(["END"])
    assert cutter.feed("no stop E") == "no stop " and cutter.rest() == "E" and not cutter.hit


def test_requests_the_engine_cannot_honour_are_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as zero:
        complete(client, max_tokens=0)
    assert "max_tokens must be at least 1" in str(zero.value)
    with pytest.raises(openai.BadRequestError) as long:
        complete(client, prompt="1 + 1 = 2. " * 400)
    assert "maximum context length is 256 tokens" in str(long.value)
    with pytest.raises(openai.BadRequestError) as logprobs:
        complete(client, logprobs=1)
    assert "logprobs: the hf engine returns no log-probabilities" in str(logprobs.value)


def test_ignore_eos_gives_a_fixed_output_length(client):
    answer = complete(client, max_tokens=40, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 40
    streamed = complete(
        client,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = [c.usage for c in streamed if c.usage]
    assert usage[-1].completion_tokens == 24


def test_token_id_prompts_answer_as_their_text(client, tiny_base):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_base)(PROMPT)["input_ids"]
    as_text = complete(client).choices[0].text
    assert complete(client, prompt=ids).choices[0].text == as_text
    batch = complete(client, prompt=[ids, ids])
    assert [c.text for c in batch.choices] == [as_text, as_text]


# ---- the request step on its own (no engine)


def hf_model(**extra) -> ServedModel:
    return ServedModel(name=NAME, upstream_name="/models/x", engine="hf", **extra)


def test_normalise_leaves_a_plain_request_alone_for_a_capable_engine():
    body = {"model": "m", "prompt": "hi", "max_tokens": 4, "stop": ["\n"], "n": 2}
    plan = normalise(body, "completions", ServedModel(name="m", engine="vllm"))
    assert plan.body == body and not plan.adapted


def test_normalise_maps_the_name_and_plans_what_the_hf_engine_lacks():
    plan = normalise({"model": NAME, "prompt": "hi", "max_tokens": 3}, "completions", hf_model())
    assert plan.body["model"] == "/models/x" and not plan.adapted
    plan = normalise(
        {"model": NAME, "prompt": "hi", "n": 2, "stop": "x"}, "completions", hf_model()
    )
    assert plan.adapted and plan.n == 2 and plan.stop == ["x"]
    assert len(plan.upstream_bodies()) == 2
    for bad in ({"n": 0}, {"max_tokens": -1}, {"stop": [1]}, {"ignore_eos": True}):
        with pytest.raises(RequestRejected) as rejected:
            normalise({"model": NAME, "prompt": "hi", **bad}, "completions", hf_model())
        assert rejected.value.field == next(iter(bad))


def test_combine_trims_stops_and_sums_usage():
    plan = Plan({"model": NAME}, "completions", prompts=["a", "b"], n=1, stop=["!"], adapted=True)
    usage = {"prompt_tokens": 2, "completion_tokens": 3}
    answers = [
        {"choices": [{"text": "yes! no", "finish_reason": "length"}], "usage": usage},
        {"choices": [{"text": "maybe", "finish_reason": "length"}], "usage": usage},
    ]
    answer = combine(plan, answers)
    assert [(c["text"], c["finish_reason"]) for c in answer["choices"]] == [
        ("yes", "stop"),
        ("maybe", "length"),
    ]
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    assert trim_at_stop("abcabc", ["c", "b"]) == ("a", True)


# ---- lm-eval's own CLI against phase=serve


TASK_YAML = """\
task: fc_arith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""
QUESTIONS = [
    "Ann has 3 apples and gets 4 more. How many apples does Ann have now?",
    "Bo has 9 pens and gives away 2. How many pens does Bo have now?",
    "Cy has 5 cups and gets 1 more. How many cups does Cy have now?",
]


def lm_eval_cli(model: str, model_args: str, tasks_dir: Path, out: Path, *extra: str) -> list:
    """`lm_eval` as a user runs it; the per-sample answers it logged."""
    import subprocess
    import sys

    command = [
        str(Path(sys.executable).parent / "lm_eval"),
        "--model", model, "--model_args", model_args, "--tasks", "fc_arith_gen",
        "--include_path", str(tasks_dir), "--output_path", str(out), "--log_samples", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (samples,) = out.rglob("samples_fc_arith_gen_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return [row["resps"][0][0] for row in sorted(rows, key=lambda r: r["doc_id"])]


def in_process(model_dir: Path, prompts: list, chat: bool) -> list[str]:
    """What the model answers greedily in this process, cut at the task's stop string."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = []
    for prompt in prompts:
        if chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True,
            )["input_ids"]  # fmt: skip
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        answers.append(trim_at_stop(text, ["."])[0])
    return answers


@pytest.mark.slow
def test_lm_eval_cli_runs_a_generative_task_against_phase_serve(tmp_path, tiny_base):
    from test_serving import start_serve

    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "7"}) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "fc_arith_gen.yaml").write_text(TASK_YAML.format(data=data))
    process, endpoint = start_serve(tiny_base, tmp_path / "serve")
    try:
        assert not endpoint["model"].startswith("/")  # a short name, not the model's path
        url = endpoint["base_url"]
        # local-completions on its defaults: token-id prompts, `stop` from the task's `until`
        completions = lm_eval_cli(
            "local-completions",
            f"model={endpoint['model']},base_url={url}/completions,tokenizer={tiny_base}",
            tasks, tmp_path / "completions",
        )  # fmt: skip
        chat = lm_eval_cli(
            "local-chat-completions",
            f"model={endpoint['model']},base_url={url}/chat/completions",
            tasks, tmp_path / "chat", "--apply_chat_template",
        )  # fmt: skip
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert completions == in_process(tiny_base, QUESTIONS, chat=False)
    assert chat == in_process(tiny_base, QUESTIONS, chat=True)


def test_a_temperature_samples_and_zero_stays_greedy(client):
    """The model's generation config does not sample: served as it is, transformers serve's
    continuous batching would answer temperature 2 greedily (the engine serves a view of it)."""
    hot = {complete(client, temperature=2.0).choices[0].text for _ in range(6)}
    cold = {complete(client).choices[0].text for _ in range(3)}
    assert len(hot) > 1 and len(cold) == 1
