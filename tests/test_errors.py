"""Bad input: a clear one-paragraph message and exit 2, before any model is loaded."""

from __future__ import annotations

import json
import resource
import time

import pytest

from conftest import assert_rejected_early, run_cli


def test_unknown_group_option(tmp_path):
    result = run_cli("adapter=lorax", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "Could not find 'adapter/lorax'", "qlora")


def test_unknown_key(tmp_path):
    result = run_cli("adapter.rank=4", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "adapter.rank")


def test_wrong_type_answers_fast(tmp_path):
    started = time.perf_counter()
    result = run_cli("adapter.r=abc", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "adapter.r", "abc")
    assert time.perf_counter() - started < 5


def test_missing_data_file(tmp_path):
    result = run_cli(
        "data=jsonl", f"data.path={tmp_path}/nope.jsonl", output_dir=tmp_path, check=False
    )
    assert_rejected_early(result, "no such file", "nope.jsonl")


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "1 + 1?", "completion": "2"})
    path.write_text(f'{good}\n{good}\n{{"prompt": "broken"\n')
    result = run_cli("data=jsonl", f"data.path={path}", output_dir=tmp_path, check=False)
    assert_rejected_early(result, f"{path}:3", "malformed JSON")


def test_row_missing_fields_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli("data=jsonl", f"data.path={path}", output_dir=tmp_path, check=False)
    assert_rejected_early(result, f"{path}:3", "missing completion")


def test_empty_dataset(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n")
    result = run_cli("data=jsonl", f"data.path={path}", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "empty")


def test_unrecognised_row_format(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    result = run_cli("data=jsonl", f"data.path={path}", output_dir=tmp_path, check=False)
    assert_rejected_early(result, "cannot tell the row format", "question")


@pytest.mark.parametrize(
    "bad", ["adapter.r=0", "adapter=none quantization=nf4", "phase=bench serving.num_threads=-2"]
)
def test_cross_field_rule_at_start_up(tmp_path, bad):
    result = run_cli(*bad.split(), output_dir=tmp_path, check=False)
    assert_rejected_early(result, "lmstack: error:")


@pytest.mark.parametrize(
    ("override", "said"),
    [
        # Hydra's own answer would be "To append to your config use +trainer.max_stepz=5"
        (
            "trainer.max_stepz=5",
            "trainer.max_stepz: unknown key, not in TrainerConfig (did you mean 'max_steps'?)",
        ),
        # the schema of the objective chosen, not the default one
        (
            "objective=dpo objective.bta=0.1",
            "objective.bta: unknown key, not in DPOObjectiveConfig (did you mean 'beta'?)",
        ),
        # a group's key without its group
        (
            "max_steps=5",
            "max_steps: unknown key, not in the config (did you mean 'trainer.max_steps'?)",
        ),
        ("objectiv=dpo", "objectiv: unknown key, not in the config (did you mean 'objective'?)"),
    ],
)
def test_a_misspelt_key_is_named_with_the_key_it_resembles(tmp_path, override, said):
    result = run_cli(*override.split(), output_dir=tmp_path, check=False)
    assert_rejected_early(result, f"lmstack: error: {said}")
    assert "+" not in result.stdout + result.stderr  # no advice to add the key


def test_added_unknown_key_is_refused_before_anything_runs(tmp_path):
    """`+model.nosuchfield=1`: Hydra adds the key; lmstack names it and exits 2 at once. The
    time is CPU time (user + system) of the command: on a shared machine, wall time measures
    the neighbours. Bound: 3 s. Measured 2.4 s on a 2-core AMD EPYC (no AVX-512), under 2 s on
    an Intel Xeon: Hydra's import and composition are nearly all of it; a training step or a
    model load would take far more."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_cli("+model.nosuchfield=1", output_dir=tmp_path, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert_rejected_early(result, "model.nosuchfield: unknown key")
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 3
