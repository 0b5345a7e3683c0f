"""lmstack's one entry point: `python run.py [group=option ...] [key=value ...] [-m]`.

Only light modules are imported before Hydra composes the config, so a config
error answers in about a second; each phase imports its heavy stack itself.
"""

import sys
from pathlib import Path

import hydra

from lmstack.config.argv import multirun_flag_first
from lmstack.config.help import render_help, wants_help
from lmstack.config.recipes import rewrite_recipe_argument
from lmstack.config.store import register_configs
from lmstack.tracking.identity import register_resolvers

if wants_help(sys.argv):  # answered from conf/ in well under a second (see config/help.py)
    sys.exit(print(render_help(Path(__file__).parent / "conf"), end=""))
register_configs()
register_resolvers()
sys.argv = rewrite_recipe_argument(multirun_flag_first(sys.argv))


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg) -> float | None:
    from lmstack.launch import run_task

    return run_task(cfg)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        # Hydra exits 1 on any error. Before lmstack.launch is imported no task has started,
        # so the error is in the user's input (an unknown option or key, a malformed
        # override): exit 2, lmstack's code for bad input, as for a config value it rejects.
        if stop.code == 1 and "lmstack.launch" not in sys.modules:
            sys.exit(2)
        raise
