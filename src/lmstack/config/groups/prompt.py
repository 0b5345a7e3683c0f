"""The `prompt` group's schema (conf/prompt/): a prompt template and its plain-text rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmstack.config.rules import require


@dataclass
class PromptConfig:
    """A prompt template (conf/prompt/NAME.yaml); its version is a hash of its content."""

    name: str = "plain"
    # the system message; empty = none
    system: str = ""
    # the user message; {question} (and any other row field) is filled in
    template: str = "{question}"
    # example turns shown before the question: [{question: ..., answer: ...}]
    few_shot: list[dict[str, Any]] = field(default_factory=list)
    # plain-text rendering (base models, /v1/completions): "Question: ... Answer: ..."
    text_question_prefix: str = "Question: "
    text_answer_prefix: str = " Answer:"

    def __post_init__(self) -> None:
        for index, shot in enumerate(self.few_shot):
            require("answer" in shot, f"prompt.few_shot[{index}]", "needs an 'answer' field")
