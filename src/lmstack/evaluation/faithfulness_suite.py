"""eval=faithfulness: whether each answer is supported by its row's context (lexical overlap or an
LLM judge).
"""

from __future__ import annotations

from typing import Any

from lmstack.config.groups import eval as eval_group
from lmstack.errors import DataError
from lmstack.evaluation import faithfulness
from lmstack.evaluation.judge_suite import warn_unparsed
from lmstack.evaluation.suites import Inputs, Session, Suite, register
from lmstack.prompts import load_prompt


def check_faithfulness(eval_cfg: Any, inputs: Inputs) -> None:
    if not inputs.builtin and not any(row.context for row in inputs.rows):
        raise DataError(
            f"{inputs.origin}: the faithfulness suite needs rows with a 'context' (the text "
            "an answer must be grounded in); none of the rows has one"
        )
    if eval_cfg.faithfulness.method == "judge":
        load_prompt("judge_faithfulness")


def suite_faithfulness(session: Session) -> dict[str, Any]:
    faith_cfg, inputs = session.eval.faithfulness, session.inputs
    if inputs.builtin:
        items = faithfulness.context_qa_set(faith_cfg.num_items)
        fields = [faithfulness.prompt_fields(item) for item in items]
        references = [item["answer"] for item in items]
    else:
        rows = [row for row in inputs.rows if row.context][: faith_cfg.num_items]
        items = [
            {"context": row.context, "question": row.text(), "answer": row.reference}
            for row in rows
        ]
        fields = [faithfulness.grounded_fields(row) for row in rows]
        references = [row.reference for row in rows]
    answers = [sampled[0] for sampled in session.target.answers(fields)]
    correct = [
        inputs.scorer(a, ref, {}) if ref is not None else None
        for a, ref in zip(answers, references)
    ]
    if faith_cfg.method == "judge":
        result = faithfulness.judge_report(
            items, answers, correct, session.judge(), session.eval.judge
        )
        warn_unparsed(session, "faithfulness judge", result["parse_failures"], len(items))
    else:
        check = faithfulness.supported if inputs.builtin else faithfulness.grounded
        result = faithfulness.report(items, answers, correct, check)
    session.samples(
        "faithfulness",
        [
            {
                "prompt": item["question"],
                "context": item["context"],
                "reference": item["answer"],
                "completion": answer,
                "score": supported,
            }
            for item, answer, supported in zip(items, answers, result.pop("supported"))
        ],
    )
    return {f"faithfulness/{key}": value for key, value in result.items()} | {
        "faithfulness/method": faith_cfg.method
    }


def needs_of_faithfulness(cfg: Any) -> tuple[str, ...]:
    return ("answers", "judge") if cfg.faithfulness.method == "judge" else ("answers",)


register(
    Suite(
        "faithfulness",
        suite_faithfulness,
        "faithfulness/support_rate",
        rank=40,
        needs=needs_of_faithfulness,
        check=check_faithfulness,
        schema=eval_group.FaithfulnessConfig,
        options_key="faithfulness",
    )
)
