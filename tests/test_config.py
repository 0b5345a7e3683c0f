"""Every option of every config group composes and validates; bad values fail by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lmstack.config.store import register_configs
from lmstack.errors import ConfigError
from lmstack.launch import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
# options that need a value the user must supply
REQUIRED = {
    ("model", "hf"): ["model.name_or_path=/tmp/some-model"],
    ("data", "jsonl"): ["data.path=/tmp/train.jsonl"],
    ("data", "parquet"): ["data.path=/tmp/train.parquet"],
    ("data", "hub"): ["data.path=org/dataset"],
    ("phase", "pipeline"): ["phase.stages=[{name: a, overrides: ['objective=sft']}]"],
    ("objective", "ppo"): ["objective.reward_model=/tmp/reward-run"],
    ("serving", "external"): ["serving.base_url=http://127.0.0.1:9/v1"],
    ("phase", "report"): ["report.source=/tmp/traces.sqlite"],
    ("eval", "arena"): ["eval.arena.models=[base,/tmp/some-run]"],
}
RECIPES = sorted(p.stem for p in (CONF.parent / "recipes").glob("*.yaml"))


def group_options() -> list[tuple[str, str]]:
    options = []
    groups = [
        p for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "recipe", "sweep")
    ]
    for group_dir in sorted(groups):
        options += [(group_dir.name, f.stem) for f in sorted(group_dir.glob("*.yaml"))]
    return options


def compose_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def test_every_group_has_options():
    groups = {group for group, _ in group_options()}
    assert {
        "model",
        "adapter",
        "quantization",
        "objective",
        "data",
        "trainer",
        "logger",
        "paths",
        "phase",
    } <= groups


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_option_composes_and_validates(group, option):
    extra = REQUIRED.get((group, option), [])
    # a quantized base needs an adapter; every other option composes with the defaults
    cfg = compose_config(f"{group}={option}", *extra)
    config = validate(cfg)
    assert getattr(config, group) is not None
    if group in ("adapter", "quantization", "logger", "phase"):
        assert getattr(config, group).name == option


def test_qlora_is_lora_plus_nf4():
    lora = validate(compose_config("adapter=lora"))
    qlora = validate(compose_config("adapter=qlora"))
    assert qlora.quantization.name == "nf4"
    assert (qlora.adapter.r, qlora.adapter.alpha, qlora.adapter.target_modules) == (
        lora.adapter.r,
        lora.adapter.alpha,
        lora.adapter.target_modules,
    )
    # the command line still wins over qlora's quantization default
    assert (
        validate(compose_config("adapter=qlora", "quantization=int8")).quantization.name == "int8"
    )


def test_run_identity_ignores_cosmetic_keys_only():
    from lmstack.tracking.identity import run_id

    base = run_id(compose_config())
    assert run_id(compose_config("trainer.log_every_n_steps=1", "logger=csv")) == base
    assert run_id(compose_config("adapter.r=4")) != base
    assert run_id(compose_config("seed=7")) != base
    assert base.startswith("sft-lora-")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["adapter.r=0"], "adapter.r"),
        (["adapter=none", "quantization=nf4"], "adapter=none"),
        (["data.source=jsonl"], "data.path"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["model.builtin.hidden_size=96"], "model.builtin.hidden_size"),
        (["objective.lr=-1"], "objective.lr"),
    ],
)
def test_cross_field_rules_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(*overrides))


def test_yaml_files_open_with_a_comment():
    for group, option in group_options():
        text = (CONF / group / f"{option}.yaml").read_text()
        assert text.lstrip().startswith("#"), f"conf/{group}/{option}.yaml has no opening comment"
    assert OmegaConf.load(CONF / "config.yaml")["defaults"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_and_its_stages_compose(recipe):
    from lmstack.phases.pipeline import PLACEHOLDER

    config = validate(compose_config(f"recipe={recipe}"))
    assert config.phase.name == "pipeline" and config.phase.stages
    for stage in config.phase.stages:
        overrides = [PLACEHOLDER.sub("/tmp/earlier-run", o) for o in stage.overrides]
        stage_config = validate(compose_config(f"recipe={recipe}", "phase=train", *overrides))
        assert stage_config.objective.name in stage.overrides[0]


def test_recipes_open_with_a_comment_and_the_command():
    for recipe in RECIPES:
        text = (CONF.parent / "recipes" / f"{recipe}.yaml").read_text()
        assert f"python run.py recipe={recipe}" in text, recipe
