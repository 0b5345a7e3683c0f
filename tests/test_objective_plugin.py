"""docs/architecture.md's recipes still work: its objective recipe (one module with its schema,
registration and implementation, one YAML file) is run from outside lmstack as the page shows
it, and every test and source file the page names exists."""

from __future__ import annotations

import json
import re

from conftest import REPO, run_cli, run_dirs

ARCHITECTURE = REPO / "docs" / "architecture.md"


def recipe_blocks() -> tuple[str, str]:
    """The objective recipe's module and YAML, as docs/architecture.md shows them."""
    section = ARCHITECTURE.read_text().split("## How to add an objective")[1].split("\n## ")[0]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    yaml_file = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return python, yaml_file


def test_an_objective_from_a_temporary_module_trains(tmp_path):
    module, yaml_file = recipe_blocks()
    (tmp_path / "toy_objective.py").write_text(module)
    (tmp_path / "conf" / "objective").mkdir(parents=True)
    (tmp_path / "conf" / "objective" / "toy.yaml").write_text(yaml_file)
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


def test_architecture_page_names_tests_and_files_that_exist():
    text = ARCHITECTURE.read_text()
    tests = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(tests) >= 5
    for path, name in tests:
        assert (REPO / path).is_file(), path
        if name:
            assert f"def {name}(" in (REPO / path).read_text(), f"{path}::{name}"
    sources = set(re.findall(r"`((?:[a-z_]+/)?[a-z_]+\.py)`", text))
    for source in sources - {"run.py"}:
        found = list((REPO / "src" / "lmstack").glob(source)) or list(REPO.glob(source))
        assert found, source
