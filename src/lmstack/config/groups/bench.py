"""The `bench` group's schema (conf/bench/): a serving benchmark's load and what it returns."""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.config.metrics import BENCH_FIGURES
from lmstack.config.rules import require, require_choice

# the scripted user's rules (lmstack.serving.scripted_user)
FEEDBACK_RULES = ("none", "correct", "json_key", "regex", "random")


@dataclass
class BenchConfig:
    """A serving benchmark, measured the way `vllm bench serve` measures."""

    # "builtin" (the arithmetic task's prompts) or a jsonl of {"prompt": ...} or {"messages": ...}
    prompts: str = "builtin"
    num_requests: int = 64
    # requests in flight at most; null = no cap
    max_concurrency: int | None = None
    # requests per second with Poisson arrivals; inf = all at once
    request_rate: float = float("inf")
    max_tokens: int = 64
    # ignore end-of-sequence so every request generates max_tokens (a fixed output length)
    ignore_eos: bool = True
    temperature: float = 0.0
    # chat (/v1/chat/completions, the run's chat template) or completions (/v1/completions)
    endpoint: str = "chat"
    # requests sent (and not measured) before the benchmark, to warm the engine
    warmup_requests: int = 2
    request_timeout_s: float = 300.0
    # service-level objectives for goodput, in milliseconds; null = not checked
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2el_ms: float | None = None
    # the figure a sweeper gets back
    metric: str = "output_throughput"
    seed: int = 0
    # held-out problems of the built-in task answered greedily on the same endpoint after the
    # load and checked by its verifier: bench/task_score beside the speed (0 = skip)
    score_prompts: int = 0
    # requests carry X-Lmstack-User: user-0 ... user-(users - 1) in turn; 0 = no user id
    users: int = 0
    # a scripted user's thumbs on each answer, through the gateway (lmstack.serving.
    # scripted_user): none, correct (the reference answer's number: the built-in task's, or a
    # prompt row's "answer"), json_key (a JSON object with feedback_key), regex (feedback_regex
    # found), random (up at feedback_rate, whatever the answer: an indifferent user)
    feedback: str = "none"
    feedback_key: str = "answer"
    feedback_regex: str = ""
    feedback_rate: float = 0.5

    def __post_init__(self) -> None:
        require(self.num_requests >= 1, "bench.num_requests", "must be >= 1")
        require(self.score_prompts >= 0, "bench.score_prompts", "must be >= 0 (0 = skip)")
        if self.max_concurrency is not None:
            require(self.max_concurrency >= 1, "bench.max_concurrency", "must be >= 1 or null")
        require(self.request_rate > 0, "bench.request_rate", "must be > 0 (inf: all at once)")
        require(self.max_tokens >= 1, "bench.max_tokens", "must be >= 1")
        require_choice(self.endpoint, ("chat", "completions"), "bench.endpoint")
        require_choice(self.metric.removeprefix("bench/"), tuple(BENCH_FIGURES), "bench.metric")
        require(self.users >= 0, "bench.users", "must be >= 0 (0 = no user id)")
        require_choice(self.feedback, FEEDBACK_RULES, "bench.feedback")
        require(0 <= self.feedback_rate <= 1, "bench.feedback_rate", "must be in [0, 1]")
        if self.feedback == "regex":
            require(bool(self.feedback_regex), "bench.feedback_regex", "bench.feedback=regex")
