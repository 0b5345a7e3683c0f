"""Plug-ins from an installed package: an objective, a serving engine, an eval suite and a
tracker, each one module plus one YAML, found through the `lmstack.plugins` entry points alone (no
LMSTACK_PLUGINS, no search path on the command line).

The package is installed the way pip leaves one: the modules, their conf/ beside them, and a
dist-info folder holding entry_points.txt, in a folder on the child's path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_objective_plugin import recipe_blocks

from conftest import REPO, run_cli, run_dirs

FAST_ENGINE = REPO / "tests" / "fast_engine.py"
ENTRY_POINTS = """\
[lmstack.plugins]
objective = toy_lmstack.objective
engine = toy_lmstack.engine_record
suite = toy_lmstack.suite
tracker = toy_lmstack.tracker
"""
ENGINE_RECORD = """\
from dataclasses import dataclass

from lmstack.config.groups.serving import EngineRecord, ServingConfig, register_engine


@dataclass
class ToyServingConfig(ServingConfig):
    name: str = "toy"
    words: int = 4  # the length of every answer


register_engine(
    EngineRecord("toy", ToyServingConfig, {"cpu": ("none",)}, "toy_lmstack.engine:ToyEngine")
)
"""
ENGINE = f"""\
import sys

from lmstack.serving.engine_api import Engine, Launch


class ToyEngine(Engine):
    name = "toy"

    def launch(self, serving, target, executable, device, port, scratch):
        words = ["--words", str(serving.words)]
        return Launch([sys.executable, "{FAST_ENGINE}", "--port", str(port), *words], "toy")
"""
SUITE = """\
from dataclasses import dataclass

from lmstack.evaluation.suites import Suite, register


@dataclass
class FirstWordOptions:
    word: str = "w0"


def run(session):
    word = session.options("first_word").word
    answers = [samples[0] for samples in session.answers()]
    scores = [float(answer.split()[:1] == [word]) for answer in answers]
    session.samples("first_word", [{"completion": a, "score": s} for a, s in zip(answers, scores)])
    return {"first_word/score": sum(scores) / len(scores), "first_word/n": len(scores)}


register(Suite("first_word", run, headline="first_word/score", needs=("answers",),
               schema=FirstWordOptions))
"""
TRACKER = """\
import json

from lightning.pytorch.loggers.logger import Logger

from lmstack.tracking.loggers import Tracker, register_tracker


class JsonLinesLogger(Logger):
    \"\"\"Every logged dict as one line of tracker.jsonl in the run directory.\"\"\"

    def __init__(self, folder):
        super().__init__()
        self.path = folder / "tracker.jsonl"

    name = "jsonl"
    version = "0"

    def log_metrics(self, metrics, step=None):
        with self.path.open("a") as out:
            out.write(json.dumps({"metrics": metrics, "step": step}) + "\\n")

    def log_hyperparams(self, params, *args, **kwargs):
        with self.path.open("a") as out:
            out.write(json.dumps({"config_keys": sorted(params)}) + "\\n")


register_tracker(Tracker("jsonl", lambda logger_cfg, run: JsonLinesLogger(run.save_dir)))
"""
YAMLS = {
    "serving/toy.yaml": "defaults:\n  - toy_schema\n  - _self_\n",
    "eval/first_word.yaml": "defaults:\n  - schema\n  - _self_\nsuites: {first_word: true}\n",
    "logger/jsonl.yaml": "defaults:\n  - schema\n  - _self_\nname: jsonl\n",
}
QUIET = ["logger=jsonl", "trainer.num_threads=1", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding the installed toy_lmstack package; returns it (for PYTHONPATH)."""
    site = tmp_path_factory.mktemp("site")
    package = site / "toy_lmstack"
    objective, objective_yaml = recipe_blocks()  # docs/architecture.md's objective
    files = {
        "__init__.py": "",
        "objective.py": objective,
        "engine_record.py": ENGINE_RECORD,
        "engine.py": ENGINE,
        "suite.py": SUITE,
        "tracker.py": TRACKER,
        "conf/objective/toy.yaml": objective_yaml,
        **{f"conf/{name}": text for name, text in YAMLS.items()},
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    dist_info = site / "toy_lmstack-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-lmstack\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


def lmstack(site: Path, *args: str, output_dir: Path, check: bool = True):
    env = {"PYTHONPATH": str(site), "LMSTACK_PLUGINS": ""}
    return run_cli(*args, *QUIET, output_dir=output_dir, env=env, check=check)


def test_an_engine_and_a_suite_from_an_installed_package(installed, tmp_path, tiny_base):
    args = ["phase=eval", "eval=first_word", "eval.target=served", "serving=toy"]
    args.append("eval.num_prompts=6")
    lmstack(installed, *args, output_dir=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the toy engine's answers ("w0 w1 w2 w3") reached the toy suite through the gateway
    assert metrics["eval/suites"] == ["first_word"] and metrics["first_word/n"] == 6
    assert metrics["first_word/score"] == 1.0 and metrics["eval/score"] == 1.0
    # the toy tracker (logger=jsonl) got the config and the figures
    logged = [json.loads(line) for line in (run_dir / "tracker.jsonl").open()]
    assert any("eval" in line.get("config_keys", []) for line in logged)
    assert any(line.get("metrics", {}).get("first_word/score") == 1.0 for line in logged)
    wrong_word = lmstack(installed, *args, "+eval.options.first_word.word=w1",
                         output_dir=tmp_path / "w1")  # fmt: skip
    (run_dir,) = run_dirs(tmp_path / "w1")
    assert json.loads((run_dir / "metrics.json").read_text())["first_word/score"] == 0.0
    assert wrong_word.returncode == 0


def test_a_plugin_engine_is_checked_like_a_built_in_one(installed, tmp_path):
    bad = lmstack(installed, "phase=serve", "serving=toy", "serving.quantization=int8",
                  output_dir=tmp_path, check=False)  # fmt: skip
    assert bad.returncode == 2 and "serving.quantization" in bad.stderr, bad.stderr[-2000:]
    unknown = lmstack(installed, "phase=serve", "serving=toy", "serving.nosuch=1",
                      output_dir=tmp_path, check=False)  # fmt: skip
    assert unknown.returncode == 2 and "ToyServingConfig" in unknown.stderr


def test_an_objective_from_an_installed_package_trains(installed, tmp_path, tiny_base):
    steps = ["trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2", "data.train_size=16",
             "data.eval_size=8", "verify.enabled=false"]  # fmt: skip
    lmstack(installed, "objective=toy", "objective.smoothing_note=x", *steps, output_dir=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.name.startswith("toy-lora-")
    assert "train/loss" in json.loads((run_dir / "metrics.json").read_text())
    # the Lightning Trainer logged its steps to the toy tracker
    logged = [json.loads(line) for line in (run_dir / "tracker.jsonl").open()]
    assert any("train/loss" in line.get("metrics", {}) for line in logged)


def test_a_plugin_that_cannot_be_imported_names_its_entry_point(installed, tmp_path):
    broken = tmp_path / "site"
    (broken / "broken-0.1.dist-info").mkdir(parents=True)
    (broken / "broken-0.1.dist-info" / "METADATA").write_text("Name: broken\nVersion: 0.1\n")
    (broken / "broken-0.1.dist-info" / "entry_points.txt").write_text(
        "[lmstack.plugins]\nmissing = no_such_module_here\n"
    )
    result = run_cli("--cfg", "job", output_dir=tmp_path, check=False,
                     env={"PYTHONPATH": str(broken)})  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "entry point 'missing'" in result.stderr and "broken" in result.stderr
    assert "Traceback" not in result.stderr
