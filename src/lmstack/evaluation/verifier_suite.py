"""eval=verifier: each answer scored against its row's reference (the built-in task's checker, or
eval.scorer on the user's rows).
"""

from __future__ import annotations

from typing import Any

from lmstack.config.groups import eval as eval_group
from lmstack.data.eval_rows import require_references
from lmstack.data.scoring import needs_reference
from lmstack.evaluation.sampling import score_samples
from lmstack.evaluation.suites import Inputs, Session, Suite, register
from lmstack.tracking.identity import stable_hash


def check_verifier(eval_cfg: Any, inputs: Inputs) -> None:
    if not inputs.builtin and needs_reference(inputs.scorer_name):
        require_references(inputs.rows, inputs.origin, f"eval.scorer.name={inputs.scorer_name}")


def suite_verifier(session: Session) -> dict[str, Any]:
    """Each answer scored against its row's reference: greedy score, or mean and CI."""

    rows, answers = session.rows(), session.answers()
    scorer = session.inputs.scorer
    scores = [
        [scorer(a, row.reference, row.record()) for a in sampled]
        for row, sampled in zip(rows, answers)
    ]
    summary = score_samples(scores, session.eval.confidence)
    session.samples(
        "verifier",
        [
            {
                **row.record(),
                "completion": sampled[0],
                "score": s[0],
                "responses": sampled,
                "scores": s,
            }
            for row, sampled, s in zip(rows, answers, scores)
        ],
    )
    return {
        "verifier/score": summary["mean"] if rows else None,
        "verifier/std": summary["std"],
        "verifier/ci_low": summary["ci_low"],
        "verifier/ci_high": summary["ci_high"],
        "verifier/num_samples": summary["n"],
        "verifier/pass_at_k": summary["pass_at_k"],
        "verifier/per_sample": summary["per_sample"],
        "verifier/n": len(rows),
        "verifier/scorer": session.inputs.scorer_name,
        "verifier/temperature": session.eval.temperature,
        # equal hashes: the same answers, word for word (greedy runs reproduce)
        "verifier/answers_hash": stable_hash(answers, 16),
    }


register(
    Suite(
        "verifier",
        suite_verifier,
        "verifier/score",
        rank=10,
        needs=("answers",),
        check=check_verifier,
        schema=eval_group.ScorerConfig,
        options_key="scorer",
    )
)
