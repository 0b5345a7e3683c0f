"""What each phase is: its entry point, the config it reads and the metric it reports.

A phase's run identity hashes exactly the parts of the config it reads (less the cosmetic
keys in tracking/identity.py), so a setting that a phase never reads cannot rename its run;
its headline metric (with its direction) is what a sweeper optimizes and what a sweep's
summary ranks by. Adding a phase is one entry here and one module with `run(ctx)`.

Light on purpose (no torch): the run identity is computed while Hydra composes the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class PhaseSpec:
    module: str  # the module whose `run(ctx)` is the phase's entry point (imported lazily)
    # config groups and top-level keys the phase reads; None: all of them (a pipeline's
    # stages are composed from its whole config)
    reads: tuple[str, ...] | None
    # (metric, direction) in order of preference: the first one a run recorded is its headline
    headline: tuple[tuple[str, Direction], ...] = ()


TRAIN_READS = (
    "phase", "model", "adapter", "quantization", "objective", "data", "trainer",
    "seed", "verify", "export",
)  # fmt: skip

PHASES: dict[str, PhaseSpec] = {
    "train": PhaseSpec(
        "lmstack.phases.train",
        TRAIN_READS,
        # a preference objective's held-out reward accuracy before its val/loss: losses of
        # different objectives (dpo, kto, orpo, simpo) do not compare, their accuracies do
        (
            ("verify/score_after", "maximize"),
            ("val/reward_accuracy", "maximize"),
            ("val/loss", "minimize"),
            ("train/loss", "minimize"),
        ),
    ),
    # a pipeline's figure is its last stage's (keys carry the stage's name: dpo/val/loss)
    "pipeline": PhaseSpec(
        "lmstack.phases.pipeline",
        None,
        (("verify/score_after", "maximize"), ("val/loss", "minimize"), ("train/loss", "minimize")),
    ),
    # trace: where the store is (trace.path) and what it keeps (trace.redaction) are part of
    # what a serving run leaves; a shared store also makes bench and eval price cost/* from
    # their own counts instead of their traces (serving/costs.py), so it changes figures
    "serve": PhaseSpec("lmstack.phases.serve", ("phase", "model", "serving", "trace")),
    # cost: its figures are part of bench and eval results
    "bench": PhaseSpec(
        "lmstack.phases.bench",
        ("phase", "model", "serving", "bench", "prompt", "cost", "trace"),
        (("bench/output_throughput", "maximize"),),
    ),
    "eval": PhaseSpec(
        "lmstack.phases.eval",
        ("phase", "model", "quantization", "serving", "prompt", "eval", "cost", "trace"),
        (("eval/score", "maximize"),),
    ),
    # the report always re-reads its source (see phases/report.py)
    "report": PhaseSpec("lmstack.phases.report", ("phase", "report", "cost", "monitor")),
    # the memory plan of the train run the same config makes (no model loaded)
    "plan": PhaseSpec("lmstack.phases.plan", TRAIN_READS),
    # re-reads its sources every time, as the report does: a store gains traffic under one id
    "harvest": PhaseSpec(
        "lmstack.phases.harvest", ("phase", "harvest"), (("harvest/train_rows", "maximize"),)
    ),
    # a restarted page (same command) finds its run directory, and so its votes, again
    "label": PhaseSpec(
        "lmstack.phases.label", ("phase", "model", "quantization", "prompt", "eval", "label")
    ),
}
