"""Comparing preference methods: `-m objective=dpo,kto,orpo,simpo` on one preference file ends
in a table (and plots) with each method's held-out preference accuracy, tokens/s and peak
memory; KTO's held-out accuracy on split pairs is measured pair by pair, as DPO's; a sweep
file's `sweep.columns` picks the table's columns."""

from __future__ import annotations

import csv
import json
import random

import torch
import yaml

from lmstack.tracking.run_dir import write_json
from lmstack.tracking.summary import summarize
from lmstack.tracking.throughput import sequence_tokens

from conftest import run_cli

METHODS = ("dpo", "kto", "orpo", "simpo")
COLUMNS = ("val/reward_accuracy", "train/tokens_per_s", "train/peak_memory_mb")


def write_prefs(path, count: int = 40):
    """Built-in task pairs: a right solution (chosen) and a plausible wrong one (rejected)."""
    from lmstack.data import arith

    rng = random.Random(0)
    rows = [arith.preference_row(p, rng) for p in arith.problems(count, 0, held_out=False)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_four_methods_on_one_preference_file_end_in_one_table(tmp_path):
    """About 30 s on 2 shared cores: four 3-step runs in one process, 10 held-out pairs."""
    prefs = write_prefs(tmp_path / "prefs.jsonl")
    result = run_cli(
        "-m",
        f"objective={','.join(METHODS)}",
        "data=jsonl",
        f"data.path={prefs}",
        "data.eval_fraction=0.25",
        "data.batch_size=8",
        "trainer.max_steps=3",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.enable_progress_bar=false",
        "trainer.num_threads=1",
        "logger=none",
        output_dir=tmp_path / "out",
    )
    (sweep,) = (tmp_path / "out" / "sweeps").iterdir()
    with (sweep / "summary.csv").open() as handle:
        rows = {row["objective"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        assert row["status"] == "finished", (method, row)
        accuracy = float(row["val/reward_accuracy"])
        assert 0.0 <= accuracy <= 1.0, (method, row)
        if method in ("dpo", "kto"):  # rewards against the reference: all tie before training
            assert float(row["val/reward_accuracy_before"]) == 0.5, (method, row)
        assert float(row["train/tokens_per_s"]) > 0, (method, row)
        assert float(row["train/peak_memory_mb"]) > 50, (method, row)  # torch alone is more
        assert float(row["data/eval_examples"]) > 0, (method, row)
    # the table ranks by the accuracy: the objectives' losses do not compare
    assert rows["dpo"]["sweep_metric"] == "val/reward_accuracy"
    markdown = (sweep / "summary.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| objective |"))
    for column in COLUMNS:
        assert column in header, header
    assert all(f"| {method} | finished |" in markdown for method in METHODS)
    assert header in result.stdout  # the table ends the sweep's output
    assert (sweep / "metric_vs_objective.png").stat().st_size > 1000
    assert (sweep / "pareto_val_reward_accuracy_vs_train_peak_memory_mb.png").is_file()


def test_kto_held_out_accuracy_on_split_pairs_is_pair_by_pair():
    """Two pairs: the first ranked right, the second wrong, and an unmatched row left out.
    The in-batch AUC of the same rewards would count the cross-pair comparisons too (4/6)."""
    from lmstack.objectives.kto import paired_accuracy

    pair = torch.tensor([0, 0, 1, 1, 2])
    desirable = torch.tensor([True, False, True, False, True])
    rewards = torch.tensor([0.3, 0.1, 0.0, 0.2, -5.0])
    assert paired_accuracy(pair, desirable, rewards).item() == 0.5
    tied = paired_accuracy(pair[:2], desirable[:2], torch.zeros(2))
    assert tied.item() == 0.5  # a tie counts half
    assert paired_accuracy(pair[:1], desirable[:1], rewards[:1]).item() == 0.5  # no pair


def test_tokens_counted_are_every_sequences_real_tokens():
    padded = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "labels": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    packed = {"input_ids": torch.zeros(1, 7), "labels": torch.zeros(1, 7)}
    # a KTO batch: completions and their KL sequences, plus tensors that are not sequences
    batch = {"completions": padded, "kl": packed, "desirable": torch.ones(2)}
    assert sequence_tokens(batch) == 8 + 7
    assert sequence_tokens({"prompt_ids": torch.zeros(2, 4)}) == 0  # no targets: not counted


def test_sweep_file_columns_pick_the_tables_columns(tmp_path):
    sweep = tmp_path / "sweep-prefs"
    columns = ["train/val/reward_accuracy", "eval/eval/score", "train/train/tokens_per_s"]
    for method, accuracy in (("dpo", 0.9), ("orpo", 0.7)):
        run_dir = sweep / f"pipeline-{method}"
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"objective={method}"]))
        config = {
            "phase": {"name": "pipeline"},
            "sweep": {"metric": columns[0], "direction": "maximize", "columns": columns},
        }
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        write_json(run_dir / "status.json", {"status": "finished"})
        metrics = {columns[0]: accuracy, columns[1]: 0.5, columns[2]: 900.0, "eval/eval/n": 8}
        write_json(run_dir / "metrics.json", metrics)
    summary = summarize(sweep)
    header = next(line for line in summary.markdown.splitlines() if line.startswith("|"))
    assert header == f"| objective | status | {' | '.join(columns)} | run |"
    assert summary.best.run_dir.name == "pipeline-dpo"
