"""The model under test: in this process (base + adapter, any quantization) or served.

Both kinds answer the same request, `answers(rows, n)`: prompts rendered with the `prompt`
group's template (chat: the model's own chat template; text: `Question: ... Answer:`),
`n` samples each (greedy when the temperature is 0). What the user gets from a served model
is what is measured: the served target goes through the HTTP endpoint, the prompt version in
the `X-Lmstack-Prompt-Version` header.

Deferred imports, for start-up time: peft and torch (and the lmstack modules that load them)
are imported inside the functions that need them; the CLI's input checks import this module
first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError, LmstackError
from lmstack.judging import run_concurrently
from lmstack.models.adapters import adapter_base
from lmstack.prompts import (
    PROMPT_VERSION_HEADER,
    fill,
    prompt_version,
    render_messages,
    render_text,
)
from lmstack.tracking.run_dir import read_json
from lmstack.util import openai_api


@dataclass
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32


@dataclass
class LocalModel:
    """A model loaded for evaluation, and what it is (for the records)."""

    model: Any
    tokenizer: Any
    described: dict[str, Any] = field(default_factory=dict)


def load_local_model(model_cfg: Any, quant_cfg: Any, cache_dir: str) -> LocalModel:
    """The model group's model: a run directory's adapter on its base (quantized as the
    `quantization` group says), a run's full or merged model, or a base folder."""
    from lmstack.models.loading import load_base, load_tokenizer, resolve_base_path

    init_from = model_cfg.init_from
    adapter = Path(init_from) / "adapter" if init_from else None
    if adapter is not None and (adapter / "adapter_config.json").is_file():
        _require_finished(Path(init_from))
        from peft import PeftModel

        base_path = adapter_base(adapter, model_cfg.base, cache_dir, "model.init_from")
        tokenizer = load_tokenizer(str(adapter), model_cfg)
        base = load_base(base_path, model_cfg, quant_cfg)
        model = PeftModel.from_pretrained(base, str(adapter))
        described = {"path": str(init_from), "base": base_path, "adapter": str(adapter)}
    else:
        path = resolve_base_path(model_cfg, cache_dir)
        tokenizer = load_tokenizer(path, model_cfg)
        model = load_base(path, model_cfg, quant_cfg)
        described = {"path": str(init_from or path)}
    described["quantization"] = quant_cfg.name
    model = _to_device(model, quant_cfg.name).eval()
    return LocalModel(model, tokenizer, described)


def _require_finished(run_dir: Path) -> None:
    status = (read_json(run_dir / "status.json") or {}).get("status")
    if status != "finished":
        raise ConfigError(f"model.init_from: the run in '{run_dir}' has not finished ({status})")


def _to_device(model: Any, quantization: str) -> Any:
    import torch

    # bitsandbytes places quantized weights itself
    if torch.cuda.is_available() and quantization == "none":
        return model.to("cuda")
    return model


class InProcessTarget:
    """Generation with `model.generate`, left-padded batches; seeded sampling per sample index."""

    kind = "in_process"

    def __init__(self, local: LocalModel, prompt: Any, chat: bool, sampling: Sampling) -> None:
        self.local, self.prompt, self.chat, self.sampling = local, prompt, chat, sampling
        self.described = {**local.described, "target": self.kind}

    def render(self, fields: dict[str, Any]) -> str:
        if self.chat:
            messages = chat_of(self.prompt, fields)
            return self.local.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return render_text(self.prompt, text_fields(fields))

    def answers(self, rows: list[dict[str, Any]], num_samples: int = 1) -> list[list[str]]:
        """`num_samples` answers per row (sample k drawn with seed + k)."""
        texts = [self.render(row) for row in rows]
        per_sample = [self._generate(texts, self.sampling.seed + k) for k in range(num_samples)]
        return [list(answers) for answers in zip(*per_sample)]

    def _generate(self, texts: list[str], seed: int) -> list[str]:
        import torch

        from lmstack.evaluation.verifier import generate_batched

        sampling = self.sampling
        sample = sampling.temperature > 0
        options = (
            {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            if sample
            else {}
        )
        torch.manual_seed(seed)
        answers = generate_batched(
            self.local.model,
            self.local.tokenizer,
            texts,
            sampling.max_new_tokens,
            sampling.batch_size,
            # chat templates bring their own bos; plain text needs the tokenizer's
            add_special_tokens=not self.chat,
            **options,
        )
        return [cut_at_stop(a, self.chat) for a in answers]


def chat_of(prompt: Any, fields: dict[str, Any]) -> list[dict[str, str]]:
    """The chat a row becomes: the prompt group's template filled with its fields, or the
    row's own messages (after the prompt group's system message and few-shot turns)."""
    if "messages" not in fields:
        return render_messages(prompt, fields)
    own = [dict(m) for m in fields["messages"]]
    has_system = any(m["role"] == "system" for m in own)
    lead = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for shot in prompt.few_shot:
        lead += [
            {"role": "user", "content": fill(prompt, shot)},
            {"role": "assistant", "content": str(shot["answer"])},
        ]
    if has_system:
        lead = [m for m in lead if m["role"] != "system"]
        return own[:1] + lead + own[1:] if own[0]["role"] == "system" else lead + own
    return lead + own


def text_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Plain-text prompts take a chat row's last user message as the question."""
    return {k: v for k, v in fields.items() if k != "messages"}


def cut_at_stop(answer: str, chat: bool) -> str:
    """Plain-text prompts run on past the answer into the next "Question:"; keep its line."""
    return answer.strip() if chat else answer.split("\n", 1)[0].strip()


class ServedTarget:
    """An OpenAI-compatible endpoint: /chat/completions (chat) or /completions (text)."""

    kind = "served"

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: Any,
        chat: bool,
        sampling: Sampling,
        api_key: str = "EMPTY",
        described: dict[str, Any] | None = None,
        concurrency: int = 8,
        timeout_s: float = 300.0,
    ) -> None:
        self.base_url, self.model, self.prompt, self.chat = (
            base_url.rstrip("/"),
            model,
            prompt,
            chat,
        )
        self.sampling, self.api_key, self.concurrency = sampling, api_key, concurrency
        self.timeout_s = timeout_s
        self.described = {**(described or {}), "target": self.kind, "base_url": self.base_url}

    def answers(self, rows: list[dict[str, Any]], num_samples: int = 1) -> list[list[str]]:
        jobs = [(i, k) for i in range(len(rows)) for k in range(num_samples)]
        results = run_concurrently(
            [lambda i=i, k=k: self._one(rows[i], self.sampling.seed + k) for i, k in jobs],
            self.concurrency,
        )
        out: list[list[str]] = [[] for _ in rows]
        for (i, _), text in zip(jobs, results):
            out[i].append(text)
        return out

    def _one(self, fields: dict[str, Any], seed: int) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.sampling.max_new_tokens,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "seed": seed,
        }
        server = openai_api.client(self.base_url, self.api_key, self.timeout_s)
        headers = {PROMPT_VERSION_HEADER: prompt_version(self.prompt)}
        if self.chat:
            url = f"{self.base_url}/chat/completions"
            messages = chat_of(self.prompt, fields)
            reply = _answer(url, server.chat.completions.create, body, messages=messages,
                            extra_headers=headers)  # fmt: skip
            text = reply.choices[0].message.content or ""
        else:
            url = f"{self.base_url}/completions"
            prompt = render_text(self.prompt, text_fields(fields))
            reply = _answer(url, server.completions.create, body, prompt=prompt, stop=["\n"],
                            extra_headers=headers)  # fmt: skip
            text = reply.choices[0].text or ""
        return cut_at_stop(text, self.chat)


def _answer(url: str, create: Any, body: dict[str, Any], **more: Any) -> Any:
    """One request through the openai client; no answer or an error answer is an LmstackError
    naming the URL."""
    try:
        return create(**body, **more)
    except openai_api.Unreachable as error:
        raise LmstackError(f"{url}: the server cannot be reached ({error})") from None
    except openai_api.ErrorAnswer as error:
        raise LmstackError(f"{url}: {openai_api.describe(error)}") from None
