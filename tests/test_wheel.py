"""lmstack as an installed tool: the wheel, installed in a fresh venv, runs the demo and a team's
own recipe from a folder outside the clone, as the `lmstack` console script.

The venv is fresh (no lmstack, no clone on its path); its third-party packages are the test
environment's, reached through a .pth line rather than installed again (the lock installs in
about 2.5 minutes), and never the clone's editable lmstack: a .pth file inside a directory that
a .pth line adds is not run, so the clone's editable hook stays off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import CACHE_DIR, REPO, run_dirs

SHORT = [
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "data.train_size=48",
    "data.eval_size=8",
    "data.batch_size=8",
    "verify.num_prompts=2",
    "verify.max_new_tokens=4",
    "logger=none",
]
TEAM_RECIPE = """\
# @package _global_
# the team's two-stage recipe: SFT, then DPO from it
defaults:
  - override /phase: pipeline
phase:
  stages:
    - name: sft
      overrides: [objective=sft]
    - name: dpo
      overrides: [objective=dpo, "model.init_from={sft}", trainer.max_steps=2]
"""


def source_copy(destination: Path) -> Path:
    """The files the wheel is built from, copied: setuptools writes build/ into the tree."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, destination / name)
    skipped = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf", "recipes"):
        shutil.copytree(REPO / name, destination / name, symlinks=True, ignore=skipped)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding lmstack's wheel; returns its bin/ folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = source_copy(root / "source")
    wheels = root / "dist"
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-q", "-w", str(wheels)], check=True, timeout=300)
    (wheel,) = wheels.glob("lmstack-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "test-env-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    subprocess.run([*install, "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    return venv / "bin"


def lmstack(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    command = ["lmstack", *args, f"paths.cache_dir={CACHE_DIR}"]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def finished(run_dir: Path) -> bool:
    return json.loads((run_dir / "status.json").read_text())["status"] == "finished"


def test_the_wheel_ships_its_configs_and_imports_from_the_venv(installed):
    found = subprocess.run(
        [installed / "python", "-c", "import lmstack.config.location as l; print(l.CONF_DIR)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.strip()
    conf = Path(found)
    assert conf.is_relative_to(installed.parent), f"lmstack imported from {conf}, not the venv"
    assert not conf.is_symlink() and (conf / "config.yaml").is_file()
    assert (conf / "recipe" / "arith_sft_dpo.yaml").is_file()  # recipes/ rides along
    assert (conf.parent / "evaluation" / "label_page" / "page.js").is_file()
    help_text = subprocess.run(
        [installed / "lmstack", "--help"], capture_output=True, text=True, check=True, cwd="/"
    ).stdout
    assert help_text.startswith("usage: lmstack") and "objective=" in help_text


def test_the_console_script_runs_the_demo_outside_the_clone(installed, tmp_path, tiny_base):
    result = lmstack(installed, *SHORT, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert run_dir.is_relative_to(tmp_path)  # outputs/ under the folder it was started from
    assert (run_dir / "run.log").is_file()
    assert finished(run_dir), result.stdout[-2000:]
    assert "train/loss" in json.loads((run_dir / "metrics.json").read_text())


def test_a_teams_recipe_folder_joins_through_config_dir(installed, tmp_path, tiny_base):
    team = tmp_path / "team"
    (team / "recipe").mkdir(parents=True)
    (team / "recipe" / "sft_then_dpo.yaml").write_text(TEAM_RECIPE)
    work = tmp_path / "work"
    work.mkdir()
    args = ["--config-dir", str(team), "recipe=sft_then_dpo", *SHORT]
    result = lmstack(installed, *args, cwd=work)
    # the pipeline's stages are child processes: they found the team's folder too
    stages = [d for d in run_dirs(work / "outputs") if not d.name.startswith("pipeline")]
    assert {d.name.split("-")[0] for d in stages} == {"sft", "dpo"}, result.stdout[-3000:]
    assert all(finished(d) for d in stages)
    dpo = next(d for d in stages if d.name.startswith("dpo"))
    assert "train/loss" in json.loads((dpo / "metrics.json").read_text())
