"""The eval-suite interface, its registry, and the session the suites share.

A suite is one `Suite` record: its name, the options it reads (a schema dataclass), what it
needs (answers from the model under test, a judge), an input check that runs before any
model loads, `run(session) -> metrics` (it saves its per-row samples through the session),
and its headline metric with the direction that is better. Adding one is one module that
calls `register(Suite(...))`, one schema, and one YAML file (`suites: {name: true}`); a
suite outside lmstack is imported through `eval.plugins=[pkg.module]` and reads its options
from `eval.options.<name>`.

Deferred imports, for start-up time: openai (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmstack.config.groups.eval import declare_suite
from lmstack.data import arith
from lmstack.data.eval_rows import EvalRow, few_shot_turns, load_eval_rows
from lmstack.data.scoring import build_scorer
from lmstack.errors import ConfigError

NEEDS = ("answers", "judge")
# how much of a sample's prompt and completion the console shows (characters)
SHOWN_PROMPT_CHARS = 80
SHOWN_COMPLETION_CHARS = 240


@dataclass(frozen=True)
class Suite:
    name: str
    # session -> metrics, keys prefixed "<name>/"; per-row samples via session.samples()
    run: Callable[[Any], dict[str, Any]]
    # the metric eval/score takes from this suite (None: the suite has no single figure)
    headline: str | None = None
    higher_is_better: bool = True
    # lower ranks win eval/score when several suites with a headline run
    rank: int = 100
    # "answers": the model under test answers the prompts; "judge": an LLM judge (or a
    # function of the eval config giving them, for needs that depend on options)
    needs: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    # the options dataclass, and where they live: a field of EvalConfig (built-in suites:
    # "format" for eval.format) or, by default, eval.options.NAME (plugins)
    schema: type | None = None
    options_key: str = ""
    # (eval config, inputs) -> None, raising ConfigError/DataError; runs before any model loads
    check: Callable[[Any, Any], None] | None = None

    def needs_of(self, eval_cfg: Any) -> tuple[str, ...]:
        needs = self.needs(eval_cfg) if callable(self.needs) else self.needs
        unknown = set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"suite {self.name}: unknown needs {sorted(unknown)}")
        return tuple(needs)


REGISTRY: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    REGISTRY[suite.name] = suite
    declare_suite(suite.name)  # eval.suites.NAME then composes
    return suite


def load_plugins(modules: list[str]) -> None:
    """Imports each `eval.plugins` module; importing registers its suites (the built-in ones
    register when lmstack.evaluation.builtin_suites is imported)."""
    for index, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"eval.plugins[{index}]: cannot import '{name}' ({error})") from None


def selected(suites: dict[str, bool]) -> list[Suite]:
    """The suites switched on, in registry order; an unknown name is a ConfigError."""
    for name in suites:
        if name not in REGISTRY:
            raise ConfigError(
                f"eval.suites.{name}: unknown suite (available: {', '.join(REGISTRY)}; "
                "a suite of your own loads from its package's lmstack.plugins entry point, "
                "LMSTACK_PLUGINS or eval.plugins=[pkg.module])"
            )
    return [suite for name, suite in REGISTRY.items() if suites.get(name)]


def options(eval_cfg: Any, suite: Suite) -> Any:
    """A suite's options: its EvalConfig field, or eval.options.<name> checked against its
    schema (plugins)."""
    if suite.options_key:
        return getattr(eval_cfg, suite.options_key)
    if suite.schema is None:
        return None

    given = (eval_cfg.options or {}).get(suite.name) or {}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(suite.schema), given)
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as error:
        raise ConfigError(f"eval.options.{suite.name}: {error}") from None


def headline(suites: list[Suite], metrics: dict[str, Any]) -> tuple[str | None, Any, bool]:
    """(key, value, higher is better) of the best-ranked suite that has a headline metric."""
    ranked = sorted((s for s in suites if s.headline), key=lambda s: s.rank)
    if not ranked:
        return None, None, True
    suite = ranked[0]
    value = metrics.get(suite.headline)
    number = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    return suite.headline, float(value) if number else None, suite.higher_is_better


@dataclass
class Inputs:
    """Everything read and checked before a model loads: rows, prompt, scorer."""

    rows: list[EvalRow]
    origin: str  # the file (and split) or "builtin:arith"
    builtin: bool
    prompt: Any  # the prompt group's config, with few-shot turns from eval.data.shots
    scorer: Callable[[str, Any, dict[str, Any]], float]
    scorer_name: str
    cache_dir: str = ""


def builtin_rows(count: int, seed: int = 0) -> list[EvalRow]:
    """Held-out problems of the built-in task as eval rows (reference: the number)."""

    return [
        EvalRow(p.question, p.answer, metadata={"solution": p.solution()}, line=index + 1)
        for index, p in enumerate(arith.problems(count, seed, held_out=True))
    ]


def read_inputs(config: Any, cache_dir: str) -> Inputs:
    """The rows every suite asks (eval.data, or the built-in task), the prompt group's
    config with eval.data.shots few-shot turns, and the scorer of answers."""

    eval_cfg, prompt = config.eval, config.prompt
    data = eval_cfg.data
    if data.path:
        rows, origin = load_eval_rows(data)
    else:
        rows, origin = builtin_rows(eval_cfg.num_prompts), "builtin:arith"
    if data.shots:
        shot_rows, shot_origin = load_eval_rows(
            dataclasses.replace(data, path=data.shots_path, limit=None), "eval.data.shots_path"
        )
        turns = few_shot_turns(shot_rows, data.shots, shot_origin)
        prompt = dataclasses.replace(
            prompt, name=f"{prompt.name}+{data.shots}shot", few_shot=[*prompt.few_shot, *turns]
        )
    name = eval_cfg.scorer.name
    if name == "auto":
        name = "arith_verifier" if not data.path else "normalized"
    if name == "arith_verifier":
        scorer = arith_scorer
    else:
        scorer = build_scorer(
            name, "eval.scorer.name", eval_cfg.scorer.tolerance, list(eval_cfg.scorer.fields)
        )
    return Inputs(rows, origin, not data.path, prompt, scorer, name, cache_dir)


def arith_scorer(completion: str, reference: Any, row: dict[str, Any] | None = None) -> float:
    return float(arith.verify(completion, reference))


class Records:
    """Files beside metrics.json, and the tables and images that go to W&B."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.images: dict[str, Path] = {}

    def jsonl(self, name: str, rows: list[dict[str, Any]]) -> Path:
        path = self.run_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
        return path


@dataclass
class Session:
    """What the suites share: the config, the inputs, the model under test, the judge."""

    config: Any
    inputs: Inputs
    target: Any
    endpoint: Any
    records: Records
    cache_dir: str
    _answers: list[list[str]] | None = field(default=None, repr=False)
    _judge: Any = field(default=None, repr=False)

    @property
    def eval(self) -> Any:
        return self.config.eval

    def rows(self) -> list[EvalRow]:
        return self.inputs.rows

    def answers(self) -> list[list[str]]:
        """num_samples answers per row, asked once (shared by verifier, format, judge)."""
        if self._answers is None:
            fields = [row.fields() for row in self.rows()]
            self._answers = self.target.answers(fields, self.eval.num_samples)
        return self._answers

    def options(self, suite: str) -> Any:
        """A plugin suite's options (eval.options.<suite>), checked against its schema."""
        return options(self.eval, REGISTRY[suite])

    def judge(self) -> Any:
        if self._judge is None:
            from lmstack.judging import connect

            self._judge = connect(self.eval.judge, self.endpoint)
        return self._judge

    def samples(self, suite: str, records: list[dict[str, Any]], show: int = 3) -> None:
        """Per-row samples: <suite>_samples.jsonl, a W&B table, a few on the console."""
        self.records.jsonl(f"{suite}_samples", records)
        self.records.tables[f"eval/{suite}_samples"] = [flat_sample(r) for r in records[:50]]
        for record in records[:show]:
            print(f"  {suite} sample: {console_line(record)}", flush=True)

    def warn(self, message: str) -> None:
        print(f"lmstack: warning: {message}", flush=True)


def console_line(record: dict[str, Any]) -> str:
    """A sample on one line: its score, the prompt shortened in the middle (a long prompt's end
    is where the question is), the completion, and the reference when there is one."""
    parts = [f"score {record.get('score', '-')}"]
    if "prompt" in record:
        parts.append(f"prompt {quoted(record['prompt'], SHOWN_PROMPT_CHARS)}")
    parts.append(f"completion {quoted(record.get('completion', ''), SHOWN_COMPLETION_CHARS)}")
    if record.get("reference") not in (None, ""):
        parts.append(f"reference {quoted(record['reference'], SHOWN_PROMPT_CHARS)}")
    return " | ".join(parts)


def quoted(value: Any, limit: int) -> str:
    """`value` as one JSON-quoted line (newlines escaped), cut in the middle to `limit` chars."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > limit:
        head = (limit - 3) // 2
        text = f"{text[:head]}...{text[len(text) - (limit - 3 - head) :]}"
    return json.dumps(text)


def flat_sample(record: dict[str, Any]) -> dict[str, Any]:
    """A sample row with text cells (W&B tables want one type per column)."""
    return {
        key: value
        if isinstance(value, str | int | float | bool) or value is None
        else json.dumps(value, default=str)
        for key, value in record.items()
    }
