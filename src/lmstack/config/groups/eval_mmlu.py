"""Options of the `mmlu` eval suite (eval.mmlu): which of the 282 MMLU dev questions the lm-eval
wheel ships are asked, with how many solved examples, and how the interval is drawn."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.config.rules import require

# each subject has 4 or 5 questions; a question's shots are the others of its subject
MAX_SHOTS = 3


@dataclass
class MMLUConfig:
    """MMLU as log-likelihood multiple choice (" A" ... " D" after "Answer:"), through lm-eval."""

    # subject names as MMLU spells them (high_school_physics, ...); empty = all 57
    subjects: list[str] = field(default_factory=list)
    # the first N questions (in file order) after the subject filter; null = all
    limit: int | None = None
    # solved questions of the same subject shown before each one (never the question itself)
    shots: int = 0
    # resamples of the questions for the accuracy's confidence interval (eval.confidence)
    bootstrap_rounds: int = 1000
    batch_size: int = 16

    def check(self) -> None:
        require(
            0 <= self.shots <= MAX_SHOTS,
            "eval.mmlu.shots",
            f"must be in 0..{MAX_SHOTS} (a subject has 4 or 5 questions, one being asked)",
        )
        require(self.bootstrap_rounds >= 10, "eval.mmlu.bootstrap_rounds", "must be >= 10")
        require(self.batch_size >= 1, "eval.mmlu.batch_size", "must be >= 1")
        if self.limit is not None:
            require(self.limit >= 1, "eval.mmlu.limit", "must be >= 1 or null")
        require(
            len(set(self.subjects)) == len(self.subjects),
            "eval.mmlu.subjects",
            f"names repeat: {list(self.subjects)}",
        )
