"""docs/architecture.md's recipe for a new objective, followed from outside lmstack: one module
(its schema, its registration, its implementation), one YAML file, nothing else changed. The
toy objective learns the whole chat (prompt tokens too) at its own default learning rate."""

from __future__ import annotations

import json

from conftest import run_cli, run_dirs

TOY_MODULE = '''
"""A toy objective: SFT on every token of the chat, through lmstack's next-token module."""

from dataclasses import dataclass

from lmstack.config.objectives import Objective, ObjectiveSpec, register_objective
from lmstack.config.schema import ObjectiveConfig


@dataclass
class ToyObjectiveConfig(ObjectiveConfig):
    name: str = "toy"
    completion_only: bool = False
    smoothing_note: str = "none"  # a field only this objective has


def setup(config, loaded, rows):
    from lmstack.objectives import causal_lm  # torch: imported when training, not at start

    return causal_lm.setup(config, loaded, rows)


register_objective(
    ObjectiveSpec("toy", ToyObjectiveConfig, __name__, ("prompt_completion",), True)
)
OBJECTIVE = Objective(setup=setup)
'''

TOY_YAML = """# A toy objective (tests/test_objective_plugin.py)
defaults:
  - toy_schema
  - _self_
lr: 1e-3
"""


def test_an_objective_from_a_temporary_module_trains(tmp_path):
    (tmp_path / "toy_objective.py").write_text(TOY_MODULE)
    (tmp_path / "conf" / "objective").mkdir(parents=True)
    (tmp_path / "conf" / "objective" / "toy.yaml").write_text(TOY_YAML)
    env = {"LMSTACK_PLUGINS": "toy_objective", "PYTHONPATH": str(tmp_path)}
    common = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "logger=none"]

    bad = run_cli("objective=toy", "objective.smoothing=1", *common, output_dir=tmp_path,
                  env=env, check=False)  # fmt: skip
    assert bad.returncode == 2 and "smoothing" in bad.stderr  # its schema is checked
    run_cli(
        "objective=toy",
        "objective.smoothing_note=label",
        *common,
        "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        "data.train_size=16",
        "data.eval_size=8",
        "verify.enabled=false",
        output_dir=tmp_path / "out",
        env=env,
    )
    (run_dir,) = run_dirs(tmp_path / "out")
    assert run_dir.name.startswith("toy-lora-")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/loss"] > 0 and "val/loss" in metrics
    config = (run_dir / "config.yaml").read_text()
    assert "smoothing_note: label" in config and "lr: 0.001" in config
    assert (run_dir / "adapter" / "adapter_config.json").is_file()  # the default save
