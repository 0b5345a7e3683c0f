"""The docs cannot rot: every command in the README and docs/ composes, and the README stays a
landing page.

Each `python run.py ...` (or `lmstack ...`) line of a fenced block, continuation lines joined,
is composed with Hydra's compose API against lmstack's config groups and checked by lmstack's
own validation (known keys, types, closed choices, each schema's cross-field checks), as a run
would be before it starts. A sweep (`-m`) is composed at its first point. Placeholders (`<run
dir>`, `...`) stand for values, and a recipe file or config folder that only the example has
(`recipe=/teams/...`) leaves its command uncomposed; the rest must compose.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from lmstack.config.location import CONF_DIR
from lmstack.config.recipes import find_recipe
from lmstack.config.store import register_configs
from lmstack.launch import validate
from lmstack.tracking.identity import register_resolvers

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_MOST_LINES = 250
COMMAND = re.compile(r"^((?:[A-Z_]+=\S+\s+)*)(?:python run\.py|lmstack)(?=\s|$)")
# flags that change what a command does, not what it composes
FLAGS_WITHOUT_VALUE = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--info"}
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}


def fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a ``` fence, continuation lines joined."""
    found, inside, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        found.append((start, pending + line))
        pending = ""
    return found


def documented_commands() -> list[tuple[str, str]]:
    commands = []
    for page in PAGES:
        for number, line in fenced_lines(page.read_text()):
            stripped = line.strip()
            if match := COMMAND.match(stripped):
                where = f"{page.relative_to(REPO)}:{number}"
                environment, arguments = match.group(1), stripped[match.end() :]
                if "LMSTACK_CONFIG_DIR=" in environment:
                    continue  # a team's folder that only the example has (tests/test_wheel.py)
                commands.append((where, arguments))
    return commands


def overrides_of(arguments: str) -> list[str] | None:
    """The overrides a command composes with, or None when it names a file only the example
    has. Placeholders become plain values."""
    arguments = re.sub(r"<[^<>]*>", "X", arguments)
    words = [w for w in shlex.split(arguments, comments=True) if w not in ("...", "…")]
    overrides, skip_next = [], False
    for index, word in enumerate(words):
        if skip_next:
            skip_next = False
        elif word in FLAGS_WITH_VALUE:
            skip_next = True
        elif word in ("--config-dir", "-cd"):
            if not Path(words[index + 1]).is_dir():
                return None
            skip_next = True
        elif word not in FLAGS_WITHOUT_VALUE:
            overrides.append(word)
    for override in overrides:
        if override.startswith("recipe="):
            recipe = find_recipe(override.split("=", 1)[1])
            if recipe is not None:
                return None  # a recipe file by path (the repo's own are composed by name)
    return [first_point(o) for o in overrides]


def first_point(override: str) -> str:
    """A sweep override (`key=a,b`, `key=range(...)`) at its first value."""
    (parsed,) = OverridesParser.create().parse_overrides([override])
    if not parsed.is_sweep_override():
        return override
    first = next(iter(parsed.sweep_string_iterator()))
    return f"{parsed.get_key_element()}={first}"


@pytest.fixture(scope="module")
def composer():
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        yield lambda overrides: compose("config", overrides=overrides)
    GlobalHydra.instance().clear()


def test_every_documented_command_composes(composer):
    commands = documented_commands()
    assert len(commands) > 100, "the command pattern stopped finding the docs' commands"
    failures, composed = [], 0
    for where, arguments in commands:
        overrides = overrides_of(arguments)
        if overrides is None:
            continue
        try:
            validate(composer(overrides))
            composed += 1
        except Exception as error:  # any failure is the page's, reported with its place
            failures.append(f"{where}: {arguments}\n    {type(error).__name__}: {error}")
    assert not failures, f"{len(failures)} documented commands do not compose:\n" + "\n".join(
        failures
    )
    assert composed >= 0.9 * len(commands), f"only {composed} of {len(commands)} composed"


def test_a_renamed_key_in_a_command_fails_the_check(composer):
    with pytest.raises(Exception, match="max_concurrency"):
        validate(composer(["phase=bench", "bench.concurrency=16"]))


def test_the_readme_is_a_landing_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MOST_LINES, f"README.md has {len(lines)} lines"
    links = re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines))
    assert links and all((REPO / link).is_file() for link in links), links
