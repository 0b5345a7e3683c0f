"""`recipe=` arguments: a name in recipes/, a name on LMSTACK_RECIPE_PATH, or a file path.

Recipes are Hydra configs of the `recipe` group (`conf/recipe` links to
`recipes/`). A recipe outside the repository is made reachable by putting a
folder that holds it (as `recipe/<name>.yaml`) on Hydra's search path; this
happens on the command line before Hydra parses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from lmstack.config.location import RECIPE_DIR
from lmstack.config.objectives import OBJECTIVES

SOURCE_ENV = "LMSTACK_RECIPE_SOURCE"


def find_recipe(value: str) -> Path | None:
    """The file a `recipe=` value names, or None when it is a plain name in recipes/."""
    if value.endswith((".yaml", ".yml")) or "/" in value:
        return Path(value).expanduser().resolve()
    if (RECIPE_DIR / f"{value}.yaml").is_file():
        return None
    for folder in os.environ.get("LMSTACK_RECIPE_PATH", "").split(os.pathsep):
        if folder and (Path(folder) / f"{value}.yaml").is_file():
            return (Path(folder) / f"{value}.yaml").resolve()
    return None


def search_path_for(path: Path, cache_dir: Path) -> tuple[str, Path]:
    """A folder holding `recipe/<name>.yaml` -> path, and the name to select it by.

    The folder and name depend on the file's path (and the cache dir) only, so a sweep re-run
    with the same command gets the same sweep id (it hashes the command line, search path
    included). The name carries a hash of the path, so a file whose stem is also a repo
    recipe's name is never shadowed by the repo recipe (Hydra looks in conf/ first). The
    folder is in lmstack's cache, not the system temp dir, where nothing would remove it.
    """
    key = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    name = f"{path.stem}-{key}"
    folder = cache_dir / "recipe-links" / key
    (folder / "recipe").mkdir(parents=True, exist_ok=True)
    link = folder / "recipe" / f"{name}.yaml"
    if not (link.is_symlink() and link.resolve() == path):
        # atomic replace: concurrent runs of one sweep may create it at once
        scratch = folder / "recipe" / f".{name}.{os.getpid()}"
        scratch.unlink(missing_ok=True)
        scratch.symlink_to(path)
        os.replace(scratch, link)
    return name, folder


def cache_dir_of(argv: list[str]) -> Path:
    """lmstack's cache dir as the command will have it (paths.cache_dir, before Hydra runs)."""
    given = [a.split("=", 1)[1] for a in argv if re.match(r"^[+]*paths\.cache_dir=", a)]
    default = os.environ.get("LMSTACK_CACHE_DIR", ".cache/lmstack")
    return Path(given[-1] if given else default).expanduser().resolve()


def rewrite_recipe_argument(argv: list[str]) -> list[str]:
    """Turn `recipe=<file or path name>` into `recipe=<stem>` plus a Hydra search path."""
    for index, arg in enumerate(argv):
        if not arg.startswith("recipe="):
            continue
        path = find_recipe(arg.split("=", 1)[1])
        if path is None:
            return argv
        if not path.is_file():
            print(f"lmstack: error: recipe: no such file: {path}", file=sys.stderr)
            sys.exit(2)
        name, folder = search_path_for(path, cache_dir_of(argv))
        os.environ[SOURCE_ENV] = str(path)  # pipeline stages pass the file on
        return [
            *argv[:index],
            f"recipe={name}",
            f"hydra.searchpath=[file://{folder}]",
            *argv[index + 1 :],
        ]
    return argv


# ---- a pipeline's stages: which of the command's overrides each stage takes ------------------


def inherited_overrides() -> list[str]:
    """The pipeline command's own overrides, less those that make it a pipeline."""
    task = list(HydraConfig.get().overrides.task)
    kept = [o for o in task if not re.match(r"^[+~]*(phase|hydra)[=.]", o)]
    if source := os.environ.get(SOURCE_ENV):  # a recipe file outside recipes/
        kept = [f"recipe={source}" if o.startswith("recipe=") else o for o in kept]
    return ["phase=train", *kept]


def for_stage(common: list[str], stage_overrides: list[str], objective: str) -> list[str]:
    """The command's overrides a stage takes: `objective.KEY=...` only where the stage's
    objective has KEY, so `objective.beta=0.1` reaches a pipeline's DPO stage, not its SFT stage.
    """
    for override in [*common, *stage_overrides]:
        if match := re.match(r"^objective=(\w+)$", override):
            objective = match.group(1)
    if objective not in OBJECTIVES:
        return common
    known = {f.name for f in fields(OBJECTIVES[objective].schema)}
    return [
        o
        for o in common
        if not (match := re.match(r"^[+~]*objective\.(\w+)", o)) or match.group(1) in known
    ]
