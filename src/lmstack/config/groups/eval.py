"""The `eval` group's schema (conf/eval/): which suites run, on what target, and each suite's
options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmstack.config.groups.eval_humaneval import HumanEvalConfig
from lmstack.config.groups.eval_ifeval import IFEvalConfig
from lmstack.config.groups.eval_math import MathEvalConfig
from lmstack.config.groups.eval_mmlu import MMLUConfig
from lmstack.config.rules import require, require_choice

# what phase=eval can measure; `eval=[lm_eval,judge]` turns several on (see conf/eval/). The
# built-in suites, and each plug-in suite once its module registers it (evaluation/suites.py
# `register` declares it here, before composition when it loads as a plug-in)
EVAL_SUITES: list[str] = [
    "verifier",
    "format",
    "lm_eval",
    "judge",
    "calibration",
    "arena",
    "faithfulness",
    "mmlu",
    "math",
    "humaneval",
    "ifeval",
]


def declare_suite(name: str) -> None:
    if name not in EVAL_SUITES:
        EVAL_SUITES.append(name)


EVAL_TARGETS = ("in_process", "served")


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks: lmstack's own (offline) or any task the harness knows."""

    tasks: list[str] = field(default_factory=lambda: ["lmstack_arith_gen", "lmstack_arith_mc"])
    # extra folders of task YAMLs, searched before the harness's own tasks
    include_paths: list[str] = field(default_factory=list)
    # documents per task; null = all
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 16
    # generation length for generative tasks; null = each task's own (a value overrides it,
    # and the run says so)
    max_gen_toks: int | None = None
    # prompts through the model's chat template (what SFT trained on); false: raw text
    apply_chat_template: bool = True

    def check(self) -> None:
        require(len(self.tasks) > 0, "eval.lm_eval.tasks", "is empty")
        require(self.batch_size >= 1, "eval.lm_eval.batch_size", "must be >= 1")
        if self.limit is not None:
            require(self.limit >= 1, "eval.lm_eval.limit", "must be >= 1 or null")


@dataclass
class JudgeConfig:
    """LLM-as-judge through any OpenAI-compatible endpoint."""

    # the judge's base URL (…/v1); empty = the model under test, served by the `serving` group
    base_url: str = ""
    # the model name the judge endpoint expects; empty = its first /v1/models entry
    model: str = ""
    # name of the environment variable holding the judge's API key (keys never go in configs)
    api_key_env: str = ""
    # rubric and template files in conf/prompt/; their content hash goes with every score
    single_prompt: str = "judge_single"
    pairwise_prompt: str = "judge_pairwise"
    max_tokens: int = 24
    timeout_s: float = 60.0
    max_retries: int = 1
    concurrency: int = 4
    # labelled pairs for calibration: "builtin" (generated for the arithmetic task) or a jsonl
    calibration_set: str = "builtin"
    calibration_size: int = 24
    # pairwise judging of the model under test against another model on the same prompts:
    # "base" (the model group's model without init_from) or a run directory; empty = off
    compare_to: str = ""

    def check(self, key: str = "eval.judge") -> None:
        require(self.max_tokens >= 1, f"{key}.max_tokens", "must be >= 1")
        require(self.concurrency >= 1, f"{key}.concurrency", "must be >= 1")
        require(self.calibration_size >= 2, f"{key}.calibration_size", "must be >= 2")
        if self.base_url:
            require(
                self.base_url.startswith(("http://", "https://")),
                f"{key}.base_url",
                f"'{self.base_url}' is not an http(s) URL",
            )


@dataclass
class ArenaConfig:
    """Pairwise battles between models, rated by a Bradley-Terry fit (Elo scale)."""

    # run directories, sweep directories (each finished run in them), HF folders, or "base"
    # (the `model` group's model)
    models: list[str] = field(default_factory=list)
    # verifier: the task's checker decides each battle; judge: the LLM judge, both orders;
    # none: no machine battles (ratings from human_votes only)
    judge: str = "verifier"
    # a labelling session (phase=label's run directory or its votes.sqlite): people's votes
    # rated too, reported apart from the machine's
    human_votes: str = ""
    num_prompts: int = 40
    bootstrap_rounds: int = 1000
    # the model whose rating is pinned at 1000; empty = the first
    anchor: str = ""

    def check(self, enabled: bool) -> None:
        require_choice(self.judge, ("verifier", "judge", "none"), "eval.arena.judge")
        require(self.bootstrap_rounds >= 10, "eval.arena.bootstrap_rounds", "must be >= 10")
        if enabled and self.judge == "none":
            require(
                bool(self.human_votes),
                "eval.arena.human_votes",
                "eval.arena.judge=none rates people's votes only: name a labelling session",
            )
        elif enabled:
            require(
                len(self.models) >= 2,
                "eval.arena.models",
                "the arena needs at least two models (run dirs, sweep dirs, HF folders, base)",
            )


@dataclass
class FaithfulnessConfig:
    """Context-grounded answers: is each answer supported by its given context?"""

    num_items: int = 40
    # support: every number the answer states is a context fact or follows from two of them
    # by + or -; judge: the LLM judge reads context and answer
    method: str = "support"

    def check(self) -> None:
        require_choice(self.method, ("support", "judge"), "eval.faithfulness.method")
        require(self.num_items >= 1, "eval.faithfulness.num_items", "must be >= 1")


@dataclass
class FormatConfig:
    """Output format checks on the answers: a regex and/or a JSON schema."""

    # a regex every answer must match (re.search); empty = no regex check
    # auto: the built-in task's answer sentence on the built-in task, none on eval.data rows
    regex: str = "auto"
    # a JSON schema (inline JSON or a file path) the answer, parsed as JSON, must satisfy
    json_schema: str = ""


@dataclass
class EvalDataConfig:
    """The user's own evaluation rows; every suite asks their prompts (empty = built-in task)."""

    # a jsonl/parquet file of rows {prompt (text or chat messages), reference?, context?,
    # metadata?} or SFT rows {messages}; a hub dataset name or a local dataset folder
    path: str = ""
    # auto: by the file's suffix (.jsonl/.json, .parquet); anything else is a hub dataset
    source: str = "auto"
    subset: str | None = None
    split: str = "test"
    # the first N rows; null = all
    limit: int | None = None
    # few-shot prompting baseline: the first `shots` rows of shots_path (rows with references)
    # are shown as solved turns before each prompt
    shots: int = 0
    shots_path: str = ""

    def check(self) -> None:
        require_choice(self.source, ("auto", "jsonl", "parquet", "hub"), "eval.data.source")
        require(self.shots >= 0, "eval.data.shots", "must be >= 0")
        if self.shots:
            require(bool(self.shots_path), "eval.data.shots_path", "eval.data.shots needs it")
        if self.limit is not None:
            require(self.limit >= 1, "eval.data.limit", "must be >= 1 or null")


@dataclass
class ScorerConfig:
    """How an answer is scored against its row's reference (the verifier and arena suites)."""

    # auto: the built-in task's verifier, or `normalized` on eval.data rows; exact, normalized,
    # numeric, json_fields, or your own function as an import path `pkg.module:function`
    # taking (completion, reference, row) and returning a number in [0, 1]
    name: str = "auto"
    # numeric: |answer - reference| <= tolerance * max(1, |reference|)
    tolerance: float = 1e-6
    # json_fields: the keys compared (empty = every key of the reference)
    fields: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """phase=eval: what is measured, on which model (in process or served), how sampled."""

    # suite name -> on; options of the `eval` group each turn one on: eval=[lm_eval,judge]
    suites: dict[str, bool] = field(default_factory=dict)
    # in_process: the model group's model (+ adapter, any quantization) in this process;
    # served: that model behind the `serving` group's engine, as users would get it
    target: str = "in_process"
    num_prompts: int = 100
    max_new_tokens: int = 32
    # 0: greedy (deterministic); > 0 with num_samples > 1: mean and confidence interval
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    confidence: float = 0.95
    batch_size: int = 32
    # requests in flight to a served target (and lm-eval's API backends)
    concurrency: int = 4
    # render prompts with the model's chat template; false: plain text (prompt.text_*)
    chat: bool = True
    seed: int = 0
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    arena: ArenaConfig = field(default_factory=ArenaConfig)
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    mmlu: MMLUConfig = field(default_factory=MMLUConfig)
    math: MathEvalConfig = field(default_factory=MathEvalConfig)
    humaneval: HumanEvalConfig = field(default_factory=HumanEvalConfig)
    ifeval: IFEvalConfig = field(default_factory=IFEvalConfig)
    # the user's own rows (prompts, references, contexts); empty path = the built-in task
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    # modules that register more suites (lmstack.evaluation.suites.register); their options
    # go under eval.options.<suite name>
    plugins: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.suites if not self.plugins else ():
            # with plugins, the phase checks names once their modules are imported
            require_choice(name, tuple(EVAL_SUITES), f"eval.suites.{name}")
        require(
            any(self.suites.values()),
            "eval.suites",
            f"no suite is on; pick some, e.g. eval=[verifier,lm_eval] ({', '.join(EVAL_SUITES)})",
        )
        require_choice(self.target, EVAL_TARGETS, "eval.target")
        require(self.num_prompts >= 1, "eval.num_prompts", "must be >= 1")
        require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        require(self.temperature >= 0, "eval.temperature", "must be >= 0")
        require(0 < self.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.num_samples >= 1, "eval.num_samples", "must be >= 1")
        require(self.concurrency >= 1, "eval.concurrency", "must be >= 1")
        require(
            self.num_samples == 1 or self.temperature > 0,
            "eval.num_samples",
            "greedy decoding (eval.temperature=0) gives the same answer every time; "
            "set eval.temperature > 0 to sample several",
        )
        require(0 < self.confidence < 1, "eval.confidence", "must be in (0, 1)")
        self.lm_eval.check()
        self.judge.check()
        self.arena.check(self.suites.get("arena", False))
        self.faithfulness.check()
        self.data.check()
        self.mmlu.check()
        self.math.check()
        if self.suites.get("humaneval"):
            self.humaneval.check(self.num_samples)
        self.ifeval.check()
