"""The `data` group's schema (conf/data/): where rows come from, their format, batching."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from lmstack.config.groups.eval_math import (
    DEFAULT_MATH_GENERATORS,
    MathGenerator,
    check_math_generators,
)
from lmstack.config.rules import Choice, require, require_choice


class DataSource(Choice):
    builtin = "builtin"
    jsonl = "jsonl"
    parquet = "parquet"
    hub = "hub"


DATA_SOURCES = tuple(DataSource)


DATA_FORMATS = (
    "auto",
    "text",
    "prompt_completion",
    "messages",
    "preference",
    "unpaired_preference",
    "prompt",
)


@dataclass
class DataConfig:
    source: DataSource = DataSource.builtin
    # jsonl/parquet: a local file; hub: a dataset name (or a local dataset folder)
    path: str | None = None
    subset: str | None = None
    split: str = "train"
    eval_split: str | None = None
    # jsonl/parquet: the held-out rows' own file (phase=harvest's <kind>.heldout.jsonl) instead
    # of a seeded eval_fraction of data.path
    eval_path: str | None = None
    format: str = "auto"
    # built-in task: seeded arithmetic word problems with a verifier
    task: str = "arith"
    # data.task=math: the reasoning-gym generators the training prompts come from, each with a
    # weight and its options (as eval.math.generators); only their training templates are used
    math_generators: list[MathGenerator] = field(
        default_factory=lambda: [MathGenerator(**copy.deepcopy(g)) for g in DEFAULT_MATH_GENERATORS]
    )
    train_size: int = 2000
    eval_size: int = 200
    seed: int = 0
    # share of a local/hub dataset held out for evaluation when no eval_split is given
    eval_fraction: float = 0.05
    max_length: int = 256
    # a chat template for a tokenizer that has none (or to replace its own): a .jinja
    # file or the template text; saved with the run's tokenizer, so serving uses it too
    chat_template: str | None = None
    # a row over max_length: truncate (cut its end) or drop it; counted in metrics.json
    truncation: str = "truncate"
    batch_size: int = 16
    # padding-free packing: a batch's sequences share one row, attention stays per sequence
    packing: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        require_choice(self.format, DATA_FORMATS, "data.format")
        require_choice(self.truncation, ("truncate", "drop"), "data.truncation")
        if self.source != "builtin":
            require(bool(self.path), "data.path", f"data.source={self.source} needs data.path")
        if self.eval_path:
            require(
                self.source in ("jsonl", "parquet"),
                "data.eval_path",
                f"a held-out file for data.source=jsonl or parquet, not {self.source}",
            )
        if self.task == "math":
            check_math_generators(list(self.math_generators), "data.math_generators")
        require(self.batch_size > 0, "data.batch_size", "must be positive")
        require(self.max_length > 8, "data.max_length", "must be > 8")
        require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
