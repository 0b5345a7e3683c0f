"""lmstack's one entry point: `python run.py [group=option ...] [key=value ...] [-m]`.

Only light modules are imported before Hydra composes the config, so a config
error answers in about a second; each phase imports its heavy stack itself.
"""

import sys

import hydra

from lmstack.config.recipes import rewrite_recipe_argument
from lmstack.config.store import register_configs

register_configs()
sys.argv = rewrite_recipe_argument(sys.argv)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg) -> float | None:
    from lmstack.launch import run_task

    return run_task(cfg)


if __name__ == "__main__":
    main()
