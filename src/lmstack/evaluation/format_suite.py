"""eval=format: the share of answers that match eval.format's regex and/or JSON schema."""

from __future__ import annotations

from typing import Any

from lmstack.config.groups import eval as eval_group
from lmstack.errors import ConfigError
from lmstack.evaluation.formats import compile_regex, compliance, load_schema
from lmstack.evaluation.suites import Inputs, Session, Suite, register

# the built-in answer sentence the format suite checks on the built-in task
ARITH_ANSWER_REGEX = r"The answer is -?\d+\.?\s*$"


def format_checks(eval_cfg: Any, inputs: Inputs) -> tuple[str, str]:
    """(regex, json schema) the format suite applies; `auto` resolves by the rows' source."""
    regex = eval_cfg.format.regex
    if regex == "auto":
        regex = ARITH_ANSWER_REGEX if inputs.builtin else ""
    return regex, eval_cfg.format.json_schema


def check_format(eval_cfg: Any, inputs: Inputs) -> None:
    regex, schema = format_checks(eval_cfg, inputs)
    if not regex and not schema:
        raise ConfigError(
            "eval.format: nothing to check on your rows; give eval.format.regex='...' "
            "and/or eval.format.json_schema='{...}' (inline JSON or a file)"
        )
    if regex:
        compile_regex(regex)
    if schema:
        load_schema(schema)


def suite_format(session: Session) -> dict[str, Any]:
    regex, schema = format_checks(session.eval, session.inputs)
    rows = session.rows()
    answers = [a for sampled in session.answers() for a in sampled]
    owners = [row for row, sampled in zip(rows, session.answers()) for _ in sampled]
    result, passed = compliance(answers, regex, schema)
    session.samples(
        "format",
        [
            {
                **row.record(),
                "completion": answer,
                **{k: v[i] for k, v in passed.items()},
                "score": float(all(v[i] for v in passed.values())),
            }
            for i, (row, answer) in enumerate(zip(owners, answers))
        ],
    )
    return {f"format/{key}": value for key, value in result.items()}


register(
    Suite(
        "format",
        suite_format,
        "format/rate",
        rank=60,
        needs=("answers",),
        check=check_format,
        schema=eval_group.FormatConfig,
        options_key="format",
    )
)
