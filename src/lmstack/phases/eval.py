"""phase=eval: check inputs -> model under test (in process or served) -> suites -> records.

The suites (`eval=[verifier,lm_eval,judge,...]`, registered in lmstack.evaluation.suites) run
on one model under test: the `model` group's model in this process (a run's adapter on its
base, any quantization) or, with eval.target=served, that model behind the `serving` group's
engine, exactly as users get it. They ask the user's rows (`eval.data`) or the built-in task's.
A judge without its own URL is the served model. Bad input (a malformed eval file, an unknown
scorer or harness task, a bad regex, arena models that are not runs) fails before any model is
loaded; an unreachable judge fails the run without writing partial results as finished, and a
headline figure that cannot be computed fails it after its figures are written.

Deferred imports, for start-up time: openai and torch (and the lmstack modules that load
them) are imported inside the functions that need them; the CLI's input checks import this
module first.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import lmstack.evaluation.builtin_suites  # noqa: F401 (registers the built-in suites)
from lmstack.data import arith
from lmstack.errors import DataError, LmstackError
from lmstack.evaluation.suites import (
    Inputs,
    Records,
    Session,
    Suite,
    load_plugins,
    options,
    read_inputs,
    selected,
)
from lmstack.evaluation.suites import headline as suite_headline
from lmstack.phases.context import RunContext
from lmstack.prompts import prompt_version
from lmstack.serving.costs import cost_metrics
from lmstack.serving.traces import TRACE_DB_NAME
from lmstack.tracking.loggers import log_results
from lmstack.tracking.run_dir import finished_metrics, previous_results, set_status, write_json
from lmstack.util.tables import markdown_table

log = logging.getLogger(__name__)


class NoScoreError(LmstackError):
    """The evaluation ran but its headline figure could not be computed."""

    exit_code = 1


def run(ctx: RunContext) -> dict[str, Any]:
    config, run_dir = ctx.config, ctx.run_dir
    done = previous_results(run_dir, config.run.rerun, "evaluation", print_summary)
    if done is not None:
        return done

    eval_cfg = config.eval
    suites, inputs = check_inputs(ctx)  # bad input fails here, before any model is loaded

    if config.trainer.num_threads > 0:
        import torch

        torch.set_num_threads(config.trainer.num_threads)

    metrics: dict[str, Any] = {
        "run_id": ctx.run_id,
        "eval/suites": [suite.name for suite in suites],
        "eval/target": eval_cfg.target,
        "eval/model": config.model.init_from or config.model.name_or_path or "base",
        "eval/data": inputs.origin,
        "eval/rows": len(inputs.rows),
        "prompt/name": inputs.prompt.name,
        "prompt/version": prompt_version(inputs.prompt),
    }
    records = Records(run_dir)
    with model_under_test(ctx, suites, inputs) as (target, endpoint):
        if target is not None:
            metrics["eval/described"] = target.described
        session = Session(config, inputs, target, endpoint, records, ctx.cache_dir)
        for index, suite in enumerate(suites):
            print(f"lmstack: eval suite {suite.name}", flush=True)
            try:
                metrics |= suite.run(session)
            except BaseException:
                if index:  # the suites that finished keep their results (the run: failed)
                    metrics["eval/failed_suite"] = suite.name
                    write_json(run_dir / "metrics.json", metrics)
                raise
    missing = sorted(k for k, v in metrics.items() if v is None and k.partition("/")[2])
    if missing:
        print(f"lmstack: warning: no value for {', '.join(missing)}", flush=True)
    key, score, higher = headline(suites, metrics)
    metrics |= {"eval/score": score, "eval/score_metric": key, "eval/higher_is_better": higher}
    metrics |= served_costs(config, run_dir / "serving")  # after the engine stopped: traces written

    log_results(ctx, metrics, tables=records.tables, images=records.images)
    write_json(run_dir / "metrics.json", metrics)
    print_summary(metrics)
    if key is not None and score is None:
        raise NoScoreError(
            f"eval/score: the headline metric {key} could not be computed (it is None; see "
            f"the warnings above and the samples in {run_dir}); the other figures are in "
            f"{run_dir / 'metrics.json'}"
        )
    set_status(run_dir, "finished")
    write_comparison(run_dir.parent)
    return metrics


# ---------------------------------------------------------------- inputs and the model


def check_inputs(ctx: RunContext) -> tuple[list[Suite], Inputs]:
    """Everything that can be checked without a model: fails in about a second."""

    eval_cfg = ctx.config.eval
    load_plugins(list(eval_cfg.plugins))
    suites = selected(dict(eval_cfg.suites))
    inputs = read_inputs(ctx.config, ctx.cache_dir)

    for suite in suites:
        options(eval_cfg, suite)  # a plugin's options, against its schema
        if suite.check is not None:
            suite.check(eval_cfg, inputs)
    return suites, inputs


def needs(suites: list[Suite], eval_cfg: Any, what: str) -> bool:
    return any(what in suite.needs_of(eval_cfg) for suite in suites)


@contextlib.contextmanager
def model_under_test(ctx: RunContext, suites: list[Suite], inputs: Inputs):
    """(target, endpoint): the target answers questions; the endpoint is the served model
    (for eval.target=served, or as the judge when eval.judge.base_url is empty)."""
    from lmstack.evaluation.target import InProcessTarget, Sampling, ServedTarget, load_local_model

    config, eval_cfg = ctx.config, ctx.config.eval
    sampling = Sampling(
        eval_cfg.max_new_tokens,
        eval_cfg.temperature,
        eval_cfg.top_p,
        eval_cfg.seed,
        eval_cfg.batch_size,
    )
    wants_answers = needs(suites, eval_cfg, "answers")
    served = eval_cfg.target == "served" and wants_answers
    serve_judge = needs(suites, eval_cfg, "judge") and not eval_cfg.judge.base_url
    with contextlib.ExitStack() as stack:
        endpoint = None
        if served or serve_judge:
            from lmstack.serving.engines import serve

            print("lmstack: starting the served model", flush=True)
            endpoint = stack.enter_context(serve(config, ctx.cache_dir, ctx.run_dir / "serving"))
        target = None
        if served:
            target = ServedTarget(
                endpoint.base_url,
                endpoint.model,
                inputs.prompt,
                eval_cfg.chat,
                sampling,
                api_key=endpoint.api_key,
                described=dict(endpoint.served),
                concurrency=eval_cfg.concurrency,
            )
        elif wants_answers:
            local = load_local_model(config.model, config.quantization, ctx.cache_dir)
            target = InProcessTarget(local, inputs.prompt, eval_cfg.chat, sampling)
        yield target, endpoint


def arena_problems(arena_cfg: Any) -> list[Any]:
    """The built-in task's arena prompts (phase=label pairs the same answers for people)."""

    return arith.problems(arena_cfg.num_prompts, 1, held_out=True)


def served_costs(config: Any, serving_dir: Path) -> dict[str, float]:
    """What the served model's answers cost (cost/*), priced from its gateway's traces; {} when
    nothing was served or traced."""

    db = serving_dir / TRACE_DB_NAME
    if not db.is_file():
        return {}
    try:
        return cost_metrics(db, config.cost)
    except DataError as error:
        print(f"lmstack: warning: no cost figures ({error})", flush=True)
        return {}


# ---------------------------------------------------------------- summaries


def headline(suites: list[Suite], metrics: dict[str, Any]) -> tuple[str | None, Any, bool]:
    """The one figure a sweeper optimizes: the best-ranked suite's headline metric."""

    return suite_headline(suites, metrics)


def scalar_items(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and "stderr" not in k
    }


def write_comparison(folder: Path) -> Path | None:
    """eval_comparison.md in the folder holding evaluation runs (a sweep's, or outputs/runs):
    one row per finished evaluation, one column per figure."""
    rows = []
    for status in sorted(folder.glob("*/status.json")):
        metrics = finished_metrics(status.parent)
        if metrics and "eval/suites" in metrics:
            rows.append((status.parent.name, metrics))
    if not rows:
        return None
    path = folder / "eval_comparison.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(comparison_markdown(rows))
    tmp.replace(path)
    return path


def comparison_markdown(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per evaluation (name, its metrics), one column per figure any of them has."""
    columns = sorted({k for _, m in rows for k in scalar_items(m)} - {"eval/score"})
    header = ["run", "model", "prompt", "target", "eval/score", *columns]
    table = markdown_table(
        header,
        (
            [name, m.get("eval/model"), m.get("prompt/name"), m.get("eval/target")]
            + [_cell(m.get(c)) for c in ("eval/score", *columns)]
            for name, m in rows
        ),
    )
    return table + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def print_summary(metrics: dict[str, Any]) -> None:
    scalars = scalar_items(metrics)
    width = max((len(k) for k in scalars), default=0)
    for key, value in scalars.items():
        print(f"  {key:<{width}}  {_cell(value)}")
