"""lmstack's one entry point: `lmstack [group=option ...] [key=value ...] [-m]`.

The same Hydra app runs as the `lmstack` console script (any directory, after `pip install`),
as `python -m lmstack`, and as `python run.py` in a clone. Its config groups are the package's
own (conf/, shipped as package data); a team adds its own groups, options and recipes with
`--config-dir DIR` (Hydra's flag: DIR joins the search path, so `DIR/model/ours.yaml` is
`model=ours` and `DIR/recipe/nightly.yaml` is `recipe=nightly`), or with LMSTACK_CONFIG_DIR,
which pipeline stages inherit.

Only light modules are imported before Hydra composes the config, so a config error answers in
about a second; each phase imports its heavy stack itself.
"""

from __future__ import annotations

import os
import sys

import hydra

from lmstack.config.argv import multirun_flag_first
from lmstack.config.help import render_help, wants_help
from lmstack.config.location import CONF_DIR
from lmstack.config.recipes import rewrite_recipe_argument
from lmstack.config.store import register_configs
from lmstack.errors import LmstackError
from lmstack.tracking.identity import register_resolvers

CONFIG_DIR_ENV = "LMSTACK_CONFIG_DIR"
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def _app(cfg) -> float | None:
    from lmstack.launch import run_task

    return run_task(cfg)


def main() -> None:
    if wants_help(sys.argv):  # answered from conf/ in well under a second (see config/help.py)
        sys.exit(print(render_help(CONF_DIR), end=""))
    try:
        register_configs()  # imports the plug-ins, which may not import
    except LmstackError as error:
        sys.exit(print(f"lmstack: error: {error}", file=sys.stderr) or 2)
    register_resolvers()
    sys.argv = rewrite_recipe_argument(multirun_flag_first(with_config_dir(sys.argv)))
    try:
        _app()
    except SystemExit as stop:
        # Hydra exits 1 on any error. Before lmstack.launch is imported no task has started,
        # so the error is in the user's input (an unknown option or key, a malformed
        # override): exit 2, lmstack's code for bad input, as for a config value it rejects.
        if stop.code == 1 and "lmstack.launch" not in sys.modules:
            sys.exit(2)
        raise


def with_config_dir(argv: list[str]) -> list[str]:
    """The team's config folder: `--config-dir DIR` is exported for child processes (a
    pipeline's stages), and LMSTACK_CONFIG_DIR becomes `--config-dir` when none is given."""
    for index, arg in enumerate(argv):
        if arg in CONFIG_DIR_FLAGS and index + 1 < len(argv):
            os.environ[CONFIG_DIR_ENV] = os.path.abspath(argv[index + 1])
            return argv
        if arg.startswith("--config-dir="):
            os.environ[CONFIG_DIR_ENV] = os.path.abspath(arg.split("=", 1)[1])
            return argv
    if folder := os.environ.get(CONFIG_DIR_ENV):
        if not os.path.isdir(folder):
            print(f"lmstack: error: {CONFIG_DIR_ENV}: no such directory: {folder}", file=sys.stderr)
            sys.exit(2)
        return [argv[0], "--config-dir", folder, *argv[1:]]
    return argv
