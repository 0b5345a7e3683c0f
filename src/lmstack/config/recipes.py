"""`recipe=` arguments: a name in recipes/, a name on LMSTACK_RECIPE_PATH, or a file path.

Recipes are Hydra configs of the `recipe` group (`conf/recipe` links to
`recipes/`). A recipe outside the repository is made reachable by putting a
folder that holds it (as `recipe/<name>.yaml`) on Hydra's search path; this
happens on the command line before Hydra parses it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO_RECIPES = Path(__file__).resolve().parents[3] / "recipes"
SOURCE_ENV = "LMSTACK_RECIPE_SOURCE"


def find_recipe(value: str) -> Path | None:
    """The file a `recipe=` value names, or None when it is a plain name in recipes/."""
    if value.endswith((".yaml", ".yml")) or "/" in value:
        return Path(value).expanduser().resolve()
    if (REPO_RECIPES / f"{value}.yaml").is_file():
        return None
    for folder in os.environ.get("LMSTACK_RECIPE_PATH", "").split(os.pathsep):
        if folder and (Path(folder) / f"{value}.yaml").is_file():
            return (Path(folder) / f"{value}.yaml").resolve()
    return None


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
        folder = Path(tempfile.mkdtemp(prefix="lmstack-recipe-"))
        (folder / "recipe").mkdir()
        (folder / "recipe" / path.name).symlink_to(path)
        os.environ[SOURCE_ENV] = str(path)  # pipeline stages pass the file on
        return [
            *argv[:index],
            f"recipe={path.stem}",
            f"hydra.searchpath=[file://{folder}]",
            *argv[index + 1 :],
        ]
    return argv
