"""eval=lm_eval: the lm-evaluation-harness on the model under test (its own tasks, or one made from
the user's rows).

Deferred imports, for start-up time: openai and torch (and the lmstack modules that load them)
are imported inside the functions that need them; the CLI's input checks import this module
first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmstack.config.groups import eval as eval_group
from lmstack.config.groups.eval import LmEvalConfig
from lmstack.data.eval_rows import require_references
from lmstack.evaluation import lm_eval_bridge
from lmstack.evaluation.lm_eval_bridge import task_manager, user_task
from lmstack.evaluation.suites import Inputs, Session, Suite, register


def harness_settings(eval_cfg: Any, inputs: Inputs) -> Any:
    """eval.lm_eval, or on the user's rows with the built-in tasks left as they are, a
    generative exact-match task written from those rows (lm_eval_bridge.user_task)."""

    lm_cfg = eval_cfg.lm_eval
    if inputs.builtin or list(lm_cfg.tasks) != LmEvalConfig().tasks:
        return lm_cfg
    require_references(inputs.rows, inputs.origin, "the lm-eval task made from your rows")
    folder, name = user_task(inputs.rows, inputs.cache_dir, eval_cfg.max_new_tokens)
    return dataclasses.replace(
        lm_cfg, tasks=[name], include_paths=[str(folder), *lm_cfg.include_paths]
    )


def check_lm_eval(eval_cfg: Any, inputs: Inputs) -> None:
    lm_cfg = harness_settings(eval_cfg, inputs)
    task_manager(list(lm_cfg.tasks), list(lm_cfg.include_paths), inputs.cache_dir)


def suite_lm_eval(session: Session) -> dict[str, Any]:
    lm_cfg = harness_settings(session.eval, session.inputs)
    if lm_cfg is not session.eval.lm_eval:
        print(f"lmstack: lm-eval runs task {lm_cfg.tasks[0]}, made from your rows", flush=True)
    if session.target.kind == "served":
        from lmstack.models.loading import resolve_base_path

        tokenizer_path = (
            ""
            if lm_cfg.apply_chat_template
            else resolve_base_path(session.config.model, session.cache_dir)
        )
        results = lm_eval_bridge.evaluate_served(
            session.endpoint,
            tokenizer_path,
            lm_cfg,
            session.cache_dir,
            session.eval.seed,
            session.eval.concurrency,
        )
    else:
        results = lm_eval_bridge.evaluate_in_process(
            session.target.local, lm_cfg, session.cache_dir, session.eval.seed
        )
    samples = lm_eval_bridge.samples_table(results, limit=10_000)
    session.samples("lm_eval", samples)
    versions = {task: str(v) for task, v in (results.get("versions") or {}).items()}
    flat = lm_eval_bridge.flatten(results)
    first_task = f"lm_eval/{lm_cfg.tasks[0]}/"
    primary = [
        k for k in flat if k.startswith(first_task) and not k.endswith(("stderr", "sample_len"))
    ]
    return {
        **flat,
        "lm_eval/score": flat[primary[0]] if primary else None,
        "lm_eval/score_metric": primary[0] if primary else None,
        "lm_eval/task_versions": versions,
    }


register(
    Suite(
        "lm_eval",
        suite_lm_eval,
        "lm_eval/score",
        rank=20,
        needs=("answers",),
        check=check_lm_eval,
        schema=eval_group.LmEvalConfig,
        options_key="lm_eval",
    )
)
