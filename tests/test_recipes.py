"""Recipe files and lock files: a lock reproduces its run; a recipe path always means that file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from lmstack.config.recipes import rewrite_recipe_argument

from conftest import REPO, run_cli, run_dirs

TINY = [
    "trainer.max_steps=4",
    "trainer.checkpoint_every_n_steps=4",
    "trainer.enable_progress_bar=false",
    "data.train_size=48",
    "data.eval_size=16",
    "data.batch_size=8",
    "verify.num_prompts=8",
    "verify.max_new_tokens=12",
    "trainer.num_threads=1",
    "logger=none",
]
REPRODUCED = ("train/loss", "val/loss", "val/loss_before", "verify/score_after", "params/trainable")


def test_lock_file_reproduces_the_run_in_a_fresh_output_dir(tmp_path):
    """Train with non-default settings, then `run.py recipe=<lock>` elsewhere: same run identity,
    same metrics (CPU, fixed seeds: equal to float tolerance)."""
    run_cli(*TINY, "objective.lr=1e-3", "adapter.r=4", "seed=7", output_dir=tmp_path / "first")
    (first,) = run_dirs(tmp_path / "first")
    lock_path = first / "recipe.lock.yaml"
    text = lock_path.read_text()
    assert text.startswith("# @package _global_\n# Lock file of run ")
    assert f"python run.py recipe={lock_path}" in text
    lock = yaml.safe_load(text)
    assert {"override /objective": "sft"} in lock["defaults"]
    assert lock["lock"]["packages"]["torch"] and lock["lock"]["packages"]["lmstack"]
    assert lock["lock"]["data_fingerprint"] == "builtin:arith:v1"
    assert "code_version" in lock["lock"] and lock["lock"]["run_id"] == first.name
    assert "paths" not in lock  # machine-specific: the reproducing machine's own

    # the fresh run gets only the lock (and where to write): every setting comes from the file
    run_cli(f"recipe={lock_path}", output_dir=tmp_path / "again")
    (again,) = run_dirs(tmp_path / "again")
    assert again.name == first.name
    want = json.loads((first / "metrics.json").read_text())
    got = json.loads((again / "metrics.json").read_text())
    for key in REPRODUCED:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert yaml.safe_load((again / "config.yaml").read_text())["adapter"]["r"] == 4


def test_recipe_path_wins_over_a_repo_recipe_of_the_same_name(tmp_path):
    recipe = tmp_path / "arith_sft_dpo.yaml"
    recipe.write_text(
        "# @package _global_\n# A team's own recipe that shares a repo recipe's name.\n"
        f"#   python run.py recipe={recipe}\ntrainer:\n  max_steps: 7\n"
    )
    temp, cache = tmp_path / "temp", tmp_path / "cache"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "run.py"), f"recipe={recipe}", "--cfg", "job"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(temp), "LMSTACK_CACHE_DIR": str(cache)},
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["trainer"]["max_steps"] == 7
    assert config["phase"]["name"] == "train"  # not the repo recipe's pipeline
    # the recipe's search-path folder is in lmstack's cache; nothing is left in the temp dir
    assert list(temp.iterdir()) == []
    assert list(cache.glob("recipe-links/*/recipe/arith_sft_dpo-*.yaml"))


def test_recipe_file_arguments_rewrite_the_same_way_every_time(tmp_path):
    """The sweep id hashes the command line: a re-run sweep with a recipe file must find its dir."""
    recipe = tmp_path / "team.yaml"
    recipe.write_text("# @package _global_\nseed: 3\n")
    argv = ["run.py", "-m", f"recipe={recipe}", "seed=1,2"]
    first, second = rewrite_recipe_argument(list(argv)), rewrite_recipe_argument(list(argv))
    assert first == second and first != argv


def test_lock_drift_names_what_changed_since_the_lock():
    from lmstack.tracking.run_dir import lock_drift, package_versions
    from lmstack.util.cpu_kind import cpu_kind

    lock = {"packages": {**package_versions(), "torch": "0.0.1"}, "data_fingerprint": "file:abc"}
    drift = lock_drift(lock, "file:def")
    assert any("torch 0.0.1" in line for line in drift), drift
    assert any("file:abc" in line and "file:def" in line for line in drift), drift
    assert lock_drift({}, "file:def") == []
    assert lock_drift({"packages": package_versions()}, "file:def") == []
    other_cpu = lock_drift({"cpu_kind": "intel-x86_64-avx512-bf16-amx-or-not-this"}, "file:def")
    assert len(other_cpu) == 1 and "may differ" in other_cpu[0], other_cpu
    assert lock_drift({"cpu_kind": cpu_kind()}, "file:def") == []
