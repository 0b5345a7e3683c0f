"""Every option of every config group composes and validates; bad values fail by name."""

from __future__ import annotations

import copy
from enum import Enum
from functools import cache
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmstack.config.phases import PHASES
from lmstack.config.store import register_configs
from lmstack.errors import ConfigError
from lmstack.launch import validate
from lmstack.tracking.identity import COSMETIC_KEYS, run_id

CONF = Path(__file__).resolve().parents[1] / "conf"
# options that need a value the user must supply
REQUIRED = {
    ("model", "hf"): ["model.name_or_path=/tmp/some-model"],
    ("model", "gguf"): ["model.path=/tmp/some-model.gguf"],
    ("data", "jsonl"): ["data.path=/tmp/train.jsonl"],
    ("data", "parquet"): ["data.path=/tmp/train.parquet"],
    ("data", "hub"): ["data.path=org/dataset"],
    ("phase", "pipeline"): ["phase.stages=[{name: a, overrides: ['objective=sft']}]"],
    ("objective", "ppo"): ["objective.reward_model=/tmp/reward-run"],
    ("serving", "external"): ["serving.base_url=http://127.0.0.1:9/v1"],
    ("phase", "report"): ["report.source=/tmp/traces.sqlite"],
    ("phase", "harvest"): ["harvest.sources=[/tmp/traces.sqlite]"],
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
    assert_named_and_identified(cfg, group, option)


# the run name of each option (the rest of the config at its defaults: a train run, sft + lora)
NAMES = {
    ("adapter", "none"): "sft-full",
    ("adapter", "dora"): "sft-dora",
    ("adapter", "qlora"): "sft-qlora-nf4",
    ("quantization", "int8"): "sft-lora-int8",
    ("quantization", "nf4"): "sft-qlora-nf4",
    ("phase", "pipeline"): "pipeline",
    ("phase", "serve"): "serve-hf",
    ("phase", "bench"): "bench-hf",
    ("phase", "eval"): "eval-in_process",
    ("phase", "report"): "report",
    ("phase", "label"): "label",
    ("phase", "harvest"): "harvest",
    ("phase", "plan"): "plan-sft-lora",  # the plan of sft-lora, never taken for that run
}


@cache
def default_identity() -> str:
    return run_id(compose_config())


def default_options() -> dict[str, str]:
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    return {k: v for item in defaults if isinstance(item, dict) for k, v in item.items()}


def assert_named_and_identified(cfg, group: str, option: str) -> None:
    """The name says what runs; the identity of the default (train) run changes with an option
    of a group that training reads, and with no other."""
    name = NAMES.get((group, option), f"{option}-lora" if group == "objective" else "sft-lora")
    identity = run_id(cfg)
    assert identity.rsplit("-", 1)[0] == name
    if group == "phase":
        return
    is_default = default_options().get(group) == option
    reads = group in PHASES["train"].reads and group not in COSMETIC_KEYS
    assert (identity == default_identity()) == (is_default or not reads), (group, option)


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


def test_a_precision_typo_exits_2_at_once_naming_the_choices(tmp_path):
    """Lightning would refuse it too, but only once the model is loaded (a minute and more on
    a real model): the schema refuses it before anything loads."""
    import subprocess
    import sys
    import time

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "run.py", "trainer.precision=fp17", f"paths.output_dir={tmp_path}"],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "trainer.precision: 'fp17'" in result.stderr and "bf16-mixed" in result.stderr
    assert seconds < 10, seconds  # under 2 s on a quiet machine; slack for a busy CI
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))


def test_yaml_files_open_with_a_comment():
    for group, option in group_options():
        text = (CONF / group / f"{option}.yaml").read_text()
        assert text.lstrip().startswith("#"), f"conf/{group}/{option}.yaml has no opening comment"
    assert OmegaConf.load(CONF / "config.yaml")["defaults"]


# recipes of one run (not a pipeline), and what they leave to the command line
SINGLE_RUN_RECIPES = ("smollm2_sft_lora",)
RECIPE_REQUIRED = {
    "smollm2_sft_lora": ["data.path=/tmp/chat.jsonl"],
    "user_task_sft": ["data.path=/tmp/train.jsonl", "eval.data.path=/tmp/heldout.jsonl"],
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_and_its_stages_compose(recipe):
    from lmstack.phases.pipeline import PLACEHOLDER

    config = validate(compose_config(f"recipe={recipe}", *RECIPE_REQUIRED.get(recipe, [])))
    if recipe in SINGLE_RUN_RECIPES:
        assert config.phase.name == "train"
        return
    assert config.phase.name == "pipeline" and config.phase.stages
    for stage in config.phase.stages:
        overrides = [PLACEHOLDER.sub("/tmp/earlier-run", o) for o in stage.overrides]
        required = RECIPE_REQUIRED.get(recipe, [])
        stage_config = validate(
            compose_config(f"recipe={recipe}", *required, "phase=train", *overrides)
        )
        phase = next((o.split("=", 1)[1] for o in stage.overrides if o.startswith("phase=")), "")
        if phase:  # a serving, harvest or report stage (recipes/flywheel.yaml)
            assert stage_config.phase.name == phase
        if phase == "eval":
            # a recipe evaluating on the user's rows passes them on to its eval stages
            if any(r.startswith("eval.data.path=") for r in required):
                assert stage_config.eval.data.path
        elif not phase:
            assert stage_config.objective.name in stage.overrides[0]


def test_recipes_open_with_a_comment_and_the_command():
    for recipe in RECIPES:
        text = (CONF.parent / "recipes" / f"{recipe}.yaml").read_text()
        assert f"python run.py recipe={recipe}" in text, recipe


# ---- run identity: what a phase reads, and nothing else ------------------------------------


def phase_config(phase: str) -> DictConfig:
    return compose_config(f"phase={phase}", *REQUIRED.get(("phase", phase), []))


def leaves(node, prefix: str = ""):
    """(dotted key, value) of every scalar under node."""
    if isinstance(node, DictConfig):
        for key in node:
            yield from leaves(node._get_node(key), f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        return  # lists: their items are changed through their own keys elsewhere
    elif node._value() is not None and not OmegaConf.is_missing(node._get_parent(), node._key()):
        yield prefix.rstrip("."), node._value()


def changed(cfg: DictConfig, dotted: str, value) -> DictConfig:
    other = copy.deepcopy(cfg)
    if isinstance(value, bool):
        new = not value
    elif isinstance(value, Enum):  # a closed set of choices: another member
        new = next(member for member in type(value) if member != value)
    elif isinstance(value, int | float):
        new = value + 1
    else:
        new = f"{value}x"
    OmegaConf.update(other, dotted, new, force_add=False)
    return other


def is_cosmetic(dotted: str) -> bool:
    return any(dotted == key or dotted.startswith(f"{key}.") for key in COSMETIC_KEYS)


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_identity_hashes_what_the_phase_reads_and_nothing_else(phase):
    """For every phase and every group: a key of a group the phase does not read (or a cosmetic
    key) leaves the identity as it is; the first other key of a group it reads changes it."""
    cfg = phase_config(phase)
    base = run_id(cfg)
    reads = PHASES[phase].reads
    for group in (key for key in cfg if key != "hydra"):
        keys = [(k, v) for k, v in leaves(cfg._get_node(group), f"{group}.") if k != "phase.name"]
        if not isinstance(cfg._get_node(group), DictConfig):
            keys = [(group, cfg[group])]
        unread = [(k, v) for k, v in keys if is_cosmetic(k) or (reads and group not in reads)]
        for key, value in unread:
            assert run_id(changed(cfg, key, value)) == base, (phase, key)
        read = [(k, v) for k, v in keys if (k, v) not in unread]
        if read:
            key, value = read[0]
            assert run_id(changed(cfg, key, value)) != base, (phase, key)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (["adapter=qlora", "quantization=none"], "sft-lora"),
        (["adapter=lora", "quantization=nf4"], "sft-qlora-nf4"),
        (["adapter.use_dora=true"], "sft-dora"),
        (["adapter=qlora", "adapter.use_dora=true"], "sft-qdora-nf4"),
        (["objective=dpo", "adapter=none"], "dpo-full"),
        (["phase=plan", "objective=dpo", "adapter=qlora"], "plan-dpo-qlora-nf4"),
    ],
)
def test_run_name_says_what_trains(overrides, name):
    assert run_id(compose_config(*overrides)).rsplit("-", 1)[0] == name


@pytest.mark.parametrize("group", sorted(set(PHASES["pipeline"].reads or ()) | {
    "phase", "model", "adapter", "quantization", "objective", "data", "trainer", "logger",
    "paths", "serving", "bench", "prompt", "eval", "trace", "cost", "monitor", "report",
    "label", "verify", "export", "run", "sweep",
}))  # fmt: skip
def test_misspelt_key_in_every_group_is_named(group):
    """`+group.nosuchkey=1`: Hydra adds the key (it refuses `group.nosuchkey=1` itself, see
    tests/test_errors.py); lmstack refuses it, naming it, before anything runs."""
    with pytest.raises(ConfigError, match=rf"{group}\.nosuchkey: unknown key"):
        validate(compose_config(f"+{group}.nosuchkey=1"))


def schema_backed_options():
    """(yaml path, schema) of every objective and serving option built on its own schema."""
    from lmstack.config.groups.serving import serving_schemas
    from lmstack.config.objectives import objective_schemas

    for group, schemas in (("objective", objective_schemas()), ("serving", serving_schemas())):
        for path in sorted((CONF / group).glob("*.yaml")):
            bases = [
                d for d in OmegaConf.load(path).get("defaults", []) if str(d).endswith("_schema")
            ]
            if bases:
                yield path, schemas[str(bases[0]).removesuffix("_schema")]


@pytest.mark.parametrize(
    ("path", "schema"), list(schema_backed_options()), ids=lambda v: getattr(v, "stem", "")
)
def test_no_schema_default_is_one_that_its_own_yaml_overrides(path, schema):
    """A default written in Python that the option's YAML replaces is one no run gets (GRPO's
    warmup_steps once said 10 in the schema, 5 in the YAML): each value an option's YAML sets
    equals its schema's default, or is required there (???)."""
    written = OmegaConf.load(path)
    schema_node = OmegaConf.structured(schema)
    keys = [k for k in written if k != "defaults" and not OmegaConf.is_missing(written, k)]
    merged = OmegaConf.merge(schema_node, {k: written[k] for k in keys})
    for key in keys:
        value = OmegaConf.to_container(merged, enum_to_str=True)[key]
        default = OmegaConf.to_container(schema_node, enum_to_str=True)[key]
        assert value == default, f"{path.name}: {key} is {value!r}, its schema says {default!r}"
