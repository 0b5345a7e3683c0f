"""phase=train: build model -> data -> objective -> Lightning Trainer -> fit -> verify -> save.

Reads top to bottom; every step is a plain function call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lmstack.data.sources import Rows
from lmstack.distributed import (
    adopt_launcher,
    build_strategy,
    gathered_weights,
    is_rank_zero,
    join_ranks,
    lost_a_rank,
    stop_after_lost_rank,
)
from lmstack.evaluation.verifier import verifier_score
from lmstack.models.cpu_dtype import probe_note, training_precision
from lmstack.models.gguf import require_llamacpp
from lmstack.objectives import load_objective
from lmstack.phases.context import RunContext
from lmstack.phases.plan import preflight
from lmstack.serving.rollouts import check_rollout_engine, vllm_rollouts
from lmstack.slurm import trainer_callbacks, trainer_plugins
from lmstack.tracking.loggers import close_tracker, open_tracker, record, run_of
from lmstack.tracking.progress import progress_bar
from lmstack.tracking.run_dir import previous_results, set_status, write_json
from lmstack.tracking.throughput import ThroughputMeter

log = logging.getLogger(__name__)


def run(ctx: RunContext) -> dict[str, Any]:
    config, run_dir = ctx.config, ctx.run_dir
    done = previous_results(run_dir, config.run.rerun, "run", print_summary)
    if done is not None:
        return done

    # data, the machine and the memory plan first (launch.py runs this before the heavy
    # imports): bad input fails here, before any model is loaded
    rows = ctx.rows if ctx.rows is not None else preflight(ctx)
    record_lineage(config, run_dir)
    if getattr(config.objective, "rollout_engine", "in_process") == "vllm":
        check_rollout_engine(config)
    if config.export.gguf:
        require_llamacpp(config.paths.engines_dir, "export.gguf")

    if config.trainer.num_threads > 0:
        torch.set_num_threads(config.trainer.num_threads)
    L.seed_everything(config.seed, verbose=False)

    objective = load_objective(config.objective.name)
    loaded = objective.load_model(config, ctx.cache_dir)
    if is_rank_zero():
        print(
            f"lmstack: {loaded.trainable_params:,} trainable of {loaded.total_params:,} "
            f"parameters ({100 * loaded.trainable_params / loaded.total_params:.2f}%)",
            flush=True,
        )
    setup = objective.setup(config, loaded, rows)
    metrics: dict[str, Any] = {
        "run_id": ctx.run_id,
        "params/trainable": loaded.trainable_params,
        "params/total": loaded.total_params,
        "data/train_examples": setup.train_examples,
        "data/eval_examples": setup.eval_examples,
        **setup.metrics,
    }
    metrics |= verify(loaded, rows, config, "before")

    trainer, logger = build_trainer(ctx, setup.module.automatic_optimization)
    started = time.perf_counter()
    try:
        metrics |= validate(trainer, setup, suffix="_before")
        with rollout_engine(ctx, loaded, setup.module):
            trainer.fit(setup.module, setup.train_loader, ckpt_path=last_checkpoint(ctx))
        metrics |= rollout_speed(setup.module)
        metrics |= fit_throughput(trainer)
        metrics["train/seconds"] = round(time.perf_counter() - started, 2)
        metrics |= {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")
        }
        metrics |= validate(trainer, setup)
        loaded.gathered_weights = gathered_weights(trainer)  # FSDP/DeepSpeed: all ranks gather
        if not is_rank_zero():
            # the other ranks only train: rank zero verifies and writes the run's records
            return metrics
        metrics |= verify(loaded, rows, config, "after")
        objective.save(setup, loaded, config, run_dir)
        record(logger, None, metrics)
    except BaseException as error:
        close_tracker(logger, failed=True)
        if isinstance(error, Exception) and lost_a_rank(error, trainer):
            stop_after_lost_rank(trainer, run_dir, error)
        raise
    close_tracker(logger)

    join_ranks(trainer)
    write_json(run_dir / "metrics.json", metrics)
    set_status(run_dir, "finished")
    print_summary(metrics)
    return metrics


def validate(trainer: Any, setup: Any, suffix: str = "") -> dict[str, float]:
    """Held-out metrics of the objective (val/...), e.g. before and after training."""
    if setup.eval_loader is None:
        return {}
    validated = trainer.validate(setup.module, setup.eval_loader, verbose=False)[0]
    return {f"{key}{suffix}": float(value) for key, value in validated.items()}


def build_trainer(ctx: RunContext, automatic_optimization: bool = True):
    """With manual optimization (ppo) the module clips gradients itself; Lightning
    refuses a gradient_clip_val then."""

    trainer_cfg = ctx.config.trainer
    logger = False
    if is_rank_zero():  # one tracker run, written by rank zero
        logger = open_tracker(ctx.config.logger, run_of(ctx))
        record(logger, ctx.resolved, {})
    checkpoint = ModelCheckpoint(
        dirpath=str(ctx.run_dir / "checkpoints"),
        every_n_train_steps=trainer_cfg.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=1,
    )
    clip_val = trainer_cfg.gradient_clip_val or None
    precision = training_precision(trainer_cfg.precision, trainer_cfg.accelerator, ctx.cache_dir)
    if trainer_cfg.precision == "auto" and is_rank_zero():
        note = probe_note(ctx.cache_dir)
        print(f"lmstack: training precision {precision} (trainer.precision=auto{note})", flush=True)
    bar = [progress_bar()] if trainer_cfg.enable_progress_bar else []
    trainer = L.Trainer(
        max_steps=trainer_cfg.max_steps,
        max_epochs=trainer_cfg.max_epochs,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(trainer_cfg),
        # lmstack's batch sampler gives each rank its share of the global batch itself
        use_distributed_sampler=False,
        precision=precision,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        gradient_clip_val=clip_val if automatic_optimization else None,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=logger,
        # under Slurm: save last.ckpt and requeue on the requeue signal (lmstack/slurm.py)
        callbacks=[checkpoint, *bar, *trainer_callbacks(ctx.run_dir), ThroughputMeter()],
        plugins=trainer_plugins(),
        default_root_dir=str(ctx.run_dir),
    )
    adopt_launcher(trainer, ctx.run_dir)
    return trainer, logger


def last_checkpoint(ctx: RunContext) -> str | None:
    path = ctx.run_dir / "checkpoints" / "last.ckpt"
    if ctx.config.run.resume and path.exists() and not ctx.config.run.rerun:
        print(f"lmstack: resuming from {path}", flush=True)
        return str(path)
    return None


def verify(loaded: Any, rows: Rows, config: Any, when: str) -> dict[str, Any]:
    """Held-out verifier score of the built-in task (the demo's before/after figure)."""
    # a reward model has a score head, not a language-model head: nothing to generate
    if not (config.verify.enabled and rows.problems and loaded.model.can_generate()):
        return {}
    if not is_rank_zero():  # the ranks hold the same weights: one verifies
        return {}

    problems = rows.problems[: config.verify.num_prompts]
    result = verifier_score(
        loaded.model,
        loaded.tokenizer,
        problems,
        config.verify.max_new_tokens,
        config.verify.batch_size,
    )
    print(
        f"lmstack: held-out verifier score {when} training: {result['score']:.3f} "
        f"({result['n']} problems)",
        flush=True,
    )
    for example in result["examples"][:1]:
        print(f"  e.g. {example['prompt']!r} -> {example['answer']!r}", flush=True)
    return {f"verify/score_{when}": result["score"], f"verify/examples_{when}": result["examples"]}


@contextlib.contextmanager
def rollout_engine(ctx: RunContext, loaded: Any, module: Any) -> Iterator[None]:
    """objective.rollout_engine=vllm: a vLLM engine samples the rollouts for the whole fit
    (GRPO and PPO); it is stopped with the fit, however the fit ends."""
    if getattr(ctx.config.objective, "rollout_engine", "in_process") != "vllm":
        yield
        return

    with vllm_rollouts(ctx.config, loaded, ctx.cache_dir, ctx.run_dir) as engine:
        module.rollout_engine = engine
        try:
            yield
        finally:
            module.rollout_engine = None


def rollout_speed(module: Any) -> dict[str, float]:
    """Generated rollout tokens per second of sampling (GRPO, PPO), in process or on vLLM."""
    seconds = getattr(module, "rollout_seconds", 0.0)
    if not seconds:
        return {}
    return {
        "train/rollout_tokens": float(module.rollout_tokens),
        "train/rollout_tokens_per_s": round(module.rollout_tokens / seconds, 2),
    }


def fit_throughput(trainer: Any) -> dict[str, float]:
    """Training tokens/s and peak memory of the fit (tracking/throughput.py); rollout
    objectives report their generation speed instead (rollout_speed)."""
    meter = next(c for c in trainer.callbacks if isinstance(c, ThroughputMeter))
    figures = meter.metrics()
    if getattr(trainer.lightning_module, "rollout_seconds", 0.0):
        figures.pop("train/tokens_per_s", None)
    return figures


def print_summary(metrics: dict[str, Any]) -> None:
    keys = [
        k
        for k in (
            "verify/score_before",
            "verify/score_after",
            "val/loss",
            "train/loss",
            "train/seconds",
        )
        if k in metrics
    ]
    width = max((len(k) for k in keys), default=0)
    for key in keys:
        value = metrics[key]
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key}  {value}")


def record_lineage(config: Any, run_dir: Path) -> None:
    """A run trained on harvested rows (phase=harvest) records where they came from: the
    harvest run, its filters, and the trace stores and served runs under it (lineage.json)."""
    data = config.data
    if data.source != "jsonl" or not data.path:
        return
    card_path = Path(data.path).parent / "data_card.json"
    if not card_path.is_file():
        return
    card = json.loads(card_path.read_text())
    lineage = {
        "harvest_run": str(card_path.parent.resolve()),
        "objective": config.objective.name,
        "max_steps": config.trainer.max_steps,
        "train_rows": str(Path(data.path).resolve()),
        "heldout_rows": str(Path(data.eval_path).resolve()) if data.eval_path else None,
        "filters": card.get("filters"),
        "split": card.get("split"),
        "sources": card.get("lineage"),
    }
    write_json(run_dir / "lineage.json", lineage)
