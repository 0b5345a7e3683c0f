"""Prompts as code: templates in `conf/prompt/`, each with a content-hash version.

A prompt is a YAML file (system message, user template, optional few-shot turns).
Its version is a hash of that content, not of its name or comments, so editing a
prompt changes its version and results of two versions are never mixed. Clients
send the version with every request in the `X-Lmstack-Prompt-Version` header, and
the tracing gateway, the bench and the evaluators record it.

The active prompt of a run is the `prompt` group's choice; other prompts (judge
rubrics, say) are loaded by name with `load_prompt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmstack.config.groups.prompt import PromptConfig
from lmstack.config.location import PROMPT_DIR
from lmstack.errors import ConfigError
from lmstack.tracking.identity import stable_hash

PROMPT_VERSION_HEADER = "X-Lmstack-Prompt-Version"


def prompt_version(prompt: PromptConfig) -> str:
    """`p-` + a hash of what the model sees (system, template, few-shot turns)."""

    content = {"system": prompt.system, "template": prompt.template, "few_shot": prompt.few_shot}
    return f"p-{stable_hash(content, 10)}"


def load_prompt(name_or_path: str, search_dir: Path = PROMPT_DIR) -> PromptConfig:
    """A prompt by group option name (`conf/prompt/NAME.yaml`) or by file path."""

    path = Path(name_or_path)
    if not path.suffix:
        path = search_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in search_dir.glob("*.yaml")))
        raise ConfigError(f"prompt '{name_or_path}': no file {path} (available: {available})")
    try:
        loaded = OmegaConf.load(path)
        loaded.pop("defaults", None)
        merged = OmegaConf.merge(OmegaConf.structured(PromptConfig), loaded)
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as error:
        raise ConfigError(f"prompt file {path}: {error}") from None


def render_messages(prompt: PromptConfig, fields: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages: the system message, few-shot turns, then the filled template."""
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for shot in prompt.few_shot:
        messages.append({"role": "user", "content": fill(prompt, shot)})
        messages.append({"role": "assistant", "content": str(shot["answer"])})
    messages.append({"role": "user", "content": fill(prompt, fields)})
    return messages


def render_text(prompt: PromptConfig, fields: dict[str, Any]) -> str:
    """The same prompt as plain text, for base models and the completions endpoint."""
    question, answer = prompt.text_question_prefix, prompt.text_answer_prefix
    parts = [prompt.system] if prompt.system else []
    for shot in prompt.few_shot:
        parts.append(f"{question}{fill(prompt, shot)}{answer} {shot['answer']}")
    parts.append(f"{question}{fill(prompt, fields)}{answer}")
    return "\n".join(parts)


def fill(prompt: PromptConfig, fields: dict[str, Any]) -> str:
    try:
        return prompt.template.format(**fields)
    except KeyError as missing:
        raise ConfigError(
            f"prompt '{prompt.name}': its template needs field {missing}, "
            f"the row has {', '.join(sorted(fields))}"
        ) from None
