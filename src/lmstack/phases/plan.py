"""phase=plan: per-device memory of the train run this config makes, with no model loaded.

Prints every term (weights, adapter, gradients, optimizer states, activations, logits, the
reference or reward model, rollout KV cache) and whether it fits the device, and writes
memory_plan.json. A train run makes the same plan first and refuses one that will not fit.
"""

from __future__ import annotations

from typing import Any

from lmstack.data.sources import load_rows
from lmstack.distributed import check_machine, is_rank_zero
from lmstack.errors import ConfigError
from lmstack.models.memory import GB, memory_plan
from lmstack.phases.context import RunContext
from lmstack.tracking.run_dir import finished_metrics, set_status, write_json


def preflight(ctx: RunContext) -> Any:
    """What a train run checks before torch and Lightning are imported: its data, the
    devices it asks for, and the memory plan (refused when it will not fit). Returns the
    rows, or None for a finished run that is not to be trained again."""

    config = ctx.config
    if not config.run.rerun and finished_metrics(ctx.run_dir):
        return None
    rows = load_rows(config.data, config.objective.name)
    check_machine(config.trainer)
    plan = memory_plan(config, rows, ctx.cache_dir)
    if plan is None:
        return rows  # a hub id: its shape is known only once downloaded
    # the plan decided the null (automatic) choice; the model loads with the same one
    config.trainer.gradient_checkpointing = plan.checkpointing
    if is_rank_zero():
        write_json(ctx.run_dir / "memory_plan.json", plan.as_dict())
        print(
            f"lmstack: memory plan {plan.total / GB:.3f} GB per device "
            f"(biggest: {plan.biggest}; device {(plan.device_bytes or 0) / GB:.2f} GB)",
            flush=True,
        )
        print(plan.checkpointing_line(), flush=True)
    if not plan.fits and config.trainer.memory_check:
        raise ConfigError(plan.refusal())
    return rows


def run(ctx: RunContext) -> dict[str, Any]:
    config = ctx.config
    rows = load_rows(config.data, config.objective.name)
    plan = memory_plan(config, rows, ctx.cache_dir)
    if plan is None:
        raise ConfigError(
            f"model: the shape of '{config.model.name_or_path or config.model.init_from}' cannot "
            "be read without loading it (a hub id or a run without a merged model); point "
            "model.name_or_path at a local folder with its config.json"
        )
    print(plan.table(), flush=True)
    print(plan.checkpointing_line(), flush=True)
    verdict = "fits" if plan.fits else "does NOT fit"
    print(f"lmstack: {verdict}: {plan.total / GB:.3f} GB per device", flush=True)
    write_json(ctx.run_dir / "memory_plan.json", plan.as_dict())
    metrics = {
        "plan/total_gb": plan.total / GB,
        "plan/fits": plan.fits,
        "plan/biggest": plan.biggest,
        **{f"plan/{name.replace(' ', '_')}_gb": size / GB for name, size in plan.terms.items()},
    }
    write_json(ctx.run_dir / "metrics.json", metrics)
    set_status(ctx.run_dir, "finished")
    return metrics
