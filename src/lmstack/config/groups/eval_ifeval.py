"""Options of the `ifeval` eval suite (eval.ifeval): which instruction-following prompts are
asked (lmstack's own set, or a file in IFEval's input format), how long the answers may be,
and whether IFEval's loose variants are scored too.

Whether an instruction id is one of if-verifiable's checkers is checked by the suite
(lmstack.evaluation.ifeval) before any model loads: the config layer does not import the
checkers' wheel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.config.rules import require

# an IFEval instruction id is "<group>:<name>", e.g. detectable_format:json_format
ID_SEPARATOR = ":"


@dataclass
class IFEvalConfig:
    """Instruction following, IFEval style: each answer checked by if-verifiable's checkers."""

    # a jsonl in IFEval's input format ({key, prompt, instruction_id_list, kwargs} a line);
    # empty = lmstack's own prompt set (not the official IFEval prompts, which do not ship)
    prompts: str = ""
    # instruction ids (e.g. [detectable_format:json_format, punctuation:no_comma]): only the
    # prompts that give at least one of them (all of such a prompt's instructions are
    # checked); empty = every prompt
    instructions: list[str] = field(default_factory=list)
    # the first N prompts after the instruction filter; null = all
    limit: int | None = None
    # new tokens per answer (room for paragraphs, lists and sections)
    max_new_tokens: int = 512
    # also score IFEval's loose variants (the answer without its first and/or last line, or
    # without markdown asterisks; an instruction followed by any variant counts)
    loose: bool = True

    def check(self) -> None:
        require(self.max_new_tokens >= 1, "eval.ifeval.max_new_tokens", "must be >= 1")
        if self.limit is not None:
            require(self.limit >= 1, "eval.ifeval.limit", "must be >= 1 or null")
        for index, name in enumerate(self.instructions):
            require(
                ID_SEPARATOR in str(name),
                f"eval.ifeval.instructions[{index}]",
                f"'{name}' is not an instruction id; ids read <group>:<name>, "
                "e.g. detectable_format:json_format",
            )
        require(
            len(set(self.instructions)) == len(self.instructions),
            "eval.ifeval.instructions",
            f"ids repeat: {list(self.instructions)}",
        )
