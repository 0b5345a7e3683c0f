"""Defaults once: an objective's or engine's defaults live in its schema (config/objectives.py's
specs, config/groups/serving.py's records); its YAML holds the defaults list and comments.

A YAML value that repeats the schema's is a second copy that drifts; one that differs makes the
schema's default one no run gets (as GRPO's warmup_steps once was: 5 in the YAML, 10 in the
schema). The YAML keeps each key as a comment line (`# beta: 0.1   # what it does`), and those
are checked against the schema, so the documentation cannot drift either.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmstack.config.groups.serving import serving_schemas
from lmstack.config.objectives import objective_schemas
from lmstack.config.store import register_configs

from conftest import REPO

# `# key: value   # what it is for`: a commented default (the value ends before two spaces + #)
COMMENTED = re.compile(r"^# (\w+):(?: (.*?))?(?:\s{2,}#.*)?$")
REQUIRED = "???"  # a value the user must give (serving=external's base_url)


def option_files() -> list[tuple[Path, type]]:
    register_configs()
    groups = (("objective", objective_schemas()), ("serving", serving_schemas()))
    return [
        (REPO / "conf" / g / f"{name}.yaml", schema)
        for g, s in groups
        for name, schema in s.items()
    ]


def schema_default(field: dataclasses.Field):
    value = field.default
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    return OmegaConf.to_container(OmegaConf.create({"value": value}))["value"]


def equal(default, written) -> bool:
    if isinstance(default, float) and isinstance(written, int | float):
        return float(written) == default
    if isinstance(default, list) and isinstance(written, list) and len(default) == len(written):
        # a list of records: the written keys of each entry, the rest left at their defaults
        return all(
            d == w if not isinstance(w, dict) else all(d.get(k) == v for k, v in w.items())
            for d, w in zip(default, written, strict=True)
        )
    return default == written


@pytest.mark.parametrize("path, schema", option_files(), ids=lambda p: getattr(p, "stem", ""))
def test_an_option_yaml_sets_no_value_its_schema_holds(path, schema):
    raw = OmegaConf.to_container(OmegaConf.load(path))
    fields = {f.name: f for f in dataclasses.fields(schema)}
    set_here = [k for k, v in raw.items() if k != "defaults" and v != REQUIRED]
    problems = []
    for key in set_here:
        if key not in fields:
            continue  # an unknown key fails composition (tests/test_config.py)
        default = schema_default(fields[key])
        how = (
            "repeats" if equal(default, raw[key]) else f"overrides ({default!r}, which no run gets)"
        )
        problems.append(f"{key}: {raw[key]!r} {how} {schema.__name__}'s default")
    assert not problems, (
        f"{path.relative_to(REPO)}: "
        + "; ".join(problems)
        + (". Keep the default in the schema and the line as a comment")
    )


@pytest.mark.parametrize("path, schema", option_files(), ids=lambda p: getattr(p, "stem", ""))
def test_a_commented_default_is_the_schemas(path, schema):
    fields = {f.name: f for f in dataclasses.fields(schema)}
    checked, wrong = 0, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = COMMENTED.match(line)
        if not match or match.group(1) not in fields or not match.group(2):
            continue
        written = OmegaConf.to_container(OmegaConf.create(f"value: {match.group(2)}"))["value"]
        default = schema_default(fields[match.group(1)])
        checked += 1
        if not equal(default, written):
            wrong.append(
                f"line {number}: {match.group(1)} says {written!r}, the schema {default!r}"
            )
    assert not wrong, f"{path.relative_to(REPO)}: " + "; ".join(wrong)
